"""What a driver on another CPU sees of the ring fields the device writes, while it writes them.

A guest's driver reads ``used.idx`` and ``avail_event`` at any moment, from another CPU. Each
store the device makes to these fields must therefore take the field from its old value straight
to its new one: an index that reads as anything else for a moment (``struct.pack_into`` zeroes its
target before it writes the value) sends the driver into used-ring slots the device never filled
-- Linux then reports ``id N is not a head!`` and stops the queue.

A forked watcher process (its own interpreter, so no GIL between it and the device) spins on the
fields of a ring in shared memory while the device pops and pushes as fast as it can, and records
every value that went backwards, and every used index whose element was not yet written.
"""

from __future__ import annotations

import ast
import mmap
import os
import struct
import time

import pytest
from vdm import ring_layout as rl
from vdm.memory import FlatGuestMemory, MemoryRegion
from vdm.virtqueue import VIRTQ_DESC_F_WRITE, Virtqueue

BASE = 0x1000_0000
SIZE = 256
DESC, AVAIL, USED, BUFS = 0x0, 0x1000, 0x2000, 0x10000
STOP = 0x3000  # one byte: the device tells the watcher to stop
#: heads are pushed in a scrambled order, so a stale slot holds a different head than a fresh one
STRIDE = 7

pytestmark = pytest.mark.skipif(
    (os.cpu_count() or 1) < 2, reason="the watcher needs a second CPU to run while the device writes"
)


def _ring(event_idx: bool) -> tuple[mmap.mmap, Virtqueue]:
    mm = mmap.mmap(-1, 1 << 20)  # MAP_SHARED | MAP_ANONYMOUS: the forked watcher sees our stores
    for i in range(SIZE):
        rl.DESC.pack_into(mm, DESC + rl.desc_offset(i), BASE + BUFS + 64 * i, 64, VIRTQ_DESC_F_WRITE, 0)
    q = Virtqueue(0, SIZE)
    q.set_desc_addr(BASE + DESC)
    q.set_avail_addr(BASE + AVAIL)
    q.set_used_addr(BASE + USED)
    q.set_ready(True)
    q.activate(FlatGuestMemory([MemoryRegion(BASE, mm)]), event_idx=event_idx, indirect=False)
    return mm, q


def _backwards(old: int, new: int) -> bool:
    """``new`` lies behind ``old`` (a 16-bit index that only ever moves forward)."""
    return (new - old) & 0xFFFF > 0x8000


def _watch(mm: mmap.mmap, report_fd: int, batch: int) -> None:
    """The watcher (child process): record every step back, every unwritten element, and every
    used index that is not a whole number of batches (part of a push_many published).

    A value that looks behind the last one is counted only if the next read is ahead of the last
    one again, i.e. it was a passing value; a real jump of more than half the index range (the
    watcher was descheduled for a long time) becomes the new reference instead.
    """
    u16 = struct.Struct("<H")
    elem = rl.USED_ELEM
    used_at, event_at = USED + rl.USED_IDX, USED + rl.avail_event_offset(SIZE)
    last = {used_at: u16.unpack_from(mm, used_at)[0], event_at: u16.unpack_from(mm, event_at)[0]}
    steps_back = {used_at: 0, event_at: 0}
    reads = early = partial = 0
    first: list[str] = []
    name = {used_at: "used.idx", event_at: "avail_event"}
    while not mm[STOP]:
        for _ in range(2000):
            reads += 1
            for at in (used_at, event_at):
                value = u16.unpack_from(mm, at)[0]
                if _backwards(last[at], value):
                    after = u16.unpack_from(mm, at)[0]
                    if not _backwards(last[at], after):
                        steps_back[at] += 1
                        if len(first) < 6:
                            first.append(f"{name[at]} {last[at]} -> {value} -> {after}")
                        value = after
                if at == used_at and value != last[at] and value % batch:
                    partial += 1
                    if len(first) < 6:
                        first.append(f"used.idx {value}: not a multiple of the batch ({batch})")
                if at == used_at and value != last[at]:
                    head, _ = elem.unpack_from(mm, USED + rl.used_elem_offset((value - 1) % SIZE))
                    again = u16.unpack_from(mm, used_at)[0]
                    # (skip the check if the device lapped the ring while we looked)
                    if head != (value - 1) * STRIDE % SIZE and (again - value) & 0xFFFF < SIZE - 1:
                        early += 1
                        if len(first) < 6:
                            first.append(f"used.idx {value}: element holds head {head}")
                last[at] = value
    report = (reads, steps_back[used_at], steps_back[event_at], early, partial, first)
    os.write(report_fd, repr(report).encode())


def _drive(mm: mmap.mmap, q: Virtqueue, seconds: float, batch: int) -> int:
    """Driver and device in one (this process): offer heads, pop them, push them back."""
    avail = 0
    pushed = 0
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        for _ in range(50):
            for _ in range(batch):
                slot = AVAIL + rl.avail_slot_offset(avail % SIZE)
                struct.pack_into("<H", mm, slot, (avail * STRIDE) % SIZE)
                avail = (avail + 1) & 0xFFFF
            struct.pack_into("<H", mm, AVAIL + rl.AVAIL_IDX, avail)
            chains = [q.pop() for _ in range(batch)]
            assert all(c is not None for c in chains)
            if batch == 1:
                q.push(chains[0], 1)  # type: ignore[arg-type]
            else:
                q.push_many([(c, 1) for c in chains])  # type: ignore[misc]
            q.should_notify()
            q.set_notification(True)
            pushed += batch
    return pushed


@pytest.mark.parametrize("batch", [1, 4], ids=["push", "push_many"])
def test_a_driver_on_another_cpu_never_sees_an_index_step_back(batch):
    mm, q = _ring(event_idx=True)
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the watcher process
        try:
            os.close(r)
            _watch(mm, w, batch)
        finally:
            os._exit(0)
    os.close(w)
    try:
        time.sleep(0.05)  # let the watcher start spinning
        pushed = _drive(mm, q, 1.5, batch)
    finally:
        mm[STOP] = 1
        report = b""
        while chunk := os.read(r, 4096):
            report += chunk
        os.close(r)
        os.waitpid(pid, 0)
    reads, backwards_used, backwards_event, early, partial, first = ast.literal_eval(report.decode())
    assert pushed > 10_000 and reads > 10_000, f"too little happened to tell ({pushed} pushes, {reads} reads)"
    assert (backwards_used, backwards_event, early, partial) == (0, 0, 0, 0), (
        f"in {reads} reads during {pushed} pushes the watcher saw used.idx step back {backwards_used} times, "
        f"avail_event {backwards_event} times, an unwritten element {early} times, part of a batch "
        f"{partial} times; first: {first}"
    )
