"""Guest memory of a Xen guest, mapped on demand: foreign mappings and grant mappings.

* :class:`ForeignPages` is a :class:`vdm.memory.PageMapper` over ``xenforeignmemory_map``: guest
  page frame numbers are mapped read-only or read-write into this process.
* :class:`GrantPages` maps grant references (``xengnttab_map_domain_grant_refs``). A guest whose
  virtio device sits behind Xen's ``xen,grant-dma`` IOMMU puts "grant addresses" in its
  descriptors: bit 63 set, the grant reference in the page-frame bits (Linux's
  ``XEN_GRANT_DMA_ADDR_OFF``). Consecutive pages of one buffer have consecutive references.
* :class:`XenGuestMemory` is the :class:`vdm.memory.GuestMemory` devices get: foreign addresses go
  through the core's :class:`vdm.memory.OnDemandGuestMemory` (bounded cache, ``invalidate()`` on
  IOREQ_TYPE_INVALIDATE); grant addresses are mapped exactly and unmapped as soon as the device
  releases the view (a cached grant mapping would stop the guest from revoking the grant).

Each mapper counts the mappings it made (``made``, ``pages``: successful map calls and the pages
they covered, never decremented), so ``vdm dm-only`` can say at exit which kind a guest's devices
used (:meth:`XenGuestMemory.summary`).
"""

from __future__ import annotations

import logging
import mmap
import threading
from typing import Any

from vdm.memory import PAGE_SIZE, GuestMemory, GuestMemoryError, OnDemandGuestMemory

from .abi import GRANT_ADDR_BIT

__all__ = ["MAX_MAP_PAGES", "ForeignPages", "GrantPages", "XenGuestMemory"]

log = logging.getLogger(__name__)

#: refuse single mappings larger than this (64 MiB): a guest-chosen length must not exhaust dom0
MAX_MAP_PAGES = 16384
_GRANT_PAGE_BIT = GRANT_ADDR_BIT // PAGE_SIZE
_MAX_GREF = 1 << 32


class _Mappings:
    """Live mappings by view: the view object is kept, so its id cannot be reused while mapped."""

    def __init__(self) -> None:
        self._live: dict[int, tuple[memoryview, Any, int]] = {}
        self._lock = threading.Lock()
        #: mappings added so far and their pages (only ever grow)
        self.made = 0
        self.pages = 0

    def add(self, view: memoryview, ptr: Any, count: int) -> None:
        with self._lock:
            self._live[id(view)] = (view, ptr, count)
            self.made += 1
            self.pages += count

    def pop(self, view: memoryview) -> tuple[Any, int] | None:
        with self._lock:
            entry = self._live.pop(id(view), None)
        return None if entry is None else (entry[1], entry[2])

    def __len__(self) -> int:
        return len(self._live)


def _view(lib: Any, ptr: Any, count: int, writable: bool) -> memoryview:
    view = memoryview(lib.ffi.buffer(ptr, count * PAGE_SIZE))
    return view if writable else view.toreadonly()


class _Counted:
    """What both mappers share: the live mappings and the counts ``vdm dm-only`` reports at exit."""

    def __init__(self) -> None:
        self._maps = _Mappings()

    @property
    def live(self) -> int:
        return len(self._maps)

    @property
    def made(self) -> int:
        """Mappings made so far (successful map calls; never decremented)."""
        return self._maps.made

    @property
    def pages(self) -> int:
        """Pages those mappings covered."""
        return self._maps.pages


class ForeignPages(_Counted):
    """Maps guest page frames of domain ``domid`` with ``xenforeignmemory_map``."""

    def __init__(self, lib: Any, fmem: Any, domid: int) -> None:
        super().__init__()
        self.lib = lib
        self.fmem = fmem
        self.domid = domid

    def map_pages(self, first_page: int, count: int, writable: bool) -> memoryview:
        lib, ffi = self.lib, self.lib.ffi
        if count <= 0 or count > MAX_MAP_PAGES:
            raise GuestMemoryError(f"refusing to map {count} guest pages at once")
        if first_page < 0 or first_page + count > _GRANT_PAGE_BIT:
            raise GuestMemoryError(f"guest page 0x{first_page:x}+{count} is not guest RAM")
        pfns = ffi.new("xen_pfn_t[]", list(range(first_page, first_page + count)))
        errs = ffi.new("int[]", count)
        prot = mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0)
        ptr = lib.xenforeignmemory_map(self.fmem, self.domid, prot, count, pfns, errs)
        if ptr == ffi.NULL:
            raise GuestMemoryError(f"cannot map guest pages 0x{first_page:x}+{count}: errno {lib.errno}")
        bad = [i for i in range(count) if errs[i]]
        if bad:
            lib.xenforeignmemory_unmap(self.fmem, ptr, count)
            raise GuestMemoryError(
                f"guest page 0x{first_page + bad[0]:x} is not guest RAM (error {errs[bad[0]]})"
            )
        view = _view(lib, ptr, count, writable)
        self._maps.add(view, ptr, count)
        return view

    def unmap_pages(self, view: memoryview, count: int) -> None:
        entry = self._maps.pop(view)
        if entry is None:
            log.warning("unmap of a view that is not a live foreign mapping")
            return
        ptr, n = entry
        view.release()
        if self.lib.xenforeignmemory_unmap(self.fmem, ptr, n) != 0:
            log.warning("xenforeignmemory_unmap failed: errno %d", self.lib.errno)


class GrantPages(_Counted):
    """Maps consecutive grant references of domain ``domid`` with ``xengnttab``."""

    def __init__(self, lib: Any, xgt: Any, domid: int) -> None:
        super().__init__()
        self.lib = lib
        self.xgt = xgt
        self.domid = domid

    def map_refs(self, first_ref: int, count: int, writable: bool) -> memoryview:
        lib, ffi = self.lib, self.lib.ffi
        if self.xgt is None or self.xgt == ffi.NULL:
            raise GuestMemoryError("the guest uses grant addresses but /dev/xen/gntdev is not available")
        if count <= 0 or count > MAX_MAP_PAGES or first_ref < 0 or first_ref + count > _MAX_GREF:
            raise GuestMemoryError(f"bad grant range {first_ref}+{count}")
        refs = ffi.new("uint32_t[]", list(range(first_ref, first_ref + count)))
        prot = mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0)
        ptr = lib.xengnttab_map_domain_grant_refs(self.xgt, count, self.domid, refs, prot)
        if ptr == ffi.NULL:
            raise GuestMemoryError(f"cannot map grant references {first_ref}+{count}: errno {lib.errno}")
        view = _view(lib, ptr, count, writable)
        self._maps.add(view, ptr, count)
        return view

    def unmap(self, view: memoryview) -> None:
        entry = self._maps.pop(view)
        if entry is None:
            return
        ptr, n = entry
        view.release()
        if self.lib.xengnttab_unmap(self.xgt, ptr, n) != 0:
            log.warning("xengnttab_unmap failed: errno %d", self.lib.errno)


class XenGuestMemory(GuestMemory):
    """A Xen guest's memory as devices see it (foreign or grant addresses, never told apart)."""

    def __init__(self, foreign: ForeignPages, grants: GrantPages | None, **cache: Any) -> None:
        self.foreign = foreign
        self.grants = grants
        self.cache = OnDemandGuestMemory(foreign, limit=GRANT_ADDR_BIT, **cache)
        self._grant_views: dict[int, tuple[memoryview, memoryview]] = {}
        self._lock = threading.Lock()

    def map(self, addr: int, length: int, writable: bool = False) -> memoryview:
        if addr < 0 or length < 0 or addr + length > 1 << 64:
            raise GuestMemoryError(f"bad guest range 0x{addr:x}+0x{length:x}")
        if not addr & GRANT_ADDR_BIT:
            return self.cache.map(addr, length, writable)
        if self.grants is None:
            raise GuestMemoryError(f"grant address 0x{addr:x} but grant mapping is not available")
        if length > MAX_MAP_PAGES * PAGE_SIZE:
            raise GuestMemoryError(f"refusing to map 0x{length:x} bytes of grants at once")
        gaddr = addr & ~GRANT_ADDR_BIT
        first = gaddr // PAGE_SIZE
        last = (gaddr + max(length, 1) - 1) // PAGE_SIZE
        whole = self.grants.map_refs(first, last - first + 1, writable)
        off = gaddr % PAGE_SIZE
        view = whole[off : off + length]
        with self._lock:
            self._grant_views[id(view)] = (view, whole)
        return view

    def unmap(self, view: memoryview) -> None:
        with self._lock:
            entry = self._grant_views.pop(id(view), None)
        if entry is None:
            self.cache.unmap(view)
            return
        view.release()
        assert self.grants is not None
        self.grants.unmap(entry[1])

    def summary(self) -> str:
        """One line: how many grant and how many foreign mappings were made (and their pages)."""
        g = self.grants
        return (
            f"{g.made if g else 0} grant mappings ({g.pages if g else 0} pages), "
            f"{self.foreign.made} foreign mappings ({self.foreign.pages} pages)"
        )

    def invalidate(self) -> None:
        """Xen asked (IOREQ_TYPE_INVALIDATE): drop every cached foreign mapping."""
        self.cache.invalidate()

    def close(self) -> None:
        """Release every mapping, busy or not."""
        self.cache.close()
        with self._lock:
            entries = list(self._grant_views.values())
            self._grant_views.clear()
        for view, whole in entries:
            view.release()
            if self.grants is not None:
                self.grants.unmap(whole)
