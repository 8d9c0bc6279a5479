"""Helpers for virtqueue tests: raw ring fields a hostile or unusual driver touches.

Thin names over :class:`vdm.testing.ring.DriverRing` (the one driver-side ring, which each
:class:`VirtioTestDriver` queue is) and :mod:`vdm.ring_layout`; no layout is declared here.
"""

from __future__ import annotations

from vdm.ring_layout import VIRTQ_DESC_F_INDIRECT as INDIRECT
from vdm.ring_layout import VIRTQ_DESC_F_NEXT as NEXT
from vdm.ring_layout import VIRTQ_DESC_F_WRITE as WRITE
from vdm.testing import VirtioTestDriver, ring

__all__ = [
    "INDIRECT",
    "NEXT",
    "WRITE",
    "set_avail_flags",
    "set_used_event",
    "used_elem",
    "used_flags",
    "write_table",
]


def set_used_event(drv: VirtioTestDriver, qi: int, value: int) -> None:
    drv.queues[qi].set_used_event(value)


def set_avail_flags(drv: VirtioTestDriver, qi: int, flags: int) -> None:
    drv.queues[qi].set_avail_flags(flags)


def used_flags(drv: VirtioTestDriver, qi: int) -> int:
    return drv.queues[qi].used_flags()


def used_elem(drv: VirtioTestDriver, qi: int, slot: int) -> tuple[int, int]:
    return drv.queues[qi].used_elem(slot)


def write_table(drv: VirtioTestDriver, addr: int, descs: list[tuple[int, int, int, int]]) -> None:
    """Write an indirect descriptor table of (addr, len, flags, next) at guest ``addr``."""
    ring.write_table(drv.ram, addr, descs)
