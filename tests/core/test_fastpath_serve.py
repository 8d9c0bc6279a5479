"""vdm.fastpath's serve_batch (a device's compiled step taking, serving and publishing chains in C)
against the Python path, the reference, without any one device.

A device's step here is a Python function made callable from C (``ffi.callback`` of ring.c's
``vdm_serve_fn``): it serves a chain by a rule of its buffers' lengths (or declines it), marks the
first byte of each writable buffer and reports a length written. The same rule serves, in Python,
every chain the queue's ``pop`` gives (the device's Python path), so a queue that runs the compiled
batch first, then ``pop`` for whatever it left, must end exactly as one that pops everything:
same used elements in the same order, same guest RAM (buffers, avail_event, used ring), same
counters and walk budget, same error. Rings are random mixes of plain chains, indirect tables and
hostile ones (buffers outside guest RAM, loops, readable after writable, heads offered twice).
"""

from __future__ import annotations

import random
import struct

import pytest
import vdm.fastpath as fastpath
from vdm.memory import FlatGuestMemory, MemoryRegion
from vdm.virtqueue import Virtqueue, VirtqueueError

from tests.core.random_ring import AVAIL_AT, BASE, DESC, DESC_AT, RAM, SCRATCH, USED_AT, RingRam, queue_on

pytestmark = pytest.mark.skipif(
    not fastpath.BUILT, reason=f"the compiled fast path is not built here: {fastpath.STATUS}"
)


def rule(lengths: list[int], nr: int) -> tuple[int, int]:
    """(class 1..4, length written) for a chain the step serves; class 0: declined."""
    total = sum(lengths)
    if total % 3 == 0:
        return 0, 0
    return 1 + len(lengths) % 4, (sum(lengths[nr:]) + total) % 5000


def _layout(seed: int):
    rng = random.Random(seed)
    r = RingRam(rng)
    ram, size, free, heads, buf, desc = r.ram, r.size, r.free, r.heads, r.buf, r.desc

    while free and len(heads) < size:
        kind = rng.random()
        lens = [rng.choice([16, 512, 100, 1, 7]) for _ in range(rng.randint(1, 4))]
        nr = rng.randint(0, len(lens))
        if kind < 0.25 and len(free) >= 1:  # through an indirect table
            table = buf(16 * len(lens))
            for k, n in enumerate(lens):
                flags = (1 if k + 1 < len(lens) else 0) | (2 if k >= nr else 0)
                r.entry(table, k, buf(n), n, flags, k + 1)
            if rng.random() < 0.1:  # hostile inside the table: a loop
                r.entry(table, 0, SCRATCH, 1, 1, 0)
            head = free.pop()
            desc(head, table, 16 * len(lens), 4, 0)
            heads.append(head)
            continue
        if len(lens) > len(free):
            break
        idxs = [free.pop() for _ in lens]
        for k, (i, n) in enumerate(zip(idxs, lens)):
            flags = (1 if k + 1 < len(lens) else 0) | (2 if k >= nr else 0)
            addr = buf(n)
            if rng.random() < 0.03:
                addr = BASE + RAM - 2  # straddles the end of guest RAM
            if rng.random() < 0.02:
                flags ^= 2  # readable after writable (or the other way)
            desc(i, addr, n, flags, idxs[k + 1] if k + 1 < len(idxs) else 0)
        if rng.random() < 0.02:
            desc(idxs[-1], SCRATCH, 1, 1, idxs[0])  # a loop
        heads.append(idxs[0])
    if heads and rng.random() < 0.05:
        heads.insert(rng.randrange(len(heads)), heads[0])  # a head offered twice
    last = rng.randrange(1 << 16)
    r.offer(last, min(len(heads), size))
    budget = rng.choice([None, None, rng.randrange(1, 40)])
    return ram, size, rng.random() < 0.5, last, budget


def _serve_python(chain) -> int:
    """The device's Python path: the rule, through the chain's views."""
    views = chain.readable + chain.writable
    kind, written = rule([len(v) for v in views], len(chain.readable))
    for v in chain.writable:
        if kind and len(v):
            v[0] = 0x5A
    return written if kind else 0


def _run(compiled: bool | str, seed: int, monkeypatch, split: int = 0) -> dict:
    """``split``: guest RAM as two regions, the second from that offset (the C step looks buffers
    up in the region table, as FlatGuestMemory.map does; a buffer across the edge is Python's).
    ``compiled`` "end": serve_compiled_end, which also ends the batch when it leaves nothing to pop
    (the interrupt decision from a random used_event / NO_INTERRUPT flag and "last signalled")."""
    monkeypatch.setattr(fastpath, "ACTIVE", bool(compiled))
    ram, size, event_idx, last, budget = _layout(seed)
    rng = random.Random(seed * 7 + 1)  # (the driver's used_event / NO_INTERRUPT, the device's state)
    struct.pack_into("<H", ram, AVAIL_AT - BASE, rng.choice([0, 0, 1]))
    struct.pack_into("<H", ram, AVAIL_AT - BASE + 4 + 2 * size, (last + rng.randrange(-3, 8)) & 0xFFFF)
    pushed, signalled = rng.random() < 0.3, rng.choice([None, (last + rng.randrange(-4, 4)) & 0xFFFF])
    q = queue_on(ram, size, last, event_idx=event_idx, budget=budget, split=split)
    q._pushed = pushed
    if signalled is not None:
        q.signalled_used, q.signalled_valid = signalled, True
    ffi = fastpath._ffi
    kinds = [0, 0, 0, 0]

    @ffi.callback("vdm_serve_fn")
    def step(ctx, ent, n, nr, written):
        lengths = [ent[2 * k + 1] for k in range(n)]
        kind, w = rule(lengths, nr)
        if kind:
            for k in range(nr, n):
                if lengths[k]:
                    ffi.cast("uint8_t *", ent[2 * k])[0] = 0x5A
            written[0] = w
        return kind

    outcome = end = None
    try:
        while True:
            if compiled == "end":
                ended = q.serve_compiled_end(step, ffi.NULL)
                assert ended is not None
                kinds = [a + b for a, b in zip(kinds, ended[0])]
                if ended[1] is not None:
                    end = ended[1]
                    break
            elif compiled:
                got = q.serve_compiled(step, ffi.NULL)
                assert got is not None
                kinds = [a + b for a, b in zip(kinds, got)]
            chain = q.pop()
            if chain is None:
                break
            q.push(chain, _serve_python(chain))
    except VirtqueueError as e:
        outcome = str(e)
    notify, more = end if end is not None else q.complete_batch([])
    counters = (q.errors, q.descriptors_walked, q.requests, q.bytes_read, q.bytes_written, sum(q.latency),
                q.last_avail_idx, q.in_flight, q.walk_spent(), q.used_idx, q.signalled_used,
                q.signalled_valid, q._pushed, q.latency_sum_ns > 0 or not q.requests)  # fmt: skip
    return {
        "outcome": outcome,
        "counters": counters,
        "ram": bytes(ram),
        "end": (notify, more),
        "kinds": kinds,
    }


@pytest.mark.parametrize("mode", [True, "end"], ids=["serve_compiled", "serve_compiled_end"])
@pytest.mark.parametrize("regions", [1, 2])
@pytest.mark.parametrize("block", range(4))
def test_compiled_batches_end_as_python_pops_do(block, regions, mode, monkeypatch):
    served = errors = notified = 0
    for seed in range(block * 200, block * 200 + 200):
        split = 0 if regions == 1 else SCRATCH - BASE + 0x1000 + 16 * (seed % 300)
        python = _run(False, seed, monkeypatch, split)
        compiled = _run(mode, seed, monkeypatch, split)
        served += sum(compiled.pop("kinds"))
        python.pop("kinds")
        assert compiled == python, f"seed {seed}"
        errors += python["outcome"] is not None
        notified += python["end"][0]
    # both the C batch and the errors it leaves were compared, and interrupts both wanted and not
    assert served > 300 and errors > 10 and 20 < notified < 180


def test_serve_compiled_declines_without_the_compiled_path(monkeypatch):
    monkeypatch.setattr(fastpath, "ACTIVE", False)
    memory = FlatGuestMemory([MemoryRegion(BASE, bytearray(RAM))])
    q = Virtqueue(0, 8)
    q.set_size(8)
    q.set_addresses(DESC_AT, AVAIL_AT, USED_AT)
    q.set_ready(True)
    q.activate(memory, event_idx=False, indirect=False)
    assert q.serve_compiled(None, None) is None


class _Tracker:
    """A QueueTracker that records what it is told; ``idle`` as the test sets it."""

    def __init__(self, idle: bool) -> None:
        self.idle = idle
        self.calls: list[str] = []

    def taken(self, head: int) -> None:
        self.calls.append("taken")

    def completing(self, heads: list[int]) -> None:
        self.calls.append("completing")

    def completed(self, heads: list[int], used_idx: int) -> None:
        self.calls.append("completed")

    def reset(self) -> None:
        pass


@pytest.mark.parametrize("idle", [True, False])
def test_a_tracker_with_something_to_record_keeps_the_python_path(idle, monkeypatch):
    monkeypatch.setattr(fastpath, "ACTIVE", True)
    ram = bytearray(RAM)
    DESC.pack_into(ram, DESC_AT - BASE, SCRATCH, 512, 2, 0)  # one writable buffer
    struct.pack_into("<HHH", ram, AVAIL_AT - BASE, 0, 1, 0)
    tracker = _Tracker(idle)
    q = Virtqueue(0, 8, tracker=tracker)
    q.set_size(8)
    q.set_addresses(DESC_AT, AVAIL_AT, USED_AT)
    q.set_ready(True)
    q.activate(FlatGuestMemory([MemoryRegion(BASE, ram)]), event_idx=False, indirect=False)

    @fastpath._ffi.callback("vdm_serve_fn")
    def step(ctx, ent, n, nr, written):
        written[0] = 7
        return 1

    got = q.serve_compiled(step, fastpath._ffi.NULL)
    if idle:  # nothing to record: served in C, the tracker not called
        assert got == [1, 0, 0, 0] and tracker.calls == [] and q.used_idx == 1
    else:  # the Python path takes the chain and tells the tracker
        assert got is None and q.used_idx == 0
        chain = q.pop()
        q.push(chain, 7)
        assert tracker.calls == ["taken", "completing", "completed"]
    assert struct.unpack_from("<HHII", ram, USED_AT - BASE) == (0, 1, 0, 7)
