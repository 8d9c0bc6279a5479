"""A disk backend in host memory, for device tests that should not depend on a file system."""

from __future__ import annotations

import threading
from typing import Sequence


class MemoryDisk:
    """Implements the DiskBackend interface over a bytearray; records the calls it gets."""

    logical_block_size = 512
    physical_block_size = 4096
    optimal_io_size = 0
    supports_discard = True
    supports_write_zeroes = True

    def __init__(self, size: int = 1 << 20, read_only: bool = False, fail: bool = False) -> None:
        self.size = size
        self.read_only = read_only
        self.data = bytearray(size)
        self.calls: list[tuple] = []
        self.flushes = 0
        self.fail = fail
        self.gate: threading.Event | None = None  # when set, I/O waits for it (slow disk)
        self.closed = False

    def readv_nowait(self, offset: int, buffers: Sequence[memoryview]) -> int | None:
        return None  # no inline path: every request goes through the device's worker, as before

    def writev_inline(self, offset: int, buffers: Sequence[memoryview]) -> int | None:
        return None

    def _io(self, what: str, offset: int, length: int) -> None:
        if self.gate is not None:
            self.gate.wait(10)
        if self.fail:
            raise OSError(5, "simulated I/O error")
        assert 0 <= offset and offset + length <= self.size, f"{what} past the end: {offset}+{length}"
        self.calls.append((what, offset, length))

    def readv(self, offset: int, buffers: Sequence[memoryview]) -> int:
        n = sum(len(b) for b in buffers)
        self._io("read", offset, n)
        pos = offset
        for b in buffers:
            b[:] = self.data[pos : pos + len(b)]
            pos += len(b)
        return n

    def writev(self, offset: int, buffers: Sequence[memoryview]) -> int:
        n = sum(len(b) for b in buffers)
        self._io("write", offset, n)
        assert not self.read_only
        pos = offset
        for b in buffers:
            self.data[pos : pos + len(b)] = b
            pos += len(b)
        return n

    def flush(self) -> None:
        self._io("flush", 0, 0)
        self.flushes += 1

    def discard(self, offset: int, length: int) -> None:
        self._io("discard", offset, length)
        self.data[offset : offset + length] = bytes(length)

    def write_zeroes(self, offset: int, length: int, unmap: bool) -> None:
        self._io("write_zeroes", offset, length)
        self.data[offset : offset + length] = bytes(length)

    def close(self) -> None:
        self.closed = True
