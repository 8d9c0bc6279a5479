"""Generated descriptor tables: the device either serves the chain exactly right or stops.

Hypothesis writes random descriptor tables (addresses inside, at the edge of and outside guest RAM;
random flags, lengths and next indexes; indirect tables, sometimes nested or corrupt) and a random
head. An independent walk of the chain, written from virtio 1.2 section 2.7.5, says whether the
chain is valid and what the echo device must do with it; the device must agree: a valid chain is
echoed byte for byte, an invalid one leaves DEVICE_NEEDS_RESET and guest memory untouched. No
exception may escape and nothing outside guest RAM may change.
"""

from __future__ import annotations

from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from vdm.device import F_EVENT_IDX, F_INDIRECT_DESC
from vdm.memory import PAGE_SIZE, GuestMemoryError, OnDemandGuestMemory
from vdm.ring_layout import DESC, desc_offset, used_ring_size
from vdm.testing import GuestRam, VirtioTestDriver
from vdm.testing.devices import EchoDevice

from tests.core import rings

RAM = 1 << 20
DATA_SIZE = 64 << 10  # the last 64 KiB of RAM hold buffers and indirect tables
PATTERN = bytes((i * 7 + 3) & 0xFF for i in range(DATA_SIZE))
TABLE_SLOTS = 2
TABLE_SLOT_SIZE = 256


@st.composite
def addresses(draw: st.DrawFn, n_tables: int) -> tuple[str, int]:
    """A (kind, value) address: an offset into the data area, a table slot, or somewhere bad."""
    kind = draw(st.sampled_from(["data"] * 8 + ["table", "edge", "outside"]))
    if kind == "data":
        return kind, draw(st.integers(0, DATA_SIZE - 1))
    if kind == "table":
        return kind, draw(st.integers(0, n_tables - 1))
    if kind == "edge":
        return kind, draw(st.integers(-64, 64))
    return kind, draw(st.sampled_from([0, 0x1000, (1 << 64) - 0x1000, 1 << 40, 0xFFFFFFFF]))


@st.composite
def descriptors(draw: st.DrawFn, table_len: int) -> tuple[tuple[str, int], int, int, int]:
    addr = draw(addresses(TABLE_SLOTS))
    if addr[0] == "table":
        length = draw(st.sampled_from([16, 32, 48, 64, 16, 32, 0, 8, 24, 128]))
    else:
        length = draw(st.one_of(st.integers(0, 512), st.sampled_from([0x2000, 0x10000, 0xFFFFFFFF])))
    # mostly plausible flags (NEXT, WRITE), sometimes INDIRECT or all of them
    flags = draw(st.sampled_from([0, 1, 2, 3, 0, 1, 2, 3, 4, 5, 6, 7]))
    in_range = st.integers(0, table_len - 1)
    nxt = draw(st.one_of(in_range, in_range, st.integers(table_len, 0xFFFF)))
    return addr, length, flags, nxt


@st.composite
def well_formed(draw: st.DrawFn, table_len: int) -> tuple[list[int], list]:
    """A valid chain through a table: (the indexes it uses, head first; their descriptors)."""
    order = draw(st.permutations(range(table_len)))[: draw(st.integers(1, table_len))]
    n_readable = draw(st.integers(0, len(order)))
    descs = []
    for pos, _ in enumerate(order):
        flags = (rings.NEXT if pos + 1 < len(order) else 0) | (rings.WRITE if pos >= n_readable else 0)
        nxt = order[pos + 1] if pos + 1 < len(order) else 0
        descs.append((("data", draw(st.integers(0, DATA_SIZE - 512))), draw(st.integers(0, 512)), flags, nxt))
    return order, descs


@st.composite
def scenarios(draw: st.DrawFn) -> dict:
    """A ring (and indirect tables): random, or well formed and then damaged in a few places."""
    size = draw(st.sampled_from([4, 8]))
    table = draw(st.lists(descriptors(size), min_size=size, max_size=size))
    tables = draw(
        st.lists(st.lists(descriptors(4), min_size=4, max_size=4), min_size=TABLE_SLOTS, max_size=TABLE_SLOTS)
    )
    head = draw(st.integers(0, size - 1) if draw(st.integers(0, 9)) else st.integers(size, 0xFFFF))
    if draw(st.booleans()):
        if draw(st.booleans()):  # a direct chain in the ring
            order, descs = draw(well_formed(size))
            for i, d in zip(order, descs):
                table[i] = d
        else:  # one ring descriptor pointing at an indirect table
            order, descs = draw(well_formed(4))
            slot = draw(st.integers(0, TABLE_SLOTS - 1))
            for i, d in zip(order, descs):
                tables[slot][i] = d
            table[order[0] % size] = (("table", slot), 16 * 4, rings.INDIRECT, 0)
            if order[0] != 0:  # an indirect table is walked from its entry 0
                tables[slot][0], tables[slot][order[0]] = tables[slot][order[0]], tables[slot][0]
                tables[slot] = [
                    (a, n, f, {0: order[0], order[0]: 0}.get(x, x) if f & rings.NEXT else x)
                    for a, n, f, x in tables[slot]
                ]
            order = [order[0] % size]
        head = order[0]
        for _ in range(draw(st.integers(0, 2))):  # then damage it a little
            where = draw(st.sampled_from(["ring", "table"]))
            target = table if where == "ring" else tables[draw(st.integers(0, TABLE_SLOTS - 1))]
            i = draw(st.integers(0, len(target) - 1))
            target[i] = draw(descriptors(len(target)))
    return {
        "size": size,
        "indirect": draw(st.booleans()),
        "event_idx": draw(st.booleans()),
        "table": table,
        "tables": tables,
        "head": head,
    }


def expected_buffers(read, desc_addr: int, size: int, head: int, indirect_ok: bool, base: int, end: int):
    """The chain's buffers as [(addr, len, writable)], or None if it breaks a rule."""

    def in_ram(addr: int, length: int) -> bool:
        return base <= addr and addr + length <= end

    if head >= size:
        return None
    bufs: list[tuple[int, int, bool]] = []
    table, table_len, i, visited, nested = desc_addr, size, head, 0, False
    while True:
        visited += 1
        if visited > table_len:  # a chain can visit each entry at most once
            return None
        addr, length, flags, nxt = DESC.unpack(read(table + desc_offset(i), DESC.size))
        if flags & rings.INDIRECT:
            if nested or not indirect_ok or flags & rings.NEXT or length == 0 or length % 16:
                return None
            if not in_ram(addr, length):
                return None
            table, table_len, i, visited, nested = addr, length // 16, 0, 0, True
            continue
        if not in_ram(addr, length):
            return None
        writable = bool(flags & rings.WRITE)
        if not writable and any(w for _, _, w in bufs):
            return None
        bufs.append((addr, length, writable))
        if not flags & rings.NEXT:
            return bufs
        if nxt >= table_len:
            return None
        i = nxt


class RamPages:
    """A page mapper over the test driver's RAM: what a Xen backend's foreign mappings look like."""

    def __init__(self, ram: GuestRam) -> None:
        self.ram = ram
        self.maps = 0

    def map_pages(self, first_page: int, count: int, writable: bool) -> memoryview:
        self.maps += 1
        start = first_page * PAGE_SIZE - self.ram.base
        if start < 0 or start + count * PAGE_SIZE > self.ram.size:
            raise GuestMemoryError(f"pages 0x{first_page:x}+{count} are not guest RAM")
        return self.ram.region.view[start : start + count * PAGE_SIZE]

    def unmap_pages(self, view: memoryview, count: int) -> None:
        pass


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scenarios())
def test_generated_chain_is_served_exactly_or_refused(sc: dict) -> None:
    run_scenario(sc, VirtioTestDriver(EchoDevice(), ram_size=RAM))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scenarios())
def test_generated_chain_with_on_demand_memory(sc: dict) -> None:
    """The same through Xen-style on-demand mappings: and every mapping is given back."""
    drv = VirtioTestDriver(EchoDevice(), ram_size=RAM)
    pages = RamPages(drv.ram)
    od = OnDemandGuestMemory(pages, bucket_pages=4, max_cached=3)
    drv.device.memory = drv.transport.memory = od
    run_scenario(sc, drv)
    assert pages.maps > 0  # the rings at least went through the page mapper
    assert od.outstanding_views == 0, "a view of guest memory was never released"


def run_scenario(sc: dict, drv: VirtioTestDriver) -> None:
    exclude = (0 if sc["indirect"] else 1 << F_INDIRECT_DESC) | (0 if sc["event_idx"] else 1 << F_EVENT_IDX)
    drv.init(exclude=exclude, queue_sizes=[sc["size"]])
    ram = drv.ram
    data = ram.end - DATA_SIZE
    tables_at = data + DATA_SIZE // 2  # the table slots sit inside the data area
    ram.write(data, PATTERN)

    def resolve(addr: tuple[str, int]) -> int:
        kind, v = addr
        if kind == "data":
            return data + v
        if kind == "table":
            return tables_at + TABLE_SLOT_SIZE * v
        if kind == "edge":
            return max(ram.end + v, 0)
        return v

    for slot, entries in enumerate(sc["tables"]):
        rings.write_table(
            drv, tables_at + TABLE_SLOT_SIZE * slot, [(resolve(a), n, f, x) for a, n, f, x in entries]
        )
    for i, (a, n, f, x) in enumerate(sc["table"]):
        drv.write_desc(0, i, resolve(a), n, f, x)
    drv.publish(0, sc["head"])

    q = drv.queues[0]
    before = bytearray(ram.read(ram.base, ram.size))
    expect = expected_buffers(
        lambda a, n: bytes(before[a - ram.base : a - ram.base + n]),
        q.desc, q.size, sc["head"], sc["indirect"], ram.base, ram.end,
    )

    drv.kick(0)  # must not raise
    after = bytearray(ram.read(ram.base, ram.size))
    used_off = q.used - ram.base
    used_len = used_ring_size(q.size)
    # the used ring is checked on its own; everything else must be exactly as predicted
    after[used_off : used_off + used_len] = before[used_off : used_off + used_len]

    event("refused" if expect is None else f"served, {len(expect)} buffers")
    if expect is None:
        assert drv.needs_reset and drv.device.broken
        assert not drv.device.broken.startswith("internal error"), drv.device.broken
        assert drv.used_idx(0) == 0
        assert after == before
    else:
        assert not drv.needs_reset, drv.device.broken
        payload = b"".join(before[a - ram.base : a - ram.base + n] for a, n, w in expect if not w)
        model = bytearray(before)
        done = 0
        for a, n, w in expect:
            if w:
                chunk = payload[done : done + n]
                model[a - ram.base : a - ram.base + len(chunk)] = chunk
                done += len(chunk)
        assert after == model
        assert drv.used_idx(0) == 1
        assert rings.used_elem(drv, 0, 0) == (sc["head"], done)
        assert drv.device.seen == [payload]
    ram.check_guards()
    drv.device.reset()
