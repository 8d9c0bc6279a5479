"""Guest memory as a device sees it.

A device never learns which hypervisor it runs on: it is handed a :class:`GuestMemory` and asks it
for buffers at guest-physical addresses. Two implementations cover the hypervisors we know:

* :class:`FlatGuestMemory` -- all of guest RAM is mapped in advance (KVM, where vdm owns the RAM;
  vhost-user, where the frontend shares its RAM as file descriptors). A guest address is an offset
  into one of a few regions.
* :class:`OnDemandGuestMemory` -- guest pages are mapped when a request needs them, through a
  hypervisor-specific :class:`PageMapper` (Xen foreign or grant mappings), with a bounded cache of
  mappings and an ``invalidate()`` for when the hypervisor asks us to drop them.

Every access is bounds-checked. An address or length that is not inside guest RAM raises
:class:`GuestMemoryError`; nothing outside the mapped regions is ever read or written.
"""

from __future__ import annotations

import bisect
import struct
import threading
from abc import ABC, abstractmethod
from collections import OrderedDict
from typing import Protocol, Sequence

__all__ = [
    "FlatGuestMemory",
    "GuestMemory",
    "GuestMemoryError",
    "MemoryRegion",
    "OnDemandGuestMemory",
    "PageMapper",
]

PAGE_SIZE = 4096
_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")


class GuestMemoryError(Exception):
    """A guest address or length does not lie inside guest RAM (a guest error, never a host one)."""


class GuestMemory(ABC):
    """Guest-physical memory, as devices and virtqueues use it."""

    @abstractmethod
    def map(self, addr: int, length: int, writable: bool = False) -> memoryview:
        """Return a view of ``length`` bytes of guest memory at guest-physical ``addr``.

        Raises :class:`GuestMemoryError` if any byte of the range is not guest RAM. The view must be
        given back with :meth:`unmap` when the device is done with it (a no-op for flat memory).
        """

    def unmap(self, view: memoryview) -> None:  # noqa: B027 - a no-op is the right default
        """Release a view returned by :meth:`map`."""

    #: True where :meth:`unmap` does something (a subclass that overrides it); the virtqueue skips
    #: the calls on chains from memory where it does not. Set for each subclass below.
    unmap_needed = False

    def __init_subclass__(cls, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        cls.unmap_needed = cls.unmap is not GuestMemory.unmap

    def read(self, addr: int, length: int) -> bytes:
        view = self.map(addr, length)
        try:
            return bytes(view)
        finally:
            self.unmap(view)

    def write(self, addr: int, data: bytes) -> None:
        view = self.map(addr, len(data), writable=True)
        try:
            view[:] = data
        finally:
            self.unmap(view)

    def read_u16(self, addr: int) -> int:
        return _U16.unpack(self.read(addr, 2))[0]

    def read_u32(self, addr: int) -> int:
        return _U32.unpack(self.read(addr, 4))[0]

    def read_u64(self, addr: int) -> int:
        return _U64.unpack(self.read(addr, 8))[0]

    def write_u16(self, addr: int, value: int) -> None:
        self.write(addr, _U16.pack(value & 0xFFFF))

    def write_u32(self, addr: int, value: int) -> None:
        self.write(addr, _U32.pack(value & 0xFFFFFFFF))

    def write_u64(self, addr: int, value: int) -> None:
        self.write(addr, _U64.pack(value & 0xFFFFFFFFFFFFFFFF))


class MemoryRegion:
    """One contiguous range of guest-physical memory backed by a host buffer."""

    __slots__ = ("backing", "guest_addr", "size", "view")

    def __init__(self, guest_addr: int, backing: object) -> None:
        view = memoryview(backing).cast("B")  # type: ignore[arg-type]
        if guest_addr < 0:
            raise ValueError("guest address must not be negative")
        self.guest_addr = guest_addr
        self.backing = backing  # keeps an mmap alive as long as the region
        self.view = view
        self.size = len(view)

    @property
    def end(self) -> int:
        return self.guest_addr + self.size

    def __repr__(self) -> str:
        return f"MemoryRegion(0x{self.guest_addr:x}-0x{self.end:x})"


class FlatGuestMemory(GuestMemory):
    """Guest RAM mapped in advance as a few regions (KVM slots, vhost-user shared fds)."""

    def __init__(self, regions: Sequence[MemoryRegion] = ()) -> None:
        self._regions: list[MemoryRegion] = []
        self._starts: list[int] = []
        self._single: tuple[int, int, memoryview] | None = None
        for region in regions:
            self.add_region(region)

    @property
    def regions(self) -> tuple[MemoryRegion, ...]:
        return tuple(self._regions)

    def add_region(self, region: MemoryRegion) -> None:
        if region.size == 0:
            raise ValueError(f"{region!r} is empty")
        i = bisect.bisect_right(self._starts, region.guest_addr)
        if i > 0 and self._regions[i - 1].end > region.guest_addr:
            raise ValueError(f"{region!r} overlaps {self._regions[i - 1]!r}")
        if i < len(self._regions) and region.end > self._regions[i].guest_addr:
            raise ValueError(f"{region!r} overlaps {self._regions[i]!r}")
        self._regions.insert(i, region)
        self._starts.insert(i, region.guest_addr)
        self._set_single()

    def remove_region(self, guest_addr: int) -> MemoryRegion:
        i = self._starts.index(guest_addr)
        del self._starts[i]
        region = self._regions.pop(i)
        self._set_single()
        return region

    def _set_single(self) -> None:
        # map()'s fast path when guest RAM is one region (most VMs, every vhost-user test):
        # (guest address, size, view) of that region, or None. Replaced by one assignment.
        r = self._regions
        self._single = (r[0].guest_addr, r[0].size, r[0].view) if len(r) == 1 else None

    @property
    def single_region(self) -> tuple[int, int, memoryview] | None:
        """(guest address, size, view) of guest RAM when it is one region, else None.

        What :meth:`map` checks a range against and slices when RAM is one region; the compiled
        virtqueue path (:mod:`vdm.fastpath`) maps through it the same way, without the call.
        """
        return self._single

    def region_for(self, addr: int) -> MemoryRegion | None:
        i = bisect.bisect_right(self._starts, addr) - 1
        if i >= 0:
            region = self._regions[i]
            if addr < region.end:
                return region
        return None

    def contains(self, addr: int, length: int) -> bool:
        region = self.region_for(addr)
        return region is not None and length >= 0 and addr + length <= region.end

    def map(self, addr: int, length: int, writable: bool = False) -> memoryview:
        single = self._single
        if single is not None:
            # one region: 0 <= off and off + length <= size is the whole check (length >= 0 too)
            off = addr - single[0]
            if off >= 0 and length >= 0 and off + length <= single[1]:
                return single[2][off : off + length]
        if addr < 0 or length < 0:
            raise GuestMemoryError(f"bad guest range 0x{addr:x}+{length}")
        i = bisect.bisect_right(self._starts, addr) - 1
        if i >= 0:
            region = self._regions[i]
            off = addr - region.guest_addr
            if off + length <= region.size:
                return region.view[off : off + length]
        raise GuestMemoryError(f"guest range 0x{addr:x}+0x{length:x} is not in guest RAM")


class PageMapper(Protocol):
    """What :class:`OnDemandGuestMemory` needs from a hypervisor: map and unmap guest pages."""

    def map_pages(self, first_page: int, count: int, writable: bool) -> memoryview:
        """Map ``count`` guest pages starting at page number ``first_page``; raise on failure."""

    def unmap_pages(self, view: memoryview, count: int) -> None:
        """Undo one :meth:`map_pages` call."""


class _Mapping:
    __slots__ = ("count", "first_page", "refs", "stale", "view", "writable")

    def __init__(self, first_page: int, count: int, writable: bool, view: memoryview) -> None:
        self.first_page = first_page
        self.count = count
        self.writable = writable
        self.view = view
        self.refs = 0
        self.stale = False


class OnDemandGuestMemory(GuestMemory):
    """Guest pages mapped per request through a :class:`PageMapper`, with a bounded cache.

    Mappings are made in buckets of ``bucket_pages`` pages so that neighbouring requests share one
    mapping. At most ``max_cached`` idle mappings are kept (least recently used are unmapped first);
    mappings in use by an outstanding view are never unmapped until released. ``invalidate()`` drops
    every idle mapping at once and marks busy ones to be dropped when released (Xen's
    IOREQ_TYPE_INVALIDATE).
    """

    def __init__(
        self,
        mapper: PageMapper,
        *,
        limit: int | None = None,
        bucket_pages: int = 256,
        max_cached: int = 64,
    ) -> None:
        self._mapper = mapper
        self._limit = limit
        self._bucket = bucket_pages
        self._max_cached = max_cached
        self._cache: OrderedDict[tuple[int, int, bool], _Mapping] = OrderedDict()
        self._views: dict[int, tuple[_Mapping, memoryview]] = {}
        self._lock = threading.Lock()

    @property
    def cached_mappings(self) -> int:
        return len(self._cache)

    @property
    def outstanding_views(self) -> int:
        return len(self._views)

    def _get(self, first: int, count: int, writable: bool) -> _Mapping:
        for key in ((first, count, True), (first, count, writable)):
            m = self._cache.get(key)
            if m is not None and not m.stale:
                self._cache.move_to_end(key)
                return m
        try:
            view = self._mapper.map_pages(first, count, writable)
        except GuestMemoryError:
            raise
        except Exception as e:  # a failed foreign mapping is the guest's problem, not ours
            raise GuestMemoryError(f"cannot map guest pages 0x{first:x}+{count}: {e}") from e
        m = _Mapping(first, count, writable, view)
        self._cache[(first, count, writable)] = m
        return m

    def _evict(self) -> None:
        if len(self._cache) <= self._max_cached:
            return
        for key in list(self._cache):
            if len(self._cache) <= self._max_cached:
                break
            m = self._cache[key]
            if m.refs == 0:
                del self._cache[key]
                self._mapper.unmap_pages(m.view, m.count)

    def map(self, addr: int, length: int, writable: bool = False) -> memoryview:
        if addr < 0 or length < 0 or (self._limit is not None and addr + length > self._limit):
            raise GuestMemoryError(f"guest range 0x{addr:x}+0x{length:x} is not in guest RAM")
        first = addr // PAGE_SIZE
        last = (addr + max(length, 1) - 1) // PAGE_SIZE
        b_first = first - first % self._bucket
        b_count = (last // self._bucket + 1) * self._bucket - b_first
        with self._lock:
            try:
                m = self._get(b_first, b_count, writable)
            except GuestMemoryError:
                # The bucket may reach past the end of guest RAM: map just the pages asked for.
                m = self._get(first, last - first + 1, writable)
            off = addr - m.first_page * PAGE_SIZE
            view = m.view[off : off + length]
            m.refs += 1
            self._views[id(view)] = (m, view)
            self._evict()  # only after counting this view: the new mapping must not be evicted
        return view

    def unmap(self, view: memoryview) -> None:
        with self._lock:
            entry = self._views.pop(id(view), None)
            if entry is None:
                return
            m = entry[0]
            m.refs -= 1
            if m.refs == 0 and m.stale:
                self._mapper.unmap_pages(m.view, m.count)
            else:
                self._evict()

    def invalidate(self) -> None:
        """Drop every cached mapping (busy ones as soon as their last view is released)."""
        with self._lock:
            for m in self._cache.values():
                if m.refs == 0:
                    self._mapper.unmap_pages(m.view, m.count)
                else:
                    m.stale = True
            self._cache.clear()

    def close(self) -> None:
        """Release every mapping, busy or not (the device is gone)."""
        with self._lock:
            seen = {id(m): m for m in self._cache.values()}
            seen.update({id(m): m for m, _ in self._views.values()})
            self._cache.clear()
            self._views.clear()
            for m in seen.values():
                self._mapper.unmap_pages(m.view, m.count)
