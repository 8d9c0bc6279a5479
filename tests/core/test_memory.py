"""Guest memory: FlatGuestMemory bounds and OnDemandGuestMemory's mapping cache.

The on-demand tests use a page mapper that really maps: each mapping is an ``mmap`` of a memfd
(the fake guest RAM), and unmapping releases it. A view handed to a device is a slice of one
mapping (``view.obj`` is that mapping's mmap), so the tests can ask, for every view still in use,
whether its mapping is still alive -- with real foreign mappings a dead one would be a crash.
"""

from __future__ import annotations

import mmap
import os

import pytest
from vdm.memory import PAGE_SIZE, FlatGuestMemory, GuestMemoryError, MemoryRegion, OnDemandGuestMemory


def region(addr: int, size: int) -> MemoryRegion:
    return MemoryRegion(addr, bytearray(size))


# ---- FlatGuestMemory ------------------------------------------------------------------------------


@pytest.fixture
def flat() -> FlatGuestMemory:
    # two regions with a hole between them, and a third one right after the second
    return FlatGuestMemory([region(0x1000, 0x1000), region(0x4000, 0x2000), region(0x6000, 0x1000)])


@pytest.mark.parametrize(
    "addr, length",
    [(0x1000, 0x1000), (0x1000, 1), (0x1FFF, 1), (0x4000, 0x2000), (0x6FFF, 1), (0x1800, 0)],
)
def test_flat_ranges_inside_a_region(flat, addr, length):
    view = flat.map(addr, length, writable=True)
    assert len(view) == length
    view[:] = b"\x5a" * length
    assert flat.read(addr, length) == b"\x5a" * length
    assert flat.contains(addr, length)


@pytest.mark.parametrize(
    "addr, length",
    [
        (0x0FFF, 1),  # one byte below the first region
        (0x0FFF, 2),  # straddles its start
        (0x1FFF, 2),  # straddles its end
        (0x2000, 1),  # in the hole
        (0x3FFF, 0x10),  # from the hole into a region
        (0x5FFF, 2),  # across two adjacent regions: not one buffer
        (0x7000, 1),  # past the last region
        (0x1000, 0x1001),
        (-1, 1),
        (0x1000, -1),
        ((1 << 64) - 1, 2),
    ],
)
def test_flat_ranges_outside_guest_ram(flat, addr, length):
    with pytest.raises(GuestMemoryError):
        flat.map(addr, length)
    if length > 0:
        with pytest.raises(GuestMemoryError):
            flat.write(addr, b"\0" * length)
    assert not flat.contains(addr, length)


def test_flat_little_endian_accessors_hit_the_backing(flat):
    flat.write_u16(0x1000, 0x1234)
    flat.write_u32(0x1002, 0xDEADBEEF)
    flat.write_u64(0x1008, 0x0102030405060708)
    backing = flat.region_for(0x1000).backing
    assert bytes(backing[:16]) == bytes.fromhex("3412efbeadde0000" "0807060504030201")
    assert flat.read_u16(0x1000) == 0x1234
    assert flat.read_u32(0x1002) == 0xDEADBEEF
    assert flat.read_u64(0x1008) == 0x0102030405060708
    flat.write_u16(0x1000, 0x1_FFFF)  # truncated to the field, not an error
    assert flat.read_u16(0x1000) == 0xFFFF
    with pytest.raises(GuestMemoryError):
        flat.read_u64(0x1FFC)  # last 4 bytes of a region: an 8-byte read does not fit


@pytest.mark.parametrize(
    "addr, size",
    [(0x1000, 0x1000), (0x0800, 0x1000), (0x1800, 0x1000), (0x0800, 0x2000), (0x1400, 0x100), (0x5FFF, 2)],
    ids=["same", "overlaps_start", "overlaps_end", "contains", "inside", "spans_two"],
)
def test_flat_overlapping_regions_refused(flat, addr, size):
    before = flat.regions
    with pytest.raises(ValueError, match="overlaps"):
        flat.add_region(region(addr, size))
    assert flat.regions == before


def test_flat_adjacent_regions_and_order(flat):
    flat.add_region(region(0x0000, 0x1000))  # right below the first
    flat.add_region(region(0x2000, 0x2000))  # fills the hole exactly
    assert [r.guest_addr for r in flat.regions] == [0x0000, 0x1000, 0x2000, 0x4000, 0x6000]
    assert flat.region_for(0x2FFF).guest_addr == 0x2000
    removed = flat.remove_region(0x2000)
    assert removed.guest_addr == 0x2000
    with pytest.raises(GuestMemoryError):
        flat.map(0x2000, 1)


@pytest.mark.parametrize("where", [0x1000, 0x1800, 0x2000, 0x3000])
def test_flat_empty_region_refused(flat, where):
    """A zero-length region is meaningless; it is refused wherever it would go, in any order."""
    with pytest.raises(ValueError):
        flat.add_region(region(where, 0))
    other = FlatGuestMemory([region(where, 0x1000)] if where == 0x3000 else [])
    with pytest.raises(ValueError):
        other.add_region(region(where, 0))


def test_region_rejects_negative_address():
    with pytest.raises(ValueError):
        MemoryRegion(-4096, bytearray(4096))


# ---- OnDemandGuestMemory --------------------------------------------------------------------------


class MemfdMapper:
    """Maps pages of a memfd (the guest's RAM) with mmap; counts maps and unmaps."""

    def __init__(self, pages: int) -> None:
        self.pages = pages
        self.fd = os.memfd_create("guest-ram", os.MFD_CLOEXEC)
        os.ftruncate(self.fd, pages * PAGE_SIZE)
        #: id(mapping view) -> (mmap, first page, count, writable)
        self.live: dict[int, tuple[mmap.mmap, int, int, bool]] = {}
        self.dead: list[mmap.mmap] = []
        self.maps: list[tuple[int, int, bool]] = []
        self.unmaps = 0
        self.violations: list[str] = []

    def map_pages(self, first_page: int, count: int, writable: bool) -> memoryview:
        if first_page < 0 or first_page + count > self.pages:
            raise OSError(f"pages {first_page}+{count} are not guest RAM")
        prot = mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0)
        mm = mmap.mmap(self.fd, count * PAGE_SIZE, prot=prot, offset=first_page * PAGE_SIZE)
        view = memoryview(mm)
        self.live[id(view)] = (mm, first_page, count, writable)
        self.maps.append((first_page, count, writable))
        return view

    def unmap_pages(self, view: memoryview, count: int) -> None:
        entry = self.live.pop(id(view), None)
        if entry is None:
            self.violations.append("unmap of something never mapped (or unmapped twice)")
            return
        mm, _, n, _ = entry
        if n != count:
            self.violations.append(f"unmap of {count} pages, mapped {n}")
        self.unmaps += 1
        view.release()  # any later access through the mapping itself raises
        self.dead.append(mm)
        try:
            mm.close()
        except BufferError:  # slices of it still exist; a caller may hold one after unmap()
            pass

    def is_live(self, view: memoryview) -> bool:
        """Whether the mapping a device's view lies in is still mapped."""
        return any(mm is view.obj for mm, *_ in self.live.values())

    def guest_bytes(self, addr: int, length: int) -> bytes:
        return os.pread(self.fd, length, addr)

    def close(self) -> None:
        os.close(self.fd)


@pytest.fixture
def mapper():
    m = MemfdMapper(64)
    yield m
    assert not m.violations
    m.close()


def test_on_demand_reads_and_writes_reach_guest_ram(mapper):
    mem = OnDemandGuestMemory(mapper, bucket_pages=4)
    mem.write(0x1FFE, b"across a page")
    assert mapper.guest_bytes(0x1FFE, 13) == b"across a page"
    os.pwrite(mapper.fd, b"from the guest", 0x5000)
    assert mem.read(0x5000, 14) == b"from the guest"
    mem.write_u32(0x6000, 0xCAFEF00D)
    assert mapper.guest_bytes(0x6000, 4) == bytes.fromhex("0df0feca")


def test_on_demand_buckets_share_one_mapping(mapper):
    mem = OnDemandGuestMemory(mapper, bucket_pages=4)
    mem.read(1 * PAGE_SIZE + 10, 4)
    mem.read(3 * PAGE_SIZE, 4)
    assert mapper.maps == [(0, 4, False)]  # pages 0-3 mapped once
    mem.read(5 * PAGE_SIZE, 4)
    assert mapper.maps[-1] == (4, 4, False)
    mem.read(3 * PAGE_SIZE + PAGE_SIZE - 2, 4)  # pages 3 and 4: one mapping of both buckets
    assert mapper.maps[-1] == (0, 8, False)
    assert len(mapper.maps) == 3


def test_on_demand_writable_mapping_serves_reads_but_not_the_reverse(mapper):
    mem = OnDemandGuestMemory(mapper, bucket_pages=4)
    mem.read(0, 4)
    mem.write(0, b"x")
    assert mapper.maps == [(0, 4, False), (0, 4, True)]
    mem.read(8, 4)
    assert len(mapper.maps) == 2  # the writable mapping is reused for reading


def test_on_demand_bucket_past_the_end_maps_only_the_pages_asked_for(mapper):
    mem = OnDemandGuestMemory(mapper, bucket_pages=16)
    mem.write(62 * PAGE_SIZE, b"tail")  # bucket 48-63 exists
    mem.write(63 * PAGE_SIZE + 100, b"end")
    assert mapper.guest_bytes(63 * PAGE_SIZE + 100, 3) == b"end"
    mapper.pages = 60  # now pretend RAM ends at page 60: the bucket 48-63 cannot be mapped
    mem.invalidate()
    mem.write(50 * PAGE_SIZE, b"ok")
    assert mapper.maps[-1] == (50, 1, True)
    with pytest.raises(GuestMemoryError, match="cannot map"):
        mem.read(61 * PAGE_SIZE, 1)


def test_on_demand_limit_and_bad_ranges(mapper):
    mem = OnDemandGuestMemory(mapper, limit=64 * PAGE_SIZE)
    for addr, length in ((64 * PAGE_SIZE - 2, 4), (-4, 4), (0, -1), (1 << 63, 1)):
        with pytest.raises(GuestMemoryError):
            mem.map(addr, length)
    assert mapper.maps == []  # refused before asking the hypervisor
    assert mem.read(64 * PAGE_SIZE - 4, 4) == bytes(4)


def test_on_demand_mapper_failure_is_a_guest_memory_error(mapper):
    mem = OnDemandGuestMemory(mapper)  # no limit: the hypervisor decides
    with pytest.raises(GuestMemoryError):
        mem.read(1000 * PAGE_SIZE, 4)
    assert mem.outstanding_views == 0


def test_on_demand_cache_is_bounded_and_lru(mapper):
    mem = OnDemandGuestMemory(mapper, bucket_pages=1, max_cached=3)
    for page in range(10):
        mem.read(page * PAGE_SIZE, 8)
        assert mem.cached_mappings <= 3
    assert len(mapper.maps) == 10 and mapper.unmaps == 7
    assert len(mapper.live) == 3
    # pages 7, 8, 9 are cached; touching 7 makes 8 the least recently used
    mem.read(7 * PAGE_SIZE, 8)
    assert len(mapper.maps) == 10
    mem.read(0, 8)
    assert len(mapper.maps) == 11
    mem.read(7 * PAGE_SIZE, 8)
    mem.read(9 * PAGE_SIZE, 8)
    assert len(mapper.maps) == 11  # 7 and 9 survived
    mem.read(8 * PAGE_SIZE, 8)
    assert len(mapper.maps) == 12  # 8 was the one evicted


def test_on_demand_views_in_use_are_never_unmapped(mapper):
    """More views held at once than the cache may keep: none of them is unmapped under a device."""
    mem = OnDemandGuestMemory(mapper, bucket_pages=1, max_cached=2)
    views = [mem.map(page * PAGE_SIZE, 16, writable=True) for page in range(6)]
    assert all(mapper.is_live(v) for v in views)
    for page, v in enumerate(views):
        v[:4] = page.to_bytes(4, "little")  # each view still writes guest RAM
    for page in range(6):
        assert mapper.guest_bytes(page * PAGE_SIZE, 4) == page.to_bytes(4, "little")
    assert mem.outstanding_views == 6
    assert mapper.unmaps == 0
    for v in views:
        mem.unmap(v)
    assert mem.outstanding_views == 0
    assert mem.cached_mappings <= 2 and len(mapper.live) == mem.cached_mappings
    assert mapper.unmaps == 6 - mem.cached_mappings


def test_on_demand_two_views_of_one_mapping(mapper):
    mem = OnDemandGuestMemory(mapper, bucket_pages=4, max_cached=0)
    a = mem.map(0, 8, writable=True)
    b = mem.map(100, 8, writable=True)
    assert len(mapper.maps) == 1
    mem.unmap(a)
    assert mapper.unmaps == 0 and mapper.is_live(b)  # b still uses it
    b[:2] = b"ok"
    mem.unmap(b)
    assert mapper.unmaps == 1 and not mapper.live
    assert mapper.guest_bytes(100, 2) == b"ok"


def test_on_demand_unmap_of_unknown_or_released_views_is_harmless(mapper):
    mem = OnDemandGuestMemory(mapper, bucket_pages=4, max_cached=0)
    v = mem.map(0, 8)
    mem.unmap(v)
    mem.unmap(v)
    mem.unmap(memoryview(bytearray(8)))
    assert mapper.unmaps == 1


def test_on_demand_invalidate(mapper):
    mem = OnDemandGuestMemory(mapper, bucket_pages=4, max_cached=8)
    mem.read(0, 4)
    mem.read(8 * PAGE_SIZE, 4)
    busy = mem.map(16 * PAGE_SIZE, 4, writable=True)
    assert len(mapper.live) == 3
    mem.invalidate()
    assert mem.cached_mappings == 0
    assert len(mapper.live) == 1 and mapper.is_live(busy)  # only the mapping under the busy view
    busy[:4] = b"busy"
    assert mapper.guest_bytes(16 * PAGE_SIZE, 4) == b"busy"
    # a new request does not reuse the invalidated mapping
    mem.read(16 * PAGE_SIZE, 4)
    assert mapper.maps[-1] == (16, 4, False)
    mem.unmap(busy)  # the stale mapping goes as soon as its last view is released
    assert len(mapper.live) == 1 and mem.cached_mappings == 1


def test_on_demand_close_releases_everything(mapper):
    mem = OnDemandGuestMemory(mapper, bucket_pages=2, max_cached=4)
    for page in range(0, 12, 2):
        mem.read(page * PAGE_SIZE, 4)
    held = [mem.map(40 * PAGE_SIZE, 4), mem.map(44 * PAGE_SIZE, 4)]
    del held  # a device that went away without unmapping its views
    mem.close()
    assert not mapper.live
    assert mapper.unmaps == len(mapper.maps)
    assert mem.cached_mappings == 0 and mem.outstanding_views == 0
