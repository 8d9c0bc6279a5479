"""libxengnttab, simulated: mapping the pages a guest granted."""

from __future__ import annotations

import errno
import mmap
from typing import Any

from ..abi import PAGE_SIZE, ffi
from .calls import LibCalls
from .libc import MAP_FIXED, PROT_NONE, libc_mmap, libc_munmap


class GnttabCalls(LibCalls):
    """The ``xengnttab_*`` calls of :class:`~vdm_xen.sim.lib.SimLib`."""

    # ---- libxengnttab -----------------------------------------------------------------------------

    def _xengnttab_open(self, logger: Any, flags: int) -> int:
        if not self.xen.gntdev:
            return self._fail(errno.ENOENT, 0)
        return self._handle("xgt", object())

    def _xengnttab_close(self, xgt: Any) -> int:
        return self._close("xgt", xgt)

    def _xengnttab_map_domain_grant_refs(self, xgt: Any, count: int, domid: int, refs: Any, prot: int) -> int:
        x = self.xen
        if self._get("xgt", xgt) is None:
            return self._fail(errno.EBADF, 0)
        hook = x.on_grant_map
        err = hook([int(refs[i]) for i in range(count)]) if hook is not None else None
        if err:  # e.g. ENOMEM: dom0 ran out of grant mapping slots
            return self._fail(err, 0)
        d = x.domains.get(domid)
        if d is None or not d.alive or count == 0:
            return self._fail(errno.EINVAL, 0)
        offs = []
        with x.lock:
            for i in range(count):
                g = d.grants.get(int(refs[i]))
                if g is None or (g[1] and prot & mmap.PROT_WRITE):
                    return self._fail(errno.EINVAL, 0)
                offs.append(x.ram.file_offset(g[0]))
            base = libc_mmap(count * PAGE_SIZE, PROT_NONE, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS, -1, 0)
            for i, off in enumerate(offs):
                libc_mmap(PAGE_SIZE, prot, mmap.MAP_SHARED | MAP_FIXED, x.ram.fd, off, base + i * PAGE_SIZE)
                d.grant_maps[int(refs[i])] = d.grant_maps.get(int(refs[i]), 0) + 1
            x.grant_maps_live[base] = (domid, [int(refs[i]) for i in range(count)])
        return base

    def _xengnttab_unmap(self, xgt: Any, addr: Any, count: int) -> int:
        a = int(ffi.cast("uintptr_t", addr))
        with self.xen.lock:
            entry = self.xen.grant_maps_live.get(a)
            if entry is None or len(entry[1]) != count:
                self.xen.violation(f"xengnttab_unmap(0x{a:x}, {count}): not a live grant mapping")
                return self._fail(errno.EINVAL)
            del self.xen.grant_maps_live[a]
            d = self.xen.domains[entry[0]]
            for ref in entry[1]:
                d.grant_maps[ref] -= 1
        libc_munmap(a, count * PAGE_SIZE)
        return 0
