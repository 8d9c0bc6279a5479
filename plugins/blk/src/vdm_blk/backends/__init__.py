"""Disk backends for virtio-blk: raw files, block devices and qcow2 images.

:class:`DiskBackend` (in :mod:`.base`) is the interface a format implements; :func:`open_disk`
chooses and opens one. Formats: ``raw`` (:mod:`.raw`: regular files and block devices) and
``qcow2`` (:mod:`.qcow2`). ``format="auto"`` picks qcow2 when the file starts with the qcow2 magic
and raw otherwise. A backing file is never probed: it is opened in the format its image's
header names (and an image that names none is refused).

Backing files must sit beside the image that names them (in its directory or below it, after
resolving symbolic links), so that an image cannot make vdm open an arbitrary host file. Any
other backing file must be listed, by its resolved path, in ``allowed_backing``
(``--disk ...,allow_backing=/path/one:/path/two``).
"""

from __future__ import annotations

import os
from typing import Sequence

from .base import SECTOR, DiskBackend, DiskError
from .qcow2 import Qcow2Disk
from .qcow2_header import MAGIC
from .raw import RawDisk

__all__ = ["SECTOR", "DiskBackend", "DiskError", "Qcow2Disk", "RawDisk", "open_disk", "probe_format"]

FORMATS = ("auto", "raw", "qcow2")
MAX_BACKING_DEPTH = 16


def probe_format(path: str) -> str:
    """``qcow2`` if the file starts with the qcow2 magic, else ``raw``."""
    try:
        with open(path, "rb") as f:
            return "qcow2" if f.read(4) == MAGIC else "raw"
    except FileNotFoundError:
        raise DiskError(f"{path}: no such file; check the path")
    except OSError as e:
        raise DiskError(f"{path}: cannot open: {e.strerror}")


def open_disk(
    path: str,
    *,
    read_only: bool = False,
    direct: bool = False,
    format: str = "auto",
    writethrough: bool = False,
    allowed_backing: Sequence[str] = (),
) -> DiskBackend:
    """Open a disk image or block device.

    ``direct`` bypasses the host page cache (O_DIRECT); ``writethrough`` makes every write
    durable before it completes (O_DSYNC); ``allowed_backing`` lists backing files that may be
    opened although they are not beside the image. Raises :class:`DiskError` with a message
    that says what is wrong and how to fix it.
    """
    return _open(path, read_only, direct, format, writethrough, tuple(allowed_backing), 0)


def _open(
    path: str, read_only: bool, direct: bool, fmt: str, writethrough: bool, allowed: tuple, depth: int
) -> DiskBackend:
    if fmt not in FORMATS:
        raise DiskError(f"{path}: unknown format {fmt!r}; use one of {', '.join(FORMATS)}")
    if fmt == "auto":
        fmt = probe_format(path)
    if fmt == "raw":
        return RawDisk(path, read_only=read_only, direct=direct, writethrough=writethrough)

    def open_backing(name: str, backing_fmt: str | None) -> DiskBackend:
        resolved = resolve_backing(path, name, allowed)
        if depth + 1 >= MAX_BACKING_DEPTH:
            raise DiskError(f"{path}: the backing chain is deeper than {MAX_BACKING_DEPTH} images (a loop?)")
        if backing_fmt not in ("raw", "qcow2"):
            if backing_fmt is None:
                raise DiskError(
                    f"{path}: the image does not record the format of its backing file {name!r} and vdm does "
                    f"not guess it; record it with: qemu-img rebase -u -b {name} -F qcow2|raw {path}"
                )
            raise DiskError(f"{path}: backing file format {backing_fmt!r} is not supported (raw or qcow2)")
        try:
            return _open(resolved, True, direct, backing_fmt, False, allowed, depth + 1)
        except DiskError as e:
            raise DiskError(f"{path}: cannot open its backing file: {e}")

    return Qcow2Disk(
        path, read_only=read_only, direct=direct, writethrough=writethrough, open_backing=open_backing
    )


def resolve_backing(image: str, name: str, allowed: Sequence[str]) -> str:
    """The path of backing file ``name`` of ``image``; DiskError unless it is beside it or allowed."""
    image_dir = os.path.dirname(os.path.abspath(image))
    candidate = name if os.path.isabs(name) else os.path.join(image_dir, name)
    resolved = os.path.realpath(candidate)
    base = os.path.realpath(image_dir)
    if resolved.startswith(base.rstrip(os.sep) + os.sep):
        return resolved
    if resolved in {os.path.realpath(a) for a in allowed}:
        return resolved
    raise DiskError(
        f"{image}: its backing file {name!r} resolves to {resolved}, which is not beside the image "
        f"(in {base}); "
        f"if that file is meant to be used, allow it with allow_backing={resolved}"
    )
