"""The driver's side of one split virtqueue, for tests: the one implementation every test driver uses.

A :class:`DriverRing` does in guest memory what a virtio driver does with a split ring (virtio
1.2, 2.7.13): lay out the descriptor table and the two rings, write descriptor chains (directly or
through an indirect table), make heads available, and read back the used elements. The layout
comes from :mod:`vdm.ring_layout`.

:class:`vdm.testing.VirtioTestDriver` (virtio-mmio and virtio-pci) keeps one per queue, and so do
the project's vhost-user test frontend and its hostile-guest helpers; only how a queue is
configured and kicked differs between them. The raw helpers (:meth:`DriverRing.write_desc`,
:meth:`DriverRing.publish` with ``bump``, :meth:`DriverRing.set_used_event`, ...) let tests build
rings no well-behaved driver would.

Invariants: every descriptor index is either in :attr:`DriverRing.free_desc` or part of exactly
one chain in :attr:`DriverRing.inflight` (keyed by its head), as long as only :meth:`add` and
:meth:`collect` are used; :meth:`collect` frees a chain's descriptors and buffers when the device
returns its head, and raises AssertionError for a head that was not in flight (the device gave
back something the driver never gave). Writable buffers are poisoned with 0xee, so a test sees
which bytes the device did not write.
"""

from __future__ import annotations

import struct
import time
from dataclasses import dataclass
from typing import Callable, Protocol, Sequence

from ..ring_layout import (
    AVAIL_ALIGN,
    AVAIL_FLAGS,
    AVAIL_IDX,
    DESC,
    DESC_ALIGN,
    USED_ALIGN,
    USED_ELEM,
    USED_FLAGS,
    USED_IDX,
    VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
    avail_event_offset,
    avail_ring_size,
    avail_slot_offset,
    desc_offset,
    desc_table_size,
    used_elem_offset,
    used_event_offset,
    used_ring_size,
)

__all__ = ["DriverRing", "RingMemory", "Used", "write_table"]

_U16 = struct.Struct("<H")
#: the byte writable buffers are filled with before the device sees them
POISON = 0xEE


class RingMemory(Protocol):
    """What a :class:`DriverRing` needs of guest memory: raw access and an allocator."""

    def read(self, addr: int, length: int) -> bytes: ...

    def write(self, addr: int, data: bytes) -> None: ...

    def alloc(self, size: int, align: int = 16) -> int: ...

    def free(self, addr: int, size: int) -> None: ...


@dataclass
class Used:
    """A used buffer as the driver sees it."""

    head: int
    written: int
    #: the device-writable buffers' whole contents, concatenated (bytes the device did not write
    #: keep the driver's 0xee poison)
    data: bytes


class DriverRing:
    """Queue ``index`` of ``size`` entries, its three areas at ``desc``, ``avail``, ``used``."""

    def __init__(self, ram: RingMemory, index: int, size: int, desc: int, avail: int, used: int) -> None:
        self.ram = ram
        self.index = index
        self.size = size
        self.desc = desc
        self.avail = avail
        self.used = used
        #: the driver's next available index (what it publishes in ``avail.idx``)
        self.avail_idx = 0
        #: the used index up to which :meth:`collect` has read
        self.last_used = 0
        self.free_desc: list[int] = list(range(size))
        #: head -> (descriptor indexes, [(addr, len)] allocations, [(addr, len)] writable buffers)
        self.inflight: dict[int, tuple[list[int], list[tuple[int, int]], list[tuple[int, int]]]] = {}

    @classmethod
    def allocate(cls, ram: RingMemory, index: int, size: int) -> DriverRing:
        """Allocate the three areas in ``ram``, zeroed, as a driver does before enabling a queue."""
        areas = []
        for length, align in (
            (desc_table_size(size), DESC_ALIGN),
            (avail_ring_size(size), AVAIL_ALIGN),
            (used_ring_size(size), USED_ALIGN),
        ):
            addr = ram.alloc(length, align)
            ram.write(addr, bytes(length))
            areas.append(addr)
        return cls(ram, index, size, *areas)

    # ---- raw fields ------------------------------------------------------------------------------

    def write_desc(self, index: int, addr: int, length: int, flags: int, next_: int) -> None:
        """Write descriptor ``index`` of the table directly (for hand-made, hostile rings)."""
        self.ram.write(self.desc + desc_offset(index), DESC.pack(addr, length, flags, next_))

    def read_desc(self, index: int) -> tuple[int, int, int, int]:
        """(addr, len, flags, next) of descriptor ``index``."""
        return DESC.unpack(self.ram.read(self.desc + desc_offset(index), DESC.size))

    def write_table(self, addr: int, descs: Sequence[tuple[int, int, int, int]]) -> None:
        """Write an indirect table of (addr, len, flags, next) descriptors at guest ``addr``."""
        write_table(self.ram, addr, descs)

    def publish(self, head: int, *, bump: int = 1, used_event: bool = False) -> None:
        """Put ``head`` in the next available slot and move ``avail.idx`` on by ``bump``.

        ``used_event``: first set ``used_event`` to :attr:`last_used` (with EVENT_IDX: interrupt me
        for every used buffer). The index is written last, as a driver must (2.7.13.3).
        """
        self.ram.write(self.avail + avail_slot_offset(self.avail_idx % self.size), _U16.pack(head))
        self.avail_idx = (self.avail_idx + bump) & 0xFFFF
        if used_event:
            self.set_used_event(self.last_used)
        self.ram.write(self.avail + AVAIL_IDX, _U16.pack(self.avail_idx))

    def set_used_event(self, value: int) -> None:
        self.ram.write(self.avail + used_event_offset(self.size), _U16.pack(value & 0xFFFF))

    def set_avail_flags(self, flags: int) -> None:
        self.ram.write(self.avail + AVAIL_FLAGS, _U16.pack(flags))

    def used_idx(self) -> int:
        return _U16.unpack(self.ram.read(self.used + USED_IDX, 2))[0]

    def used_flags(self) -> int:
        return _U16.unpack(self.ram.read(self.used + USED_FLAGS, 2))[0]

    def used_elem(self, slot: int) -> tuple[int, int]:
        """(id, len) of used element ``slot`` (taken modulo the size)."""
        return USED_ELEM.unpack(self.ram.read(self.used + used_elem_offset(slot % self.size), USED_ELEM.size))

    def avail_event(self) -> int:
        return _U16.unpack(self.ram.read(self.used + avail_event_offset(self.size), 2))[0]

    # ---- chains ------------------------------------------------------------------------------------

    def add(
        self,
        out: Sequence[bytes] = (),
        in_lens: Sequence[int] = (),
        *,
        indirect: bool = False,
        out_align: int = 8,
        in_align: int = 8,
        used_event: bool = False,
    ) -> int:
        """Put a chain of device-readable ``out`` buffers and device-writable buffers of ``in_lens``
        bytes on the available ring (no kick); ``indirect``: through one indirect table. Returns
        the head. Raises RuntimeError (and allocates nothing) when descriptors are short."""
        ram = self.ram
        allocs: list[tuple[int, int]] = []
        bufs: list[tuple[int, int, int]] = []
        writable: list[tuple[int, int]] = []
        for data in out:
            addr = ram.alloc(len(data), out_align)
            ram.write(addr, data)
            allocs.append((addr, len(data)))
            bufs.append((addr, len(data), 0))
        for n in in_lens:
            addr = ram.alloc(n, in_align)
            ram.write(addr, bytes([POISON]) * n)
            allocs.append((addr, n))
            bufs.append((addr, n, VIRTQ_DESC_F_WRITE))
            writable.append((addr, n))
        if not bufs:
            raise ValueError("a descriptor chain needs at least one buffer")
        if indirect:
            table = ram.alloc(desc_table_size(len(bufs)), DESC_ALIGN)
            allocs.append((table, desc_table_size(len(bufs))))
            self.write_table(table, _linked(bufs, list(range(len(bufs)))))
            bufs = [(table, desc_table_size(len(bufs)), VIRTQ_DESC_F_INDIRECT)]
        if len(bufs) > len(self.free_desc):
            for a in allocs:
                ram.free(*a)
            raise RuntimeError(f"queue {self.index}: no free descriptors")
        idxs = [self.free_desc.pop(0) for _ in bufs]
        for i, d in zip(idxs, _linked(bufs, idxs)):
            self.write_desc(i, *d)
        head = idxs[0]
        self.inflight[head] = (idxs, allocs, writable)
        self.publish(head, used_event=used_event)
        return head

    def collect(self, *, used_event: bool = False) -> list[Used]:
        """Every used buffer the device returned since the last call (their resources freed).

        ``used_event``: then set ``used_event`` to the new :attr:`last_used`."""
        ram = self.ram
        out: list[Used] = []
        idx = self.used_idx()
        while self.last_used != idx:
            head, written = self.used_elem(self.last_used)
            self.last_used = (self.last_used + 1) & 0xFFFF
            entry = self.inflight.pop(head, None)
            if entry is None:
                raise AssertionError(
                    f"queue {self.index}: device returned head {head} that was not in flight"
                )
            idxs, allocs, writable = entry
            data = b"".join(ram.read(a, n) for a, n in writable)
            for a in allocs:
                ram.free(*a)
            self.free_desc.extend(idxs)
            out.append(Used(head, written, data))
        if used_event:
            self.set_used_event(self.last_used)
        return out

    def wait(
        self,
        count: int,
        timeout: float,
        idle: Callable[[float], object] = lambda left: time.sleep(min(left, 0.0005)),
        *,
        used_event: bool = False,
        broken: Callable[[], str | None] = lambda: None,
    ) -> list[Used]:
        """:meth:`collect` until ``count`` used buffers arrived (a device may complete from its
        threads). Between looks ``idle(seconds left)`` waits (default: a short sleep; a frontend
        waits on its call eventfd). TimeoutError after ``timeout`` s, or at once when ``broken()``
        names a reason (a device that needs a reset will not complete anything)."""
        got: list[Used] = []
        deadline = time.monotonic() + timeout
        while True:
            got += self.collect(used_event=used_event)
            if len(got) >= count:
                return got
            left = deadline - time.monotonic()
            why = broken()
            if why or left <= 0:
                raise TimeoutError(
                    f"queue {self.index}: {len(got)} of {count} used buffers "
                    + (f"({why})" if why else f"after {timeout} s")
                )
            idle(left)


def write_table(ram: RingMemory, addr: int, descs: Sequence[tuple[int, int, int, int]]) -> None:
    """Write a table of (addr, len, flags, next) descriptors at guest ``addr`` (indirect, or hostile)."""
    ram.write(addr, b"".join(DESC.pack(*d) for d in descs))


def _linked(bufs: Sequence[tuple[int, int, int]], idxs: Sequence[int]) -> list[tuple[int, int, int, int]]:
    """(addr, len, flags, next) descriptors chaining ``bufs`` through the indexes ``idxs``."""
    out = []
    for n, (addr, length, flags) in enumerate(bufs):
        more = n + 1 < len(bufs)
        out.append((addr, length, flags | (VIRTQ_DESC_F_NEXT if more else 0), idxs[n + 1] if more else 0))
    return out
