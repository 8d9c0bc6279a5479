"""Fake guest RAM for tests: flat memory with guard bytes around it and a small allocator."""

from __future__ import annotations

from ..memory import FlatGuestMemory, MemoryRegion

__all__ = ["GuestRam"]

GUARD = 4096
CANARY = 0xA5


class GuestRam:
    """``size`` bytes of guest RAM at ``base``, inside a host buffer with canary pages on both sides.

    :meth:`check_guards` proves that nothing wrote outside guest RAM. :meth:`alloc` / :meth:`free`
    hand out guest addresses for rings and buffers, the way a driver's allocator would.
    """

    def __init__(self, size: int = 16 << 20, base: int = 0x4000_0000) -> None:
        self.base = base
        self.size = size
        self._host = bytearray([CANARY]) * (size + 2 * GUARD)
        self._host[GUARD : GUARD + size] = bytes(size)
        self.region = MemoryRegion(base, memoryview(self._host)[GUARD : GUARD + size])
        self.memory = FlatGuestMemory([self.region])
        self._free: list[tuple[int, int]] = [(base, size)]

    @property
    def end(self) -> int:
        return self.base + self.size

    def check_guards(self) -> None:
        """Raise AssertionError if any byte outside guest RAM changed."""
        host = self._host
        bad = [i for i in range(GUARD) if host[i] != CANARY]
        bad += [i for i in range(GUARD + self.size, len(host)) if host[i] != CANARY]
        assert not bad, f"host memory outside guest RAM was written ({len(bad)} bytes)"

    # ---- raw access (as the driver, i.e. no bounds policy beyond the RAM itself) ---------------

    def read(self, addr: int, length: int) -> bytes:
        return self.memory.read(addr, length)

    def write(self, addr: int, data: bytes) -> None:
        self.memory.write(addr, data)

    # ---- allocation ------------------------------------------------------------------------------

    def alloc(self, size: int, align: int = 16) -> int:
        """A guest address of ``size`` free bytes aligned to ``align``."""
        size = max(size, 1)
        for i, (start, length) in enumerate(self._free):
            aligned = -(-start // align) * align
            if aligned + size <= start + length:
                pieces = []
                if aligned > start:
                    pieces.append((start, aligned - start))
                if aligned + size < start + length:
                    pieces.append((aligned + size, start + length - aligned - size))
                self._free[i : i + 1] = pieces
                return aligned
        raise MemoryError(f"guest RAM exhausted allocating {size} bytes")

    def free(self, addr: int, size: int) -> None:
        size = max(size, 1)
        self._free.append((addr, size))
        self._free.sort()
        merged: list[tuple[int, int]] = []
        for start, length in self._free:
            if merged and merged[-1][0] + merged[-1][1] == start:
                merged[-1] = (merged[-1][0], merged[-1][1] + length)
            else:
                merged.append((start, length))
        self._free = merged
