"""libxenforeignmemory, simulated: foreign mappings of guest pages and of the ioreq page."""

from __future__ import annotations

import errno
import mmap
from typing import Any

from ..abi import PAGE_SIZE, XENMEM_resource_ioreq_server, ffi
from .calls import LibCalls
from .libc import MAP_FIXED, PROT_NONE, libc_mmap, libc_munmap


class ForeignMemoryCalls(LibCalls):
    """The ``xenforeignmemory_*`` calls of :class:`~vdm_xen.sim.lib.SimLib`."""

    # ---- libxenforeignmemory ----------------------------------------------------------------------

    def _xenforeignmemory_open(self, logger: Any, flags: int) -> int:
        return self._dev_open("fmem")

    def _xenforeignmemory_close(self, fmem: Any) -> int:
        return self._close("fmem", fmem)

    def _xenforeignmemory_map(self, fmem: Any, dom: int, prot: int, pages: int, arr: Any, err: Any) -> int:
        x = self.xen
        if self._get("fmem", fmem) is None:
            return self._fail(errno.EBADF, 0)
        d = x.domains.get(dom)
        if d is None or not d.alive:
            return self._fail(errno.ESRCH, 0)
        if pages <= 0:
            return self._fail(errno.EINVAL, 0)
        sources: list[tuple[int, int] | None] = []
        for i in range(pages):
            pfn = int(arr[i])
            off = x.ram.file_offset(pfn)
            if off is not None:
                sources.append((x.ram.fd, off))
            else:
                legacy = [s for s in x.servers.values() if s.legacy_gfn == pfn and s.emulator == self.domid]
                sources.append((legacy[0].page_fd, 0) if legacy else None)
        if err == ffi.NULL and any(s is None for s in sources):
            return self._fail(errno.EINVAL, 0)
        base = libc_mmap(pages * PAGE_SIZE, PROT_NONE, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS, -1, 0)
        for i, src in enumerate(sources):
            if src is None:
                err[i] = -errno.EINVAL
                continue
            libc_mmap(PAGE_SIZE, prot, mmap.MAP_SHARED | MAP_FIXED, src[0], src[1], base + i * PAGE_SIZE)
            if err != ffi.NULL:
                err[i] = 0
        with x.lock:
            x.foreign_maps[base] = pages
        return base

    def _xenforeignmemory_unmap(self, fmem: Any, addr: Any, pages: int) -> int:
        a = int(ffi.cast("uintptr_t", addr))
        with self.xen.lock:
            n = self.xen.foreign_maps.get(a)
            if n != pages:
                self.xen.violation(
                    f"xenforeignmemory_unmap(0x{a:x}, {pages}): not a live mapping of that size"
                )
                return self._fail(errno.EINVAL)
            del self.xen.foreign_maps[a]
        libc_munmap(a, pages * PAGE_SIZE)
        return 0

    def _xenforeignmemory_map_resource(
        self,
        fmem: Any,
        domid: int,
        rtype: int,
        rid: int,
        frame: int,
        nr: int,
        paddr: Any,
        prot: int,
        flags: int,
    ) -> int:
        x = self.xen
        if self._get("fmem", fmem) is None:
            return self._fail(errno.EBADF, 0)
        if not x.resource_mapping:
            return self._fail(errno.EOPNOTSUPP, 0)
        d = x.domains.get(domid)
        if d is None or not d.alive:
            return self._fail(errno.ESRCH, 0)
        if rtype != XENMEM_resource_ioreq_server:
            return self._fail(errno.EINVAL, 0)
        s = x.servers.get(rid)
        if s is None or s.domid != domid:
            return self._fail(errno.ENOENT, 0)
        if s.emulator != self.domid:
            x.violation(f"dom{self.domid} mapped ioreq server {rid}'s page, which dom{s.emulator} created")
            return self._fail(errno.EPERM, 0)
        if frame == 0:
            return self._fail(errno.ENOENT, 0)  # no buffered page: created with BUFIOREQ_OFF
        if frame != 1 or nr != 1:
            return self._fail(errno.EINVAL, 0)
        if paddr[0] != ffi.NULL:
            return self._fail(errno.EINVAL, 0)
        addr = libc_mmap(PAGE_SIZE, prot, mmap.MAP_SHARED, s.page_fd, 0)
        paddr[0] = ffi.cast("void *", addr)
        with x.lock:
            h = x.next_id()
            x.resources[h] = addr
        return h

    def _xenforeignmemory_unmap_resource(self, fmem: Any, fres: Any) -> int:
        h = int(ffi.cast("uintptr_t", fres))
        with self.xen.lock:
            addr = self.xen.resources.pop(h, None)
        if addr is None:
            self.xen.violation("unmap_resource of a handle that is not mapped")
            return self._fail(errno.EINVAL)
        libc_munmap(addr, PAGE_SIZE)
        return 0
