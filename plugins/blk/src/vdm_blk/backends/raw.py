"""Raw disks: a regular file or a block device, byte for byte (I/O in :mod:`.hostfile`).

Files: discard punches a hole, write-zeroes uses FALLOC_FL_ZERO_RANGE (or a hole with unmap),
falling back to written zeros where the file system has neither. Block devices: size and block
sizes from BLKGETSIZE64/BLKSSZGET/BLKPBSZGET/BLKIOOPT, discard by BLKDISCARD, write-zeroes by
BLKZEROOUT.
"""

from __future__ import annotations

import errno
import mmap
from typing import Sequence

from .base import SECTOR, DiskBackend, DiskError, total_length
from .hostfile import HostFile
from .linux import (
    BLKDISCARD,
    BLKZEROOUT,
    FALLOC_FL_KEEP_SIZE,
    FALLOC_FL_PUNCH_HOLE,
    FALLOC_FL_ZERO_RANGE,
    blk_range_ioctl,
    fallocate,
)

__all__ = ["RawDisk"]

ZERO_CHUNK = 1 << 20


class RawDisk(DiskBackend):
    """A raw image file or a block device (whole device or partition)."""

    def __init__(
        self, path: str, *, read_only: bool = False, direct: bool = False, writethrough: bool = False
    ) -> None:
        self.path = path
        self.file = HostFile(path, read_only=read_only, direct=direct, writethrough=writethrough)
        self.read_only = read_only
        self.writethrough = writethrough
        self.size = self.file.size()
        self.logical_block_size = max(SECTOR, self.file.logical_block_size)
        self.physical_block_size = max(self.logical_block_size, self.file.physical_block_size)
        self.optimal_io_size = self.file.optimal_io_size
        self.supports_discard = not read_only
        self.supports_write_zeroes = not read_only
        self._closed = False

    def __str__(self) -> str:
        return self.path

    def _live(self) -> None:
        if self._closed:
            raise DiskError(f"{self.path}: the disk is closed")

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
        self.check_range(offset, n)
        return self.file.read_nowait(buffers, offset, n)

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
        """Punch a hole (files: reads zeros afterwards) or BLKDISCARD (block devices: what a
        discarded range reads is up to the device). Devices without discard ignore it."""
        self._live()
        self.check_range(offset, length, write=True)
        if not length:
            return
        if self.file.is_block:
            try:
                blk_range_ioctl(self.file.fd, BLKDISCARD, offset, length)
            except OSError as e:
                if e.errno not in (errno.EOPNOTSUPP, errno.ENOTTY):
                    raise
            return
        self._zero_file(offset, length, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE)

    def write_zeroes(self, offset: int, length: int, unmap: bool) -> None:
        """BLKZEROOUT, or for files a hole (unmap) or FALLOC_FL_ZERO_RANGE; else written zeros."""
        self._live()
        self.check_range(offset, length, write=True)
        if not length:
            return
        if self.file.is_block:
            try:
                blk_range_ioctl(self.file.fd, BLKZEROOUT, offset, length)
                return
            except OSError as e:
                if e.errno not in (errno.EOPNOTSUPP, errno.ENOTTY):
                    raise
            self._write_zero_bytes(offset, length)
            return
        mode = FALLOC_FL_PUNCH_HOLE if unmap else FALLOC_FL_ZERO_RANGE
        self._zero_file(offset, length, mode | FALLOC_FL_KEEP_SIZE)

    def _zero_file(self, offset: int, length: int, mode: int) -> None:
        try:
            fallocate(self.file.fd, mode, offset, length)
        except OSError as e:
            if e.errno not in (errno.EOPNOTSUPP, errno.ENOSYS):
                raise
            self._write_zero_bytes(offset, length)
            return
        if self.writethrough:
            self.file.sync()

    def _write_zero_bytes(self, offset: int, length: int) -> None:
        with mmap.mmap(-1, min(length, ZERO_CHUNK)) as zeros:
            zview = memoryview(zeros)
            try:
                done = 0
                while done < length:
                    n = min(len(zview), length - done)
                    self.file.pwritev([zview[:n]], offset + done)
                    done += n
            finally:
                zview.release()

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self.file.close()
