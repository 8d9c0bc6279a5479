"""Disk backends for virtio-blk: a *format* (raw, qcow2) read through a *protocol* (file, nbd).

:class:`DiskBackend` (in :mod:`.base`) is the interface a format implements and
:class:`~.protocol.Protocol` the one a protocol implements; :func:`open_disk` opens the protocol
a disk name asks for (a registered URI scheme such as ``nbd://`` / ``nbd+unix://``, else a local
path: the ``file`` protocol), then the format over it. Built-in formats: ``raw`` (:mod:`.raw`)
and ``qcow2`` (:mod:`.qcow2`). ``format="auto"`` asks each registered format's probe about the
file's first 512 bytes (qcow2: its magic) and falls back to raw. A backing file is never probed:
it is opened in the format its image's header names (and an image that names none is refused).

Adding a format: implement :class:`DiskBackend` over a protocol and call :func:`register_format`
(third-party distributions do it from the ``vdm_blk_register_protocols`` hook: :mod:`.extend`)::

    def open_mine(path, *, read_only, direct, writethrough, open_backing, file):
        return MyDisk(file, read_only=read_only, ...)   # file: the Protocol to read the image through

    register_format("mine", open_mine, probe=lambda head: head[:4] == b"MINE")

An opener without the ``file`` parameter (written before protocols existed) still works for local
paths: it opens the path itself (a DeprecationWarning at registration says to take ``file``);
over any other protocol it is refused with a message saying so.

Adding a protocol: implement :class:`~.protocol.Protocol` and call :func:`register_protocol` with
the URI schemes it serves and an availability check (None, or why it cannot work here).

``open_backing(name, fmt)`` opens a backing file named inside an image, applying the rules below;
a format with backing files must use it rather than opening paths itself.

Backing files must sit beside the image that names them (in its directory or below it, after
resolving symbolic links), so that an image cannot make vdm open an arbitrary host file. Any
other backing file must be listed, by its resolved path, in ``allowed_backing``
(``--disk ...,allow_backing=/path/one:/path/two``).
"""

from __future__ import annotations

import inspect
import os
import re
import stat
import warnings
from typing import Any, Callable, Mapping, Optional, Sequence

from . import libnbd, librbd
from .base import SECTOR, DiskBackend, DiskError
from .hostfile import HostFile
from .protocol import Protocol
from .qcow2 import Qcow2Disk
from .qcow2_header import MAGIC
from .raw import RawDisk

__all__ = [
    "SECTOR",
    "DiskBackend",
    "DiskError",
    "Protocol",
    "Qcow2Disk",
    "RawDisk",
    "catalog",
    "formats",
    "open_disk",
    "open_protocol",
    "probe_format",
    "protocols",
    "register_format",
    "register_protocol",
    "resolve_backing",
    "unregister_format",
]

MAX_BACKING_DEPTH = 16

#: ``open_backing(name, format)`` as handed to a format's opener
BackingOpener = Callable[[str, Optional[str]], DiskBackend]
#: ``opener(path, *, read_only, direct, writethrough, open_backing, file) -> DiskBackend``
Opener = Callable[..., DiskBackend]
#: ``probe(first_512_bytes) -> bool``
Probe = Callable[[bytes], bool]
#: ``opener(uri, *, read_only, options) -> Protocol``
ProtocolOpener = Callable[..., Protocol]
#: None when the protocol can work here, else one line saying why not
Availability = Callable[[], Optional[str]]

_openers: dict[str, Opener] = {}
_takes_file: dict[str, bool] = {}
_probes: dict[str, Probe] = {}
#: protocol name -> (opener, availability check, URI schemes)
_protocols: dict[str, tuple[ProtocolOpener, Availability, tuple[str, ...]]] = {}
_schemes: dict[str, str] = {}
_SCHEME = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*):")


def register_format(name: str, opener: Opener, probe: Probe | None = None) -> None:
    """Make ``format=name`` open images with ``opener``; with ``probe``, ``auto`` can pick it."""
    if name == "auto" or not name:
        raise ValueError(f"invalid format name {name!r}")
    if name in _openers:
        raise ValueError(f"format {name!r} is already registered")
    params = inspect.signature(opener).parameters
    takes = "file" in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    if not takes:
        warnings.warn(
            f"vdm-blk format {name!r}: its opener takes no 'file' parameter, so it can open local paths "
            "only; accept file= (the Protocol to read the image through) to work over every protocol",
            DeprecationWarning,
            stacklevel=2,
        )
    _openers[name] = opener
    _takes_file[name] = takes
    if probe is not None:
        _probes[name] = probe


def register_protocol(
    name: str, opener: ProtocolOpener, schemes: Sequence[str], available: Availability | None = None
) -> None:
    """Make disk names ``<scheme>:...`` (for each of ``schemes``) open through ``opener``.

    ``opener(name, *, read_only, options)`` returns a :class:`Protocol`; ``options`` holds the
    disk's protocol options (``reconnect_timeout``, ...), which it may ignore. ``available()``
    says None, or one line why the protocol cannot work here (shown by ``vdm list-plugins``
    and in the error of a disk that names it).
    """
    if not name or name == "file" or name in _protocols:
        raise ValueError(f"protocol {name!r} is already registered or reserved")
    for sc in schemes:
        if not _SCHEME.fullmatch(sc + ":") or sc.lower() in _schemes:
            raise ValueError(f"protocol {name!r}: URI scheme {sc!r} is invalid or taken")
    _protocols[name] = (opener, available or (lambda: None), tuple(s.lower() for s in schemes))
    for sc in schemes:
        _schemes[sc.lower()] = name


def unregister_format(name: str) -> None:
    """Forget format ``name`` (tests, an extension being unloaded); unknown names are ignored."""
    _openers.pop(name, None)
    _takes_file.pop(name, None)
    _probes.pop(name, None)


def formats() -> tuple[str, ...]:
    """The format names ``open_disk`` accepts (besides ``auto``)."""
    return tuple(_openers)


def protocols() -> tuple[str, ...]:
    """The protocol names (``file`` first)."""
    return ("file", *_protocols)


def catalog() -> dict[str, dict[str, Optional[str]]]:
    """``{"protocols": {name: None or why unavailable}, "formats": {name: None}}`` for list-plugins."""
    from .extend import load_extensions

    load_extensions()
    prots: dict[str, Optional[str]] = {"file": None}
    for name, (_, available, _s) in _protocols.items():
        try:
            prots[name] = available()
        except Exception as e:  # a third party's check: one line, never a traceback
            prots[name] = f"availability check failed: {type(e).__name__}: {e}"
    return {"protocols": prots, "formats": {f: None for f in _openers}}


def _open_raw(
    path: str, *, read_only: bool, direct: bool, writethrough: bool, open_backing: BackingOpener, file
):
    return RawDisk(path, read_only=read_only, direct=direct, writethrough=writethrough, file=file)


def _open_qcow2(
    path: str, *, read_only: bool, direct: bool, writethrough: bool, open_backing: BackingOpener, file
):
    return Qcow2Disk(
        path,
        read_only=read_only,
        direct=direct,
        writethrough=writethrough,
        open_backing=open_backing,
        file=file,
    )


def _open_nbd(uri: str, *, read_only: bool, options: Mapping[str, Any]) -> Protocol:
    from .nbd import open_nbd

    return open_nbd(uri, read_only=read_only, options=options)


def _open_rbd(name: str, *, read_only: bool, options: Mapping[str, Any]) -> Protocol:
    from .rbd import open_rbd

    return open_rbd(name, read_only=read_only, options=options)


register_protocol("nbd", _open_nbd, ("nbd", "nbd+unix", "nbds", "nbds+unix"), available=libnbd.probe)
register_protocol("rbd", _open_rbd, ("rbd",), available=librbd.probe)
register_format("raw", _open_raw)
register_format("qcow2", _open_qcow2, probe=lambda head: head[:4] == MAGIC)


def protocol_of(name: str) -> str:
    """The protocol a disk name is opened with: a registered URI scheme's, else ``file``."""
    m = _SCHEME.match(name)
    if m is None or len(m.group(1)) < 2:  # "C:" is no scheme; a bare path has none
        return "file"
    proto = _schemes.get(m.group(1).lower())
    if proto is not None:
        return proto
    if name[m.end() : m.end() + 2] == "//":
        known = ", ".join(sorted(_schemes)) or "none"
        raise DiskError(f"{name}: unknown protocol {m.group(1)!r} (URI schemes vdm-blk knows: {known})")
    return "file"  # a file name with a colon


def open_protocol(
    name: str,
    *,
    read_only: bool = False,
    direct: bool = False,
    writethrough: bool = False,
    options: Mapping[str, Any] | None = None,
) -> Protocol:
    """Open the storage ``name`` designates (a URI of a registered protocol, else a local path)."""
    proto = protocol_of(name)
    if proto == "file":
        return HostFile(name, read_only=read_only, direct=direct, writethrough=writethrough)
    opener, available, _ = _protocols[proto]
    why = available()
    if why is not None:
        raise DiskError(f"{name}: the {proto} protocol is unavailable here: {why}")
    if direct:
        raise DiskError(f"{name}: direct/cache=none is for local files; drop it for {proto}")
    p = opener(name, read_only=read_only, options={"writethrough": writethrough, **(options or {})})
    if not isinstance(p, Protocol):
        raise DiskError(f"{name}: the {proto} protocol's opener returned {type(p).__name__}, not a Protocol")
    return p


def _probe_head(head: bytes) -> str:
    for name, probe in _probes.items():
        if probe(head):
            return name
    return "raw"


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
    return _probe_head(head)


def open_disk(
    path: str,
    *,
    read_only: bool = False,
    direct: bool = False,
    format: str = "auto",
    writethrough: bool = False,
    allowed_backing: Sequence[str] = (),
    options: Mapping[str, Any] | None = None,
) -> DiskBackend:
    """Open a disk: a local image or block device, or a URI of a registered protocol.

    ``direct`` bypasses the host page cache (O_DIRECT); ``writethrough`` makes every write
    durable before it completes (O_DSYNC); ``allowed_backing`` lists backing files that may be
    opened although they are not beside the image; ``options`` go to the protocol's opener.
    Raises :class:`DiskError` with a message that says what is wrong and how to fix it.
    """
    from .extend import load_extensions

    load_extensions()
    if protocol_of(path) == "file":
        return _open(path, read_only, direct, format, writethrough, tuple(allowed_backing), ())
    if format != "auto" and format not in _openers:
        raise DiskError(f"{path}: unknown format {format!r}; use one of auto, {', '.join(_openers)}")
    proto = open_protocol(
        path, read_only=read_only, direct=direct, writethrough=writethrough, options=options
    )
    try:
        fmt = _probe_head(proto.pread(512, 0)) if format == "auto" else format
        if not _takes_file[fmt]:
            raise DiskError(
                f"{path}: the {fmt} format opens local files only (its opener takes no 'file'); "
                "use a local image, or update the format's plugin"
            )

        def no_backing(name: str, fmt: str | None) -> DiskBackend:
            raise DiskError(
                f"{path}: the image names a backing file ({name}); vdm opens backing files of local "
                "images only. Flatten it (qemu-img convert) or serve the chain from the NBD server"
            )

        disk = _openers[fmt](
            path,
            read_only=read_only or proto.read_only,
            direct=False,
            writethrough=writethrough,
            open_backing=no_backing,
            file=proto,
        )
    except BaseException:
        proto.close()
        raise
    if not isinstance(disk, DiskBackend):
        proto.close()
        raise DiskError(
            f"{path}: the {fmt} format's opener returned {type(disk).__name__}, not a DiskBackend"
        )
    return disk


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
    """Open one local image; ``chain`` holds the (device, inode) of the images that have it as backing."""
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

    kw: dict[str, Any] = {"file": None} if _takes_file[fmt] else {}
    disk = _openers[fmt](
        path,
        read_only=read_only,
        direct=direct,
        writethrough=writethrough,
        open_backing=open_backing,
        **kw,
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
