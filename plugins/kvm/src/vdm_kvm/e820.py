"""The BIOS e820 memory map handed to Linux in the zero page.

The map for a vdm guest (see :mod:`vdm_kvm.layout`): RAM from 0 to 0x9fc00 (what real-mode
trampolines and the EBDA convention expect), reserved from there to 1 MiB (EBDA, the BIOS area
where the ACPI tables live), RAM from 1 MiB up to the 32-bit MMIO hole, RAM again above 4 GiB for
the rest. Each entry is 20 bytes: ``u64 addr, u64 size, u32 type``.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Iterable

__all__ = ["E820_ACPI", "E820_RAM", "E820_RESERVED", "MAX_ENTRIES", "E820Entry", "pack", "unpack"]

E820_RAM = 1
E820_RESERVED = 2
E820_ACPI = 3
E820_NVS = 4
#: boot_params.e820_table has room for this many entries
MAX_ENTRIES = 128
_ENTRY = struct.Struct("<QQI")


@dataclass(frozen=True)
class E820Entry:
    addr: int
    size: int
    type: int

    @property
    def end(self) -> int:
        return self.addr + self.size


def build(ram: Iterable[tuple[int, int]], reserved: Iterable[tuple[int, int]] = ()) -> list[E820Entry]:
    """A sorted map from RAM ranges and reserved ranges, each ``(addr, size)``; overlaps are errors."""
    entries = [E820Entry(a, s, E820_RAM) for a, s in ram if s > 0]
    entries += [E820Entry(a, s, E820_RESERVED) for a, s in reserved if s > 0]
    entries.sort(key=lambda e: e.addr)
    for a, b in zip(entries, entries[1:]):
        if a.end > b.addr:
            raise ValueError(f"e820 entries overlap: {a} and {b}")
    if len(entries) > MAX_ENTRIES:
        raise ValueError("too many e820 entries")
    return entries


def pack(entries: Iterable[E820Entry]) -> bytes:
    return b"".join(_ENTRY.pack(e.addr, e.size, e.type) for e in entries)


def unpack(data: bytes, count: int) -> list[E820Entry]:
    if count > MAX_ENTRIES or len(data) < count * _ENTRY.size:
        raise ValueError("bad e820 table")
    return [E820Entry(*_ENTRY.unpack_from(data, i * _ENTRY.size)) for i in range(count)]
