"""Image locks that QEMU understands, so vdm and QEMU never write the same image at once.

QEMU (block/file-posix.c) takes open-file-description (OFD) read locks on single bytes of an
image file: byte ``100 + i`` means "I use permission i", byte ``200 + i`` means "I do not let
others use permission i". Permission bits: 0 consistent read, 1 write, 2 write unchanged,
3 resize. An opener takes its locks, then tests whether anyone else holds a byte that conflicts:
someone not sharing a permission it uses, or someone using a permission it does not share.

vdm takes the same locks: a writable image uses read, write and resize; every image (also a
read-only one or a backing file) does not share write and resize, as QEMU does by default. So
QEMU cannot open an image vdm is writing (``Failed to get "write" lock``), ``qemu-img info -U``
still can, and vdm refuses an image QEMU is writing. Two vdm processes can share a read-only
image or backing file.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import struct

from .base import DiskError

__all__ = ["lock_image"]

log = logging.getLogger(__name__)

PERM_BASE = 100
SHARED_BASE = 200
CONSISTENT_READ, WRITE, WRITE_UNCHANGED, RESIZE = 0, 1, 2, 3
_NAMES = {
    CONSISTENT_READ: "consistent read",
    WRITE: "write",
    WRITE_UNCHANGED: "write unchanged",
    RESIZE: "resize",
}

F_OFD_GETLK = getattr(fcntl, "F_OFD_GETLK", 36)
F_OFD_SETLK = getattr(fcntl, "F_OFD_SETLK", 37)
# struct flock: l_type, l_whence, l_start, l_len, l_pid (native layout, padded)
_FLOCK = struct.Struct("@hhqqi4x")


def _setlk(fd: int, kind: int, offset: int) -> None:
    fcntl.fcntl(fd, F_OFD_SETLK, _FLOCK.pack(kind, 0, offset, 1, 0))


def _held_by_others(fd: int, offset: int) -> bool:
    """Would an exclusive lock on this byte conflict with someone else's lock?"""
    res = fcntl.fcntl(fd, F_OFD_GETLK, _FLOCK.pack(fcntl.F_WRLCK, 0, offset, 1, 0))
    return _FLOCK.unpack(res)[0] != fcntl.F_UNLCK


def lock_image(fd: int, path: str, writable: bool) -> None:
    """Take QEMU-compatible locks on an open image; DiskError if another user conflicts.

    The locks belong to ``fd``'s open file description and go away when it is closed. On file
    systems without OFD locks, nothing is locked (logged once per image).
    """
    used = {CONSISTENT_READ} | ({WRITE, RESIZE} if writable else set())
    unshared = {WRITE, RESIZE}
    try:
        for i in sorted(used):
            _setlk(fd, fcntl.F_RDLCK, PERM_BASE + i)
        for i in sorted(unshared):
            _setlk(fd, fcntl.F_RDLCK, SHARED_BASE + i)
        # someone does not share what we use (a reader keeping writers out), or someone uses
        # what we do not share (a writer)
        readers = [i for i in sorted(used) if _held_by_others(fd, SHARED_BASE + i)]
        writers = [i for i in sorted(unshared) if _held_by_others(fd, PERM_BASE + i)]
    except OSError as e:
        if e.errno in (errno.EAGAIN, errno.EACCES):
            readers, writers = [], [WRITE]
        elif e.errno in (errno.EINVAL, errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
            log.warning("%s: the file system does not support OFD locks; the image is not locked", path)
            return
        else:
            raise
    if writers:
        what = " and ".join(_NAMES[i] for i in writers)
        raise DiskError(
            f"{path}: the image is in use by another process that holds its {what} locks (a running QEMU or "
            "another vdm writing it); stop that process first"
        )
    if readers:
        raise DiskError(
            f"{path}: the image is in use by another process that reads it and keeps writers out (a running "
            "QEMU, qemu-img or a read-only vdm); open it read-only too, or stop that process first"
        )
