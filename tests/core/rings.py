"""Helpers for virtqueue tests: raw ring access through a :class:`VirtioTestDriver`.

The test driver keeps its own copy of the ring layout (:class:`vdm.testing.driver.DriverQueue`);
these helpers read and write the ring fields a hostile or unusual driver would touch.
"""

from __future__ import annotations

import struct

from vdm.testing import VirtioTestDriver

DESC = struct.Struct("<QIHH")
NEXT, WRITE, INDIRECT = 1, 2, 4


def used_event_addr(drv: VirtioTestDriver, qi: int) -> int:
    q = drv.queues[qi]
    return q.avail + 4 + 2 * q.size


def set_used_event(drv: VirtioTestDriver, qi: int, value: int) -> None:
    drv.ram.write(used_event_addr(drv, qi), struct.pack("<H", value & 0xFFFF))


def set_avail_flags(drv: VirtioTestDriver, qi: int, flags: int) -> None:
    drv.ram.write(drv.queues[qi].avail, struct.pack("<H", flags))


def used_flags(drv: VirtioTestDriver, qi: int) -> int:
    return struct.unpack("<H", drv.ram.read(drv.queues[qi].used, 2))[0]


def used_elem(drv: VirtioTestDriver, qi: int, slot: int) -> tuple[int, int]:
    q = drv.queues[qi]
    return struct.unpack("<II", drv.ram.read(q.used + 4 + 8 * (slot % q.size), 8))


def write_table(drv: VirtioTestDriver, addr: int, descs: list[tuple[int, int, int, int]]) -> None:
    """Write an indirect descriptor table of (addr, len, flags, next) at guest ``addr``."""
    drv.ram.write(addr, b"".join(DESC.pack(*d) for d in descs))
