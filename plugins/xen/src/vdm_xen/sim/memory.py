"""The simulated guest's RAM: a memfd, so that foreign and grant mappings are real shared mappings."""

from __future__ import annotations

import mmap
import os

from vdm.memory import FlatGuestMemory, MemoryRegion
from vdm.testing.memory import CANARY, GUARD, GuestRam

from ..abi import PAGE_SIZE


class SimGuestRam(GuestRam):
    """:class:`GuestRam` over a memfd, so that foreign mappings are real shared mappings of it."""

    def __init__(self, size: int = 16 << 20, base: int = 0x4000_0000) -> None:
        self.base = base
        self.size = size
        self.fd = os.memfd_create("sim-guest-ram", os.MFD_CLOEXEC)
        os.ftruncate(self.fd, size + 2 * GUARD)
        self._mm = mmap.mmap(self.fd, size + 2 * GUARD)
        self._mm[:GUARD] = bytes([CANARY]) * GUARD
        self._mm[GUARD + size :] = bytes([CANARY]) * GUARD
        self._host = memoryview(self._mm)
        self.region = MemoryRegion(base, self._host[GUARD : GUARD + size])
        self.memory = FlatGuestMemory([self.region])
        self._free = [(base, size)]

    def file_offset(self, pfn: int) -> int | None:
        """Where guest page ``pfn`` lives in the memfd, or None if it is not RAM."""
        addr = pfn * PAGE_SIZE
        if self.base <= addr and addr + PAGE_SIZE <= self.base + self.size:
            return GUARD + addr - self.base
        return None
