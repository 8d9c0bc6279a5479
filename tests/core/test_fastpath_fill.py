"""vdm.fastpath's fill (one byte string scattered over as many available chains as it needs, taken,
filled and published in C: Virtqueue.fill_compiled) against the Python path, the reference.

The reference is what a device does with ``pop``: take chains in ring order until their writable
bytes hold the data (a chain with fewer than ``min_len`` writable bytes is handed back empty),
write the data over their writable buffers in order, store the number of chains at ``count_at``
and publish them with one ``push_many``; with too few chains it keeps what it took, as virtio-net
does while it waits for buffers. A queue that tries ``fill_compiled`` first for each string and
does the reference only when that took nothing must end exactly as one that always does the
reference: same guest RAM (buffers, used ring, avail_event), same counters and walk budget, same
error. Rings are random mixes of plain writable chains and hostile ones (readable buffers,
indirect tables, buffers outside guest RAM, loops, heads offered twice, chains too small).
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

MIN_LEN = 12
COUNT_AT = 10


def _layout(seed: int):
    rng = random.Random(seed)
    r = RingRam(rng)
    ram, size, free, heads, buf, desc = r.ram, r.size, r.free, r.heads, r.buf, r.desc

    while free and len(heads) < size:
        lens = [rng.choice([4096, 4096, 1500, 64, 700, 11, 0]) for _ in range(rng.choice([1, 1, 1, 2, 3]))]
        kind = rng.random()
        if kind < 0.05:  # through an indirect table (left to pop)
            table = buf(16 * len(lens))
            for k, n in enumerate(lens):
                r.entry(table, k, buf(n), n, (1 if k + 1 < len(lens) else 0) | 2, k + 1)
            head = free.pop()
            desc(head, table, 16 * len(lens), 4, 0)
            heads.append(head)
            continue
        if len(lens) > len(free):
            break
        idxs = [free.pop() for _ in lens]
        for k, (i, n) in enumerate(zip(idxs, lens)):
            flags = (1 if k + 1 < len(lens) else 0) | 2
            addr = buf(n)
            if rng.random() < 0.02:
                addr = BASE + RAM - 2  # straddles the end of guest RAM
            if k == 0 and rng.random() < 0.03:
                flags &= ~2  # a device-readable buffer first
            elif rng.random() < 0.01:
                flags &= ~2  # readable after writable
            desc(i, addr, n, flags, idxs[k + 1] if k + 1 < len(idxs) else 0)
        if rng.random() < 0.01:
            desc(idxs[-1], SCRATCH, 1, 3, idxs[0])  # a loop
        heads.append(idxs[0])
    if heads and rng.random() < 0.1:  # a head offered twice (next to itself: inside one fill, often)
        at = rng.randrange(len(heads))
        heads.insert(at + rng.choice([1, 1, 2, 5]), heads[at])
    last = rng.randrange(1 << 16)
    offered = min(len(heads), size)
    if rng.random() < 0.02:
        offered = size + 1 + rng.randrange(4)  # the index runs ahead
    r.offer(last, offered)
    budget = rng.choice([None, None, rng.randrange(1, 40)])
    strings = [rng.choice([60, 1514, 1542, 4096, 8042, 9000, 20000, 65000]) + rng.randrange(-8, 8)
               for _ in range(rng.randint(1, 12))]  # fmt: skip
    max_chains = rng.choice([64, 64, 1, 3])
    return ram, size, rng.random() < 0.5, last, budget, strings, max_chains


def _reference(q: Virtqueue, data: bytearray, length: int, max_chains: int, held: list) -> bool:
    """The device's Python path (virtio-net's _deliver); False when it waits for chains."""
    have = sum(len(v) for c in held for v in c.writable)
    while have < length and len(held) < max_chains:
        chain = q.pop()
        if chain is None:
            return False
        wlen = sum(len(v) for v in chain.writable)
        if wlen < MIN_LEN:
            q.push(chain, 0)
            continue
        held.append(chain)
        have += wlen
    if have < length:
        for chain in held:  # (virtio-net drops the frame and keeps the buffer: here, give it back)
            q.push(chain, 0)
        held.clear()
        return True
    struct.pack_into("<H", data, COUNT_AT, len(held))
    done, off = [], 0
    for chain in held:
        n = chain.write(bytes(data[off:length]), 0)
        done.append((chain, n))
        off += n
    held.clear()
    q.push_many(done)
    return True


def _run(compiled: bool, seed: int, monkeypatch, split: int = 0) -> dict:
    monkeypatch.setattr(fastpath, "ACTIVE", compiled)
    ram, size, event_idx, last, budget, strings, max_chains = _layout(seed)
    q = queue_on(ram, size, last, event_idx=event_idx, budget=budget, split=split)
    data = bytearray(70000)
    rng = random.Random(seed)
    filled = 0
    outcome = None
    held: list = []
    try:
        for length in strings:
            data[:length] = rng.randbytes(length)
            if compiled and not held:
                n = q.fill_compiled(data, length, max_chains=max_chains, min_len=MIN_LEN, count_at=COUNT_AT)
                assert n is not None
                if n:
                    filled += 1
                    continue
            if not _reference(q, data, length, max_chains, held):
                break
    except VirtqueueError as e:
        outcome = str(e)
    notify, more = q.complete_batch([])
    counters = (q.errors, q.descriptors_walked, q.requests, q.bytes_read, q.bytes_written, sum(q.latency),
                q.last_avail_idx, q.used_idx, q.in_flight, q.walk_spent())  # fmt: skip
    return {
        "outcome": outcome,
        "counters": counters,
        "ram": bytes(ram),
        "end": (notify, more),
        "filled": filled,
    }


@pytest.mark.parametrize("regions", [1, 2])
@pytest.mark.parametrize("block", range(4))
def test_compiled_fills_end_as_python_pops_do(block, regions, monkeypatch):
    filled = errors = 0
    for seed in range(block * 200, block * 200 + 200):
        split = 0 if regions == 1 else SCRATCH - BASE + 0x3000 + 16 * (seed % 300)
        python = _run(False, seed, monkeypatch, split)
        compiled = _run(True, seed, monkeypatch, split)
        filled += compiled.pop("filled")
        python.pop("filled")
        assert compiled == python, f"seed {seed}"
        errors += python["outcome"] is not None
    assert filled > 50 and errors > 5  # both the C fills and the errors they leave were compared


def _queue(ram: bytearray, size: int = 8, **kw) -> Virtqueue:
    q = Virtqueue(0, size, **kw)
    q.set_size(size)
    q.set_addresses(DESC_AT, AVAIL_AT, USED_AT)
    q.set_ready(True)
    q.activate(FlatGuestMemory([MemoryRegion(BASE, ram)]), event_idx=False, indirect=False)
    return q


def test_fill_compiled_declines_without_the_compiled_path(monkeypatch):
    monkeypatch.setattr(fastpath, "ACTIVE", False)
    q = _queue(bytearray(RAM))
    assert q.fill_compiled(bytearray(100), 100, max_chains=4) is None


def test_fill_is_all_or_nothing_and_stores_the_count(monkeypatch):
    monkeypatch.setattr(fastpath, "ACTIVE", True)
    ram = bytearray(RAM)
    for i in range(3):  # three 100-byte writable buffers
        DESC.pack_into(ram, DESC_AT - BASE + 16 * i, SCRATCH + 0x100 * i, 100, 2, 0)
    struct.pack_into("<HHHHH", ram, AVAIL_AT - BASE, 0, 3, 0, 1, 2)
    q = _queue(ram)
    data = bytearray(range(256)) * 2
    assert q.fill_compiled(data, 301, max_chains=8, count_at=COUNT_AT) == 0  # 300 bytes posted: none taken
    assert (q.last_avail_idx, q.used_idx, q.requests, q.in_flight) == (0, 0, 0, 0)
    assert ram[SCRATCH - BASE : SCRATCH - BASE + 0x300] == bytes(0x300)
    assert q.fill_compiled(data, 250, max_chains=2, count_at=COUNT_AT) == 0  # more than two chains
    assert q.fill_compiled(data, 250, max_chains=8, count_at=COUNT_AT) == 3
    assert data[COUNT_AT : COUNT_AT + 2] == b"\x03\x00"
    got = b"".join(ram[SCRATCH - BASE + 0x100 * i : SCRATCH - BASE + 0x100 * i + 100] for i in range(3))
    assert got[:250] == data[:250] and got[250:] == bytes(50)
    assert struct.unpack_from("<HH6I", ram, USED_AT - BASE) == (0, 3, 0, 100, 1, 100, 2, 50)
    assert (q.last_avail_idx, q.used_idx, q.requests, q.bytes_written, q.in_flight) == (3, 3, 3, 250, 0)
    with pytest.raises(ValueError):
        q.fill_compiled(data, len(data) + 1, max_chains=8)


@pytest.mark.parametrize("idle", [True, False])
def test_a_tracker_with_something_to_record_keeps_the_python_path(idle, monkeypatch):
    monkeypatch.setattr(fastpath, "ACTIVE", True)

    class Tracker:
        def __init__(self) -> None:
            self.idle = idle

        def taken(self, head: int) -> None: ...
        def completing(self, heads: list[int]) -> None: ...
        def completed(self, heads: list[int], used_idx: int) -> None: ...
        def reset(self) -> None: ...

    ram = bytearray(RAM)
    DESC.pack_into(ram, DESC_AT - BASE, SCRATCH, 512, 2, 0)
    struct.pack_into("<HHH", ram, AVAIL_AT - BASE, 0, 1, 0)
    q = _queue(ram, tracker=Tracker())
    assert q.fill_compiled(bytearray(100), 100, max_chains=4) == (1 if idle else None)


def test_a_head_the_device_holds_is_left_for_pop_to_reject(monkeypatch):
    monkeypatch.setattr(fastpath, "ACTIVE", True)
    ram = bytearray(RAM)
    for i in range(2):
        DESC.pack_into(ram, DESC_AT - BASE + 16 * i, SCRATCH + 0x1000 * i, 4096, 2, 0)
    struct.pack_into("<HHHHH", ram, AVAIL_AT - BASE, 0, 3, 0, 1, 0)  # head 0 offered again third
    q = _queue(ram)
    held = q.pop()
    assert held is not None and held.head == 0
    assert q.fill_compiled(bytearray(5000), 5000, max_chains=8) == 0  # 1, then 0: held
    assert ram[SCRATCH - BASE + 0x1000 : SCRATCH - BASE + 0x2000] == bytes(0x1000)
    assert q.fill_compiled(bytearray(100), 100, max_chains=8) == 1  # 1 alone
    with pytest.raises(VirtqueueError, match="offered again"):
        q.pop()
