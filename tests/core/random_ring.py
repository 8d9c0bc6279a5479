"""Random split rings in a bytearray standing for guest RAM, for the tests that run the same ring
through the compiled fast path and through the Python path (test_fastpath_serve.py,
test_fastpath_fill.py): the layout (descriptor table, available and used rings, buffers from a
scratch area), the descriptor stores, the available ring, and a queue activated over it.

Invariant: a :class:`RingRam` draws from its ``rng`` only in its constructor (size, free order), so
each test's own draws keep their order.
"""

from __future__ import annotations

import random
import struct

from vdm.memory import FlatGuestMemory, MemoryRegion
from vdm.virtqueue import Virtqueue

BASE = 0x10000
RAM = 1 << 20
DESC_AT, AVAIL_AT, USED_AT = BASE, BASE + 0x4000, BASE + 0x6000
SCRATCH = BASE + 0x8000
DESC = struct.Struct("<QIHH")


class RingRam:
    """Guest RAM holding one ring of a random size (2..256), its descriptors free in random order."""

    def __init__(self, rng: random.Random) -> None:
        self.ram = bytearray(RAM)
        self.size = 1 << rng.randrange(1, 9)
        self.free = list(range(self.size))
        rng.shuffle(self.free)
        self.heads: list[int] = []  # the available ring's entries, in order
        self._scratch = SCRATCH

    def buf(self, n: int) -> int:
        """A fresh buffer of ``n`` bytes (its guest address)."""
        at = self._scratch
        self._scratch += (n + 15) & ~15
        return at

    def desc(self, i: int, addr: int, n: int, flags: int, nxt: int) -> None:
        """Descriptor ``i`` of the ring's table."""
        DESC.pack_into(self.ram, DESC_AT - BASE + 16 * i, addr, n, flags, nxt)

    def entry(self, table: int, k: int, addr: int, n: int, flags: int, nxt: int) -> None:
        """Entry ``k`` of an indirect table at guest address ``table``."""
        DESC.pack_into(self.ram, table - BASE + 16 * k, addr, n, flags, nxt)

    def offer(self, last: int, offered: int) -> None:
        """The available ring: ``heads`` from ``last`` on, its index ``offered`` past ``last``."""
        avail = bytearray(4 + 2 * self.size)
        for k, h in enumerate(self.heads[: self.size]):
            struct.pack_into("<H", avail, 4 + 2 * ((last + k) % self.size), h)
        struct.pack_into("<HH", avail, 0, 0, (last + offered) & 0xFFFF)
        self.ram[AVAIL_AT - BASE : AVAIL_AT - BASE + len(avail)] = avail


def queue_on(
    ram: bytearray, size: int, last: int, *, event_idx: bool, budget: int | None, split: int = 0
) -> Virtqueue:
    """A ready queue over ``ram``'s ring, next available and used index ``last``; ``split``: guest
    RAM as two regions, the second from that offset; ``budget``: the walk budget, if any."""
    view = memoryview(ram)
    if split:
        memory = FlatGuestMemory([MemoryRegion(BASE, view[:split]), MemoryRegion(BASE + split, view[split:])])
    else:
        memory = FlatGuestMemory([MemoryRegion(BASE, ram)])
    q = Virtqueue(0, 256)
    q.set_size(size)
    q.set_addresses(DESC_AT, AVAIL_AT, USED_AT)
    q.restore(last, last)
    q.set_ready(True)
    q.activate(memory, event_idx=event_idx, indirect=True)
    if budget is not None:
        q.limit_walk(budget)
    return q
