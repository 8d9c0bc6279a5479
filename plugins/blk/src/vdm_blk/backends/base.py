"""The disk backend interface: what a virtio-blk device needs from a disk image format.

A backend is a small table of operations, like kvmtool's ``disk_image_operations``. The device
calls it from a pool of worker threads, so every method must be safe to call concurrently.

Contract for callers (the virtio-blk device):

* ``offset`` and ``length`` are multiples of 512 and lie inside ``size``. Backends check this
  anyway and raise :class:`DiskError` for a bad range: no backend ever reads or writes past the end.
* ``buffers`` are slices of guest memory. ``readv`` fills them in order starting at ``offset``;
  ``writev`` writes them in order. Backends avoid intermediate copies where the format allows.
* ``readv``/``writev`` return the number of bytes transferred, which is the total length of the
  buffers on success; on failure they raise :class:`DiskError` or :class:`OSError`.
* ``flush`` makes every write that completed before it was called durable.
* ``discard`` tells the backend the range is unused. Afterwards the range reads as zeros unless
  the backend documents otherwise (qcow2 v2 images with a backing file read the backing data).
* ``write_zeroes`` makes the range read as zeros; with ``unmap`` it may also free the space.
* ``readv_nowait``/``writev_inline`` (optional) serve a request on the device's own thread when
  that needs no waiting; the default returns None ("use a worker"), which is always correct.
* A format reads and writes its image through a :class:`~vdm_blk.backends.protocol.Protocol`
  (a local file, an NBD export, ...), never through a path of its own.

To add a format, subclass :class:`DiskBackend`, fill in the attributes in ``__init__`` and
implement the abstract methods; :func:`vdm_blk.backends.open_disk` shows how formats are chosen.
"""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from typing import Sequence

from vdm.sg import split_views, total_length  # re-exported: blk's backends have always had them here

__all__ = ["SECTOR", "DiskBackend", "DiskError", "RWLock", "split_views", "total_length"]

SECTOR = 512


class DiskError(Exception):
    """A disk image cannot be opened or a request cannot be served.

    The message says what is wrong and, where there is one, how to fix it.
    """


class DiskBackend(ABC):
    """A virtual disk of ``size`` bytes. Subclasses set the attributes and implement the methods."""

    #: virtual disk size in bytes (a multiple of 512 as seen by the guest: the device rounds down)
    size: int = 0
    #: writes, discards and write-zeroes raise DiskError
    read_only: bool = False
    #: the unit of addressing the guest sees
    logical_block_size: int = 512
    #: the unit below which writes cost a read-modify-write (BLKPBSZGET for block devices)
    physical_block_size: int = 4096
    #: the preferred request size in bytes, 0 if unknown
    optimal_io_size: int = 0
    #: discard() frees space
    supports_discard: bool = False
    #: write_zeroes() is cheaper than writing zeros
    supports_write_zeroes: bool = False

    @abstractmethod
    def readv(self, offset: int, buffers: Sequence[memoryview]) -> int:
        """Fill ``buffers`` in order with the disk's bytes from ``offset``; return the bytes read."""

    @abstractmethod
    def writev(self, offset: int, buffers: Sequence[memoryview]) -> int:
        """Write ``buffers`` in order at ``offset``; return the bytes written."""

    @abstractmethod
    def flush(self) -> None:
        """Make every completed write durable."""

    @abstractmethod
    def discard(self, offset: int, length: int) -> None:
        """Mark ``length`` bytes at ``offset`` unused (they read as zeros afterwards)."""

    @abstractmethod
    def write_zeroes(self, offset: int, length: int, unmap: bool) -> None:
        """Make ``length`` bytes at ``offset`` read as zeros; ``unmap`` allows freeing the space."""

    @abstractmethod
    def close(self) -> None:
        """Flush what must be flushed and release the image. Further calls raise DiskError."""

    # ---- non-blocking fast paths (optional) ------------------------------------------------------

    def readv_nowait(self, offset: int, buffers: Sequence[memoryview]) -> int | None:
        """Serve a read on the caller's thread only if it needs no waiting (page-cache hits);
        return the bytes read, or None for "not now / not supported: use a worker thread".
        The default never serves: a backend overrides it only if it has such a path."""
        return None

    def writev_inline(self, offset: int, buffers: Sequence[memoryview]) -> int | None:
        """Serve a small write on the caller's thread (a buffered copy into the page cache);
        return the bytes written, or None for "use a worker thread". The default never serves."""
        return None

    def resize(self, size: int | None) -> int:
        """Make the disk ``size`` bytes (None: take the size the storage has now, e.g. after
        ``truncate -s``); return the new size. The default refuses: a format that can change
        size while served overrides it (raw does)."""
        raise DiskError(f"{self}: this disk format cannot change size while it is served (raw can)")

    # ---- helpers for implementations -------------------------------------------------------------

    def check_range(self, offset: int, length: int, write: bool = False) -> None:
        """Raise DiskError unless ``length`` bytes at ``offset`` are a sector-aligned range in the disk."""
        if write and self.read_only:
            raise DiskError(f"{self}: the disk is read-only; open it without ro to write")
        if offset < 0 or length < 0 or offset % SECTOR or length % SECTOR:
            raise DiskError(f"{self}: range {offset}+{length} is not aligned to {SECTOR} bytes")
        if offset + length > self.size:
            raise DiskError(
                f"{self}: range {offset}+{length} is past the end of the disk ({self.size} bytes)"
            )

    def read_clipped(self, offset: int, buf: memoryview) -> None:
        """Fill ``buf`` from ``offset``; bytes past ``size`` read as zeros (used for backing files).

        ``offset`` and ``len(buf)`` are multiples of 512; ``size`` need not be.
        """
        n = max(0, min(len(buf), self.size - offset))
        whole = n - n % SECTOR
        if whole:
            self.readv(offset, [buf[:whole]])
        if whole < len(buf):
            buf[whole:] = bytes(len(buf) - whole)
        if n > whole:
            self._read_tail(offset + whole, buf[whole:n])

    def _read_tail(self, offset: int, buf: memoryview) -> None:
        """Read the last, partial sector of a disk whose size is not a multiple of 512."""
        raise DiskError(f"{self}: size {self.size} is not a multiple of {SECTOR}")


class RWLock:
    """Many holders of the shared side or one of the exclusive side; a waiting writer blocks new readers."""

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._readers = 0
        self._writer = False
        self._writers_waiting = 0

    def acquire_shared(self) -> None:
        with self._cond:
            while self._writer or self._writers_waiting:
                self._cond.wait()
            self._readers += 1

    def try_acquire_shared(self) -> bool:
        """The shared side if it is free now (no writer holding or waiting); never blocks."""
        with self._cond:
            if self._writer or self._writers_waiting:
                return False
            self._readers += 1
            return True

    def release_shared(self) -> None:
        with self._cond:
            self._readers -= 1
            if not self._readers and self._writers_waiting:
                self._cond.notify_all()

    def acquire_exclusive(self) -> None:
        with self._cond:
            self._writers_waiting += 1
            while self._writer or self._readers:
                self._cond.wait()
            self._writers_waiting -= 1
            self._writer = True

    def release_exclusive(self) -> None:
        with self._cond:
            self._writer = False
            self._cond.notify_all()
