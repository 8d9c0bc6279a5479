"""Disk backends for virtio-blk: raw files, block devices and qcow2 images.

:class:`DiskBackend` (in :mod:`.base`) is the interface a format implements; :func:`open_disk`
chooses and opens one. Built-in formats: ``raw`` (:mod:`.raw`: regular files and block devices)
and ``qcow2`` (:mod:`.qcow2`). ``format="auto"`` asks each registered format's probe about the
file's first 512 bytes (qcow2: its magic) and falls back to raw. A backing file is never probed:
it is opened in the format its image's header names (and an image that names none is refused).

Adding a format: implement :class:`DiskBackend` and call :func:`register_format` (from a vdm
plugin module, for instance)::

    def open_mine(path, *, read_only, direct, writethrough, open_backing):
        return MyDisk(path, read_only=read_only, ...)

    register_format("mine", open_mine, probe=lambda head: head[:4] == b"MINE")

``open_backing(name, fmt)`` opens a backing file named inside an image, applying the rules below;
a format with backing files must use it rather than opening paths itself.

Backing files must sit beside the image that names them (in its directory or below it, after
resolving symbolic links), so that an image cannot make vdm open an arbitrary host file. Any
other backing file must be listed, by its resolved path, in ``allowed_backing``
(``--disk ...,allow_backing=/path/one:/path/two``).
"""

from __future__ import annotations

import os
import stat
from typing import Callable, Optional, Sequence

from .base import SECTOR, DiskBackend, DiskError
from .qcow2 import Qcow2Disk
from .qcow2_header import MAGIC
from .raw import RawDisk

__all__ = [
    "SECTOR",
    "DiskBackend",
    "DiskError",
    "Qcow2Disk",
    "RawDisk",
    "formats",
    "open_disk",
    "probe_format",
    "register_format",
    "resolve_backing",
]

MAX_BACKING_DEPTH = 16

#: ``open_backing(name, format)`` as handed to a format's opener
BackingOpener = Callable[[str, Optional[str]], DiskBackend]
#: ``opener(path, *, read_only, direct, writethrough, open_backing) -> DiskBackend``
Opener = Callable[..., DiskBackend]
#: ``probe(first_512_bytes) -> bool``
Probe = Callable[[bytes], bool]

_openers: dict[str, Opener] = {}
_probes: dict[str, Probe] = {}


def register_format(name: str, opener: Opener, probe: Probe | None = None) -> None:
    """Make ``format=name`` open images with ``opener``; with ``probe``, ``auto`` can pick it."""
    if name == "auto" or not name:
        raise ValueError(f"invalid format name {name!r}")
    if name in _openers:
        raise ValueError(f"format {name!r} is already registered")
    _openers[name] = opener
    if probe is not None:
        _probes[name] = probe


def formats() -> tuple[str, ...]:
    """The format names ``open_disk`` accepts (besides ``auto``)."""
    return tuple(_openers)


def _open_raw(path: str, *, read_only: bool, direct: bool, writethrough: bool, open_backing: BackingOpener):
    return RawDisk(path, read_only=read_only, direct=direct, writethrough=writethrough)


def _open_qcow2(path: str, *, read_only: bool, direct: bool, writethrough: bool, open_backing: BackingOpener):
    return Qcow2Disk(
        path, read_only=read_only, direct=direct, writethrough=writethrough, open_backing=open_backing
    )


register_format("raw", _open_raw)
register_format("qcow2", _open_qcow2, probe=lambda head: head[:4] == MAGIC)


def probe_format(path: str) -> str:
    """The first registered format whose probe accepts the file's first 512 bytes, else ``raw``."""
    try:
        # never blocks: a FIFO opens at once with O_NONBLOCK and is refused by its type
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise DiskError(f"{path}: no such file; check the path")
    except IsADirectoryError:
        raise DiskError(f"{path}: not a regular file or a block device")
    except OSError as e:
        raise DiskError(f"{path}: cannot open: {e.strerror}")
    try:
        mode = os.fstat(fd).st_mode
        if not (stat.S_ISREG(mode) or stat.S_ISBLK(mode)):
            raise DiskError(f"{path}: not a regular file or a block device")
        os.set_blocking(fd, True)
        head = os.pread(fd, 512, 0)
    except OSError as e:
        raise DiskError(f"{path}: cannot read: {e.strerror}")
    finally:
        os.close(fd)
    for name, probe in _probes.items():
        if probe(head):
            return name
    return "raw"


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
    return _open(path, read_only, direct, format, writethrough, tuple(allowed_backing), ())


def _identity(path: str) -> tuple[int, int] | None:
    """(device, inode) of a path, without opening it; None if it cannot be had."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _open(
    path: str, read_only: bool, direct: bool, fmt: str, writethrough: bool, allowed: tuple, chain: tuple
) -> DiskBackend:
    """Open one image; ``chain`` holds the (device, inode) of the images that have it as backing."""
    if fmt != "auto" and fmt not in _openers:
        raise DiskError(f"{path}: unknown format {fmt!r}; use one of auto, {', '.join(_openers)}")
    if fmt == "auto":
        fmt = probe_format(path)
    depth = len(chain)
    me = _identity(path)

    def open_backing(name: str, backing_fmt: str | None) -> DiskBackend:
        resolved = resolve_backing(path, name, allowed)
        ident = _identity(resolved)
        if ident is not None and ident == me:
            raise DiskError(
                f"{path}: its backing file {name!r} is the image itself; correct the backing file "
                f"with qemu-img rebase -u -b <file> -F <format> {path}"
            )
        if ident is not None and ident in chain:
            raise DiskError(
                f"{path}: its backing file {name!r} ({resolved}) loops back into its own backing chain"
            )
        if depth + 1 >= MAX_BACKING_DEPTH:
            raise DiskError(f"{path}: the backing chain is deeper than {MAX_BACKING_DEPTH} images (a loop?)")
        if backing_fmt is None:
            raise DiskError(
                f"{path}: the image does not record the format of its backing file {name!r} and vdm does "
                f"not guess it; record it with: qemu-img rebase -u -b {name} -F qcow2|raw {path}"
            )
        if backing_fmt not in _openers:
            raise DiskError(
                f"{path}: backing file format {backing_fmt!r} is not supported ({', '.join(_openers)})"
            )
        try:
            return _open(resolved, True, direct, backing_fmt, False, allowed, (*chain, me))
        except DiskError as e:
            raise DiskError(f"{path}: cannot open its backing file: {e}")

    disk = _openers[fmt](
        path, read_only=read_only, direct=direct, writethrough=writethrough, open_backing=open_backing
    )
    if not isinstance(disk, DiskBackend):
        raise DiskError(
            f"{path}: the {fmt} format's opener returned {type(disk).__name__}, not a DiskBackend"
        )
    return disk


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
        f"(in {base}); if that file is meant to be used, allow it with allow_backing={resolved}"
    )
