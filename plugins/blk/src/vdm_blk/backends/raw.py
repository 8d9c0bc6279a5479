"""Raw disks: the protocol's bytes, byte for byte (a host file or block device, an NBD export, ...).

The I/O is the protocol's (:mod:`.hostfile` for local paths: preadv/pwritev straight into guest
memory; discard as a hole or BLKDISCARD; write-zeroes as FALLOC_FL_ZERO_RANGE or BLKZEROOUT).
A raw disk adds only the range check, so the local-file fast path costs one call more than a
bare ``os.preadv``, as it did before protocols were split out.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

from .base import SECTOR, DiskBackend, DiskError, total_length
from .hostfile import HostFile
from .protocol import Protocol

if TYPE_CHECKING:
    from ..fastserve import ServeStep

__all__ = ["RawDisk"]


class RawDisk(DiskBackend):
    """A raw image over a protocol (a local path opens the ``file`` protocol, :class:`HostFile`)."""

    def __init__(
        self,
        path: str,
        *,
        read_only: bool = False,
        direct: bool = False,
        writethrough: bool = False,
        file: Protocol | None = None,
    ) -> None:
        self.path = path
        self.file = (
            file
            if file is not None
            else HostFile(path, read_only=read_only, direct=direct, writethrough=writethrough)
        )
        self.read_only = read_only or self.file.read_only
        self.writethrough = writethrough
        self.size = self.file.size()
        self.logical_block_size = max(SECTOR, self.file.logical_block_size)
        self.physical_block_size = max(self.logical_block_size, self.file.physical_block_size)
        self.optimal_io_size = self.file.optimal_io_size
        self.supports_discard = not self.read_only and self.file.supports_discard
        self.supports_write_zeroes = not self.read_only
        self._closed = False
        self._step: ServeStep | None = None

    def __str__(self) -> str:
        return self.path

    def _live(self) -> None:
        if self._closed:
            raise DiskError(f"{self.path}: the disk is closed")

    def serve_step(self) -> ServeStep | None:
        """The compiled serve step for this image (vdm_blk.fastserve), or None: not built or not
        active, not a local buffered file (O_DIRECT, NBD...), or closed. One per image."""
        if self._step is None and not self._closed:
            from .. import fastserve

            f = self.file
            if fastserve.ACTIVE and isinstance(f, HostFile) and f.dfd is None:
                self._step = fastserve.ServeStep(f.fd, self.size // SECTOR, **f.step_options(self.read_only))
        return self._step

    def readv(self, offset: int, buffers: Sequence[memoryview]) -> int:
        self._live()
        self.check_range(offset, total_length(buffers))
        return self.file.preadv(buffers, offset)

    def readv_nowait(self, offset: int, buffers: Sequence[memoryview]) -> int | None:
        """Read only if the data is in the page cache; None when it would block (the device then
        hands the request to a worker). See :meth:`HostFile.read_nowait`."""
        if self._closed:
            return None
        n = total_length(buffers)
        if offset < 0 or offset % SECTOR or n % SECTOR or offset + n > self.size:
            self.check_range(offset, n)  # (raises, saying why; the same checks, not repeated when fine)
        return self.file.read_nowait(buffers, offset, n)

    def resize(self, size: int | None) -> int:
        """Grow (or shrink) the storage to ``size`` bytes, or take its current size (None)."""
        self._live()
        if size is not None:
            if self.read_only:
                raise DiskError(f"{self.path}: the disk is read-only; it cannot be resized")
            self.file.truncate(size)
        self.size = self.file.size()
        return self.size

    def _read_tail(self, offset: int, buf: memoryview) -> None:
        data = self.file.pread(len(buf), offset)
        buf[: len(data)] = data

    def writev(self, offset: int, buffers: Sequence[memoryview]) -> int:
        self._live()
        self.check_range(offset, total_length(buffers), write=True)
        return self.file.pwritev(buffers, offset)

    def writev_inline(self, offset: int, buffers: Sequence[memoryview]) -> int | None:
        """Write a small request on the caller's thread; None for "use a worker". See
        :meth:`HostFile.write_inline`."""
        if self._closed:
            return None
        self.check_range(offset, total_length(buffers), write=True)
        return self.file.write_inline(buffers, offset)

    def flush(self) -> None:
        self._live()
        if not self.read_only:
            self.file.sync()

    def discard(self, offset: int, length: int) -> None:
        """The protocol's discard (a file: a hole, reads zeros; a block device or an NBD export:
        what a discarded range reads is up to it)."""
        self._live()
        self.check_range(offset, length, write=True)
        if length:
            self.file.discard(offset, length)

    def write_zeroes(self, offset: int, length: int, unmap: bool) -> None:
        """The protocol's write-zeroes (it writes zeros itself where it has nothing cheaper)."""
        self._live()
        self.check_range(offset, length, write=True)
        if length:
            self.file.write_zeroes(offset, length, unmap)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            if self._step is not None:
                self._step.close()
            self.file.close()
