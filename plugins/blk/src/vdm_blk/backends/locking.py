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

Locks taken at device start (``--disk PATH,lock=start``, for live migration between two vhost-user
backends on one image): inside :func:`locks_deferred` an image is opened holding only "consistent
read" and sharing everything (what QEMU's inactive images on a migration destination hold), so it
opens while another process writes it; the device takes the usual locks when it starts
(:meth:`DeferredLocks.take`, a conflict fails the device with one line) and drops back to the
shared lock when it is reset (:meth:`DeferredLocks.release`): the migration source's device is
reset when the frontend stops it, before the destination's starts. ``qemu-img`` and a vdm opened
the usual way are kept out while the device runs, as before; while it is stopped they are not.

A format that caches metadata (qcow2: header, L1/L2 tables, refcounts) registers a pair of hooks
with :meth:`DeferredLocks.on_start_stop` when it is opened this way, and the discipline is QEMU's
inactivate / invalidate-cache: the format does not trust what it read at open (the source was
writing meanwhile) and writes nothing there; when the device starts, after the locks are taken,
its ``start`` hook re-reads all of the image's metadata (and checks it); when the device stops,
its ``stop`` hook writes back and syncs everything it caches and forgets it, before the locks are
dropped. So at every moment at most one process has metadata that may be newer than the file,
and it is the one holding the write lock. A ``stop`` hook that fails (an I/O error) keeps the
locks: the destination's device then fails on the lock rather than open a half-written image.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import struct
import threading
from contextlib import contextmanager
from typing import Callable, Iterator

from .base import DiskError

__all__ = ["DeferredLocks", "deferred_locks", "lock_image", "locks_deferred"]

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


class DeferredLocks:
    """The images opened inside :func:`locks_deferred`: their locks are taken at device start."""

    def __init__(self) -> None:
        self.images: list[tuple[int, str, bool]] = []  # (fd, path, writable)
        #: (start, stop) hooks of the formats opened here, in opening order
        self.hooks: list[tuple[Callable[[], None], Callable[[], None]]] = []

    def on_start_stop(self, start: Callable[[], None], stop: Callable[[], None]) -> None:
        """``start()`` runs after :meth:`take` took the locks (it may raise DiskError: the device
        fails); ``stop()`` runs in :meth:`release` before they are dropped (module doc)."""
        self.hooks.append((start, stop))

    def take(self) -> None:
        """The usual locks on every image, then the start hooks (DiskError if another process
        holds a conflicting lock, or if a format finds the image unusable now)."""
        for fd, path, writable in self.images:
            lock_image(fd, path, writable)
        for start, _ in self.hooks:
            start()

    def release(self) -> None:
        """The stop hooks, then back to "consistent read", sharing everything (the device stopped).

        If a stop hook fails, the locks stay (one log line): what the format cached may not all
        be in the file, so no other process may start on it."""
        for _, stop in reversed(self.hooks):
            try:
                stop()
            except Exception as e:  # an I/O error writing metadata back
                log.error("writing the image's metadata back at device stop failed, its locks stay: %s", e)
                return
        for fd, _, _ in self.images:
            try:
                for i in (WRITE, RESIZE):
                    _setlk(fd, fcntl.F_UNLCK, PERM_BASE + i)
                    _setlk(fd, fcntl.F_UNLCK, SHARED_BASE + i)
            except OSError as e:  # closed already, or no OFD locks here
                log.debug("releasing image locks: %s", e)


_deferring = threading.local()


def deferred_locks() -> DeferredLocks | None:
    """The :class:`DeferredLocks` of the :func:`locks_deferred` block this thread is in, if any
    (a format opened there registers its start/stop hooks with it)."""
    return getattr(_deferring, "locks", None)


@contextmanager
def locks_deferred() -> Iterator[DeferredLocks]:
    """Images opened in this block (on this thread) hold only a shared lock until ``take()``."""
    locks = DeferredLocks()
    _deferring.locks = locks
    try:
        yield locks
    finally:
        _deferring.locks = None


def lock_image(fd: int, path: str, writable: bool) -> None:
    """Take QEMU-compatible locks on an open image; DiskError if another user conflicts.

    The locks belong to ``fd``'s open file description and go away when it is closed. On file
    systems without OFD locks, nothing is locked (logged once per image). Inside
    :func:`locks_deferred` only the shared "consistent read" lock is taken (module doc).
    """
    deferred = getattr(_deferring, "locks", None)
    if deferred is not None:
        try:
            _setlk(fd, fcntl.F_RDLCK, PERM_BASE + CONSISTENT_READ)
        except OSError as e:
            log.debug("%s: shared lock not taken: %s", path, e)
        deferred.images.append((fd, path, writable))
        return
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
