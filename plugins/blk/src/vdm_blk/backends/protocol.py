"""Protocols: the byte-addressed storage a disk format reads and writes through.

A disk is a *format* (raw, qcow2, ...: :class:`~vdm_blk.backends.base.DiskBackend`) over a
*protocol* (a host file or block device: :class:`~vdm_blk.backends.hostfile.HostFile`; an NBD
export: :class:`~vdm_blk.backends.nbd.NbdProtocol`; a third party's). A format only ever calls
the methods below, so every format works over every protocol (a qcow2 image exported by an NBD
server is opened as qcow2).

Contract (every method may be called from several worker threads at once):

* ``preadv``/``pwritev`` move the caller's buffers (guest memory) in order at a byte offset and
  return the byte count; reads past the end return zeros for the missing part. ``pread`` /
  ``pwrite`` are the same for metadata (any alignment, a ``bytes`` result).
* ``sync`` makes every completed write durable; ``discard``/``write_zeroes`` as in
  :class:`~vdm_blk.backends.base.DiskBackend` (a protocol without them writes zeros or ignores
  a discard: ``supports_discard``/``supports_write_zeroes`` say which is cheap).
* ``truncate`` grows (or shrinks) the storage; a protocol of a fixed size (an NBD export) raises
  :class:`~vdm_blk.backends.base.DiskError` when asked to grow past it (``can_grow`` is False).
* ``read_nowait``/``write_inline`` are the non-blocking fast paths a device may try on its own
  thread; the default says "not supported" (None), and the device hands the request to a worker.
* Errors are :class:`OSError` (the device answers IOERR) or
  :class:`~vdm_blk.backends.base.DiskError` (with a message that says what to do).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Sequence

from .base import SECTOR

__all__ = ["Protocol"]


class Protocol(ABC):
    """Byte-addressed storage under a disk format. Subclasses set the attributes in ``__init__``."""

    #: what the user named (a path, a URI): used in messages
    path: str = ""
    #: opened read-only: writes fail
    read_only: bool = False
    #: a host block device (formats may treat the end of the device differently)
    is_block: bool = False
    #: the smallest unit the storage addresses (a request's offset/length should be multiples)
    logical_block_size: int = SECTOR
    #: below this, writes cost a read-modify-write
    physical_block_size: int = 4096
    #: preferred request size, 0 if unknown
    optimal_io_size: int = 0
    #: the largest single transfer the storage takes (callers need not split: the protocol does)
    max_transfer: int = 1 << 30
    #: ``discard`` frees space (otherwise it is a no-op)
    supports_discard: bool = False
    #: ``write_zeroes`` is cheaper than writing zeros
    supports_write_zeroes: bool = False
    #: ``truncate`` may grow the storage
    can_grow: bool = True

    @abstractmethod
    def size(self) -> int:
        """The current size in bytes."""

    @abstractmethod
    def preadv(self, views: Sequence[memoryview], offset: int) -> int:
        """Fill ``views`` in order from ``offset``; bytes past the end read as zeros."""

    @abstractmethod
    def pwritev(self, views: Sequence[memoryview], offset: int) -> int:
        """Write ``views`` in order at ``offset``; return the bytes written (all of them)."""

    def pread(self, length: int, offset: int) -> bytes:
        """Up to ``length`` bytes at ``offset`` (fewer at the end)."""
        end = min(offset + length, self.size())
        if end <= offset:
            return b""
        out = bytearray(end - offset)
        self.preadv([memoryview(out)], offset)
        return bytes(out)

    def pwrite(self, data: bytes | bytearray | memoryview, offset: int) -> None:
        """Write ``data`` at ``offset``."""
        self.pwritev([memoryview(data)], offset)

    @abstractmethod
    def sync(self) -> None:
        """Make every completed write durable."""

    def truncate(self, length: int) -> None:
        """Make the storage ``length`` bytes long (new bytes read as zeros)."""
        from .base import DiskError

        if length != self.size():
            raise DiskError(
                f"{self.path}: the storage has a fixed size of {self.size()} bytes and cannot grow"
            )

    def discard(self, offset: int, length: int) -> None:
        """Mark the range unused (afterwards it reads as zeros or as before: see the protocol).
        The default does nothing, which a discard allows."""
        return None

    def write_zeroes(self, offset: int, length: int, unmap: bool) -> None:
        """Make the range read as zeros; the default writes zeros."""
        chunk = bytes(min(length, 1 << 20))
        done = 0
        while done < length:
            n = min(len(chunk), length - done)
            self.pwritev([memoryview(chunk)[:n]], offset + done)
            done += n

    def read_nowait(self, views: Sequence[memoryview], offset: int, length: int | None = None) -> int | None:
        """Read without waiting, or None ("not now / not supported": use a worker)."""
        return None

    def write_inline(self, views: Sequence[memoryview], offset: int) -> int | None:
        """Write a small request on the caller's thread, or None ("use a worker")."""
        return None

    @abstractmethod
    def close(self) -> None:
        """Release the storage (idempotent)."""
