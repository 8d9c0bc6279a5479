"""The IOREQ server: Xen forwards a guest's accesses to claimed MMIO/PIO ranges to us.

Life cycle (Xen 4.17's rules, from Xen's public headers: ``struct ioreq`` / ``shared_iopage_t`` in
``xen/include/public/hvm/ioreq.h``, the ``XEN_DMOP_*_ioreq_server*`` operations and
``struct xen_dm_op_ioreq_server_range`` in ``xen/include/public/hvm/dm_op.h``,
``XENMEM_resource_ioreq_server`` in ``xen/include/public/memory.h``, and libxendevicemodel's
``xendevicemodel.h``; the same order as QEMU's ``hw/xen/xen-hvm-common.c``):

1. ``xendevicemodel_nr_vcpus`` -- one ``ioreq_t`` slot per vCPU;
2. ``create_ioreq_server`` (buffered ioreqs off: a virtio-mmio device model needs none);
3. map the shared ioreq page: ``xenforeignmemory_map_resource`` frame 1 (on x86, when that is
   EOPNOTSUPP: ``get_ioreq_server_info`` + ``xenforeignmemory_map`` of the gfn);
4. enable the server -- Xen writes each vCPU's ``vp_eport`` into its slot now;
5. bind one event channel per vCPU to that ``vp_eport``;
6. claim each device's range (``map_io_range_to_ioreq_server``, *end inclusive*);
7. serve: on an event, a slot in state READY is read (after a read barrier), set INPROCESS,
   dispatched to the range's :class:`vdm.iorange.IoHandler`, answered (data for reads), a write
   barrier, IORESP_READY, and the vCPU's port notified. INVALIDATE drops the guest-memory cache.
8. :meth:`IoreqServer.close` undoes it all in reverse order.

Everything goes through a library namespace (:class:`vdm_xen.bindings.XenLib` or a simulated one).
The guest is untrusted: any address, size, count or type is answered without raising.
"""

from __future__ import annotations

import bisect
import errno
import logging
import mmap
import os
import platform
import select
from dataclasses import dataclass
from typing import Any, Callable, Iterator

from vdm.barrier import rmb, wmb
from vdm.iorange import IoHandler
from vdm.memory import GuestMemory, GuestMemoryError

from .abi import (
    HVM_IOREQSRV_BUFIOREQ_OFF,
    IOREQ_READ,
    IOREQ_TYPE_COPY,
    IOREQ_TYPE_INVALIDATE,
    IOREQ_TYPE_PCI_CONFIG,
    IOREQ_TYPE_PIO,
    IOREQ_TYPE_TIMEOFFSET,
    MAX_VCPUS,
    STATE_IOREQ_INPROCESS,
    STATE_IOREQ_READY,
    STATE_IORESP_READY,
    XENMEM_resource_ioreq_server,
    XENMEM_resource_ioreq_server_frame_ioreq,
    flags_data_is_ptr,
    flags_df,
    flags_dir,
    flags_state,
    with_state,
)

__all__ = ["IoBus", "IoreqServer", "XenError"]

log = logging.getLogger(__name__)

IS_X86 = platform.machine() in ("x86_64", "i386", "i686", "AMD64")
#: the longest x86 rep string request served (Xen itself splits at a page)
MAX_REP = 4096


class XenError(OSError):
    """A Xen call failed; ``errno`` says why."""


def _fail(lib: Any, what: str) -> XenError:
    err = lib.errno or errno.EIO
    return XenError(err, f"{what}: {os.strerror(err)}")


@dataclass
class _Range:
    base: int
    size: int
    handler: IoHandler
    owner: str

    @property
    def end(self) -> int:
        return self.base + self.size


class IoBus:
    """Non-overlapping ranges, each with its handler."""

    def __init__(self) -> None:
        self._ranges: list[_Range] = []
        self._bases: list[int] = []

    def add(self, base: int, size: int, handler: IoHandler, owner: str) -> None:
        if size <= 0 or base < 0:
            raise ValueError(f"{owner}: bad range 0x{base:x}+0x{size:x}")
        i = bisect.bisect_right(self._bases, base)
        for j in (i - 1, i):
            if 0 <= j < len(self._ranges):
                r = self._ranges[j]
                if base < r.end and r.base < base + size:
                    raise ValueError(f"{owner}: 0x{base:x}+0x{size:x} overlaps {r.owner}")
        self._ranges.insert(i, _Range(base, size, handler, owner))
        self._bases.insert(i, base)

    def remove(self, base: int) -> _Range:
        i = self._bases.index(base)
        del self._bases[i]
        return self._ranges.pop(i)

    def find(self, addr: int, size: int) -> _Range | None:
        i = bisect.bisect_right(self._bases, addr) - 1
        if i >= 0:
            r = self._ranges[i]
            if addr + size <= r.end:
                return r
        return None

    def __iter__(self) -> Iterator[_Range]:
        return iter(list(self._ranges))


def _mask(size: int) -> int:
    return (1 << (8 * min(max(size, 1), 8))) - 1


class IoreqServer:
    """One IOREQ server for domain ``domid``. Not thread-safe: one thread serves it.

    :param lib: the library namespace (real or simulated)
    :param memory: guest memory for x86 rep string requests (``data_is_ptr``); may be set later
    :param on_invalidate: called for IOREQ_TYPE_INVALIDATE (drop cached foreign mappings)
    """

    def __init__(
        self,
        lib: Any,
        domid: int,
        *,
        dmod: Any,
        fmem: Any,
        xce: Any,
        memory: GuestMemory | None = None,
        on_invalidate: Callable[[], None] | None = None,
    ) -> None:
        self.lib = lib
        self.ffi = lib.ffi
        self.domid = domid
        self.dmod, self.fmem, self.xce = dmod, fmem, xce
        self.memory = memory
        self.on_invalidate = on_invalidate
        self.mmio = IoBus()
        self.pio = IoBus()
        self.nr_vcpus = 0
        self.id: int | None = None
        self.enabled = False
        self._fres: Any = None  # resource handle, or
        self._legacy_page: Any = None  # legacy foreign mapping of the ioreq gfn
        self._page: Any = None  # ioreq_t * (vcpu_ioreq[0])
        self._ports: dict[int, int] = {}  # local port -> vCPU
        self._vcpu_port: list[int] = []
        self._warned: set[tuple[str, int]] = set()
        #: requests served, and how many of them were reads (never decremented)
        self.requests = 0
        self.reads = 0

    # ---- set-up ---------------------------------------------------------------------------------

    def start(self) -> None:
        """Create, map, enable and bind: after this, claimed ranges are served."""
        lib, ffi = self.lib, self.ffi
        try:
            n = ffi.new("unsigned int *")
            if lib.xendevicemodel_nr_vcpus(self.dmod, self.domid, n) != 0:
                raise _fail(lib, f"dom{self.domid}: xendevicemodel_nr_vcpus")
            if not 1 <= n[0] <= MAX_VCPUS:
                raise XenError(
                    errno.EINVAL, f"dom{self.domid} has {n[0]} vCPUs (one ioreq page serves 1..128)"
                )
            self.nr_vcpus = n[0]
            sid = ffi.new("ioservid_t *")
            if (
                lib.xendevicemodel_create_ioreq_server(self.dmod, self.domid, HVM_IOREQSRV_BUFIOREQ_OFF, sid)
                != 0
            ):
                raise _fail(lib, f"dom{self.domid}: xendevicemodel_create_ioreq_server")
            self.id = sid[0]
            self._map_ioreq_page()
            if lib.xendevicemodel_set_ioreq_server_state(self.dmod, self.domid, self.id, 1) != 0:
                raise _fail(lib, f"dom{self.domid}: enabling ioreq server {self.id}")
            self.enabled = True
            # vp_eport is valid only now: Xen writes it when the server is enabled
            for vcpu in range(self.nr_vcpus):
                remote = self._page[vcpu].vp_eport
                local = lib.xenevtchn_bind_interdomain(self.xce, self.domid, remote)
                if local == -1:
                    raise _fail(lib, f"dom{self.domid}: binding vCPU {vcpu}'s event channel {remote}")
                self._ports[local] = vcpu
                self._vcpu_port.append(local)
        except BaseException:
            self.close()
            raise
        log.info(
            "dom%d: ioreq server %d, %d vCPU(s), ports %s",
            self.domid,
            self.id,
            self.nr_vcpus,
            self._vcpu_port,
        )

    def _map_ioreq_page(self) -> None:
        lib, ffi = self.lib, self.ffi
        addr = ffi.new("void **")
        fres = lib.xenforeignmemory_map_resource(
            self.fmem,
            self.domid,
            XENMEM_resource_ioreq_server,
            self.id,
            XENMEM_resource_ioreq_server_frame_ioreq(0),
            1,
            addr,
            mmap.PROT_READ | mmap.PROT_WRITE,
            0,
        )
        if fres != ffi.NULL:
            self._fres = fres
            self._page = ffi.cast("ioreq_t *", addr[0])
            return
        err = lib.errno
        if err != errno.EOPNOTSUPP or not IS_X86:
            raise _fail(lib, f"dom{self.domid}: mapping ioreq server {self.id}'s page")
        # x86 without resource mapping (old kernel): the server's page lives at a guest gfn
        gfn = ffi.new("xen_pfn_t *")
        if (
            lib.xendevicemodel_get_ioreq_server_info(self.dmod, self.domid, self.id, gfn, ffi.NULL, ffi.NULL)
            != 0
        ):
            raise _fail(lib, f"dom{self.domid}: xendevicemodel_get_ioreq_server_info")
        pfns = ffi.new("xen_pfn_t[1]", [gfn[0]])
        errs = ffi.new("int[1]")
        page = lib.xenforeignmemory_map(
            self.fmem, self.domid, mmap.PROT_READ | mmap.PROT_WRITE, 1, pfns, errs
        )
        if page == ffi.NULL or errs[0]:
            if page != ffi.NULL:
                lib.xenforeignmemory_unmap(self.fmem, page, 1)
            raise _fail(lib, f"dom{self.domid}: mapping the ioreq page at gfn 0x{gfn[0]:x}")
        self._legacy_page = page
        self._page = ffi.cast("ioreq_t *", page)

    # ---- ranges ---------------------------------------------------------------------------------

    def claim(self, base: int, size: int, handler: IoHandler, owner: str, *, mmio: bool = True) -> None:
        """Route ``[base, base + size)`` to ``handler`` (Xen's range end is inclusive)."""
        if self.id is None:
            raise XenError(errno.EINVAL, "the ioreq server is not started")
        bus = self.mmio if mmio else self.pio
        bus.add(base, size, handler, owner)
        rc = self.lib.xendevicemodel_map_io_range_to_ioreq_server(
            self.dmod, self.domid, self.id, 1 if mmio else 0, base, base + size - 1
        )
        if rc != 0:
            bus.remove(base)
            raise _fail(self.lib, f"{owner}: claiming {'MMIO' if mmio else 'port'} 0x{base:x}+0x{size:x}")

    def release(self, base: int, *, mmio: bool = True) -> None:
        bus = self.mmio if mmio else self.pio
        r = bus.remove(base)
        if self.id is not None:
            rc = self.lib.xendevicemodel_unmap_io_range_from_ioreq_server(
                self.dmod, self.domid, self.id, 1 if mmio else 0, r.base, r.end - 1
            )
            if rc != 0:
                log.debug("%s: releasing 0x%x: errno %d", r.owner, r.base, self.lib.errno)

    # ---- serving --------------------------------------------------------------------------------

    @property
    def fd(self) -> int:
        """The event-channel fd: readable when a vCPU has a request for us."""
        return self.lib.xenevtchn_fd(self.xce)

    @property
    def ports(self) -> list[int]:
        """Local event-channel port of each vCPU."""
        return list(self._vcpu_port)

    def handle_event(self) -> None:
        """The event-channel fd is readable: take one pending port and serve its vCPU's slot."""
        lib = self.lib
        port = lib.xenevtchn_pending(self.xce)
        if port == -1:
            return
        lib.xenevtchn_unmask(self.xce, port)
        vcpu = self._ports.get(port)
        if vcpu is not None:
            self.serve_slot(vcpu)

    def serve_slot(self, vcpu: int) -> bool:
        """Serve vCPU ``vcpu``'s slot if it holds a READY request; True if one was served."""
        req = self._page[vcpu]
        if flags_state(req.flags) != STATE_IOREQ_READY:
            return False  # spurious event, or not ours to touch
        rmb()
        flags = req.flags
        addr, data, count, size, rtype = req.addr, req.data, req.count, req.size, req.type
        req.flags = with_state(flags, STATE_IOREQ_INPROCESS)
        self.requests += 1
        self.reads += flags_dir(flags) == IOREQ_READ
        try:
            result = self._dispatch(rtype, addr, data, count, size, flags)
        except Exception:  # a handler bug must not leave the vCPU waiting forever
            log.exception("dom%d: ioreq type %d at 0x%x", self.domid, rtype, addr)
            result = _mask(size if size in (1, 2, 4, 8) else 8) if flags_dir(flags) == IOREQ_READ else None
        if result is not None:
            req.data = result
        wmb()
        req.flags = with_state(flags, STATE_IORESP_READY)
        self.lib.xenevtchn_notify(self.xce, self._vcpu_port[vcpu])
        return True

    def _warn_once(self, what: str, key: int, *args: Any) -> None:
        if (what, key) not in self._warned:
            self._warned.add((what, key))
            log.warning("dom%d: " + what, self.domid, *args)

    def _dispatch(self, rtype: int, addr: int, data: int, count: int, size: int, flags: int) -> int | None:
        """Return the value to put in ``data`` (reads), or None to leave it."""
        is_read = flags_dir(flags) == IOREQ_READ
        if rtype in (IOREQ_TYPE_COPY, IOREQ_TYPE_PIO):
            bus = self.mmio if rtype == IOREQ_TYPE_COPY else self.pio
            if size not in (1, 2, 4, 8):
                self._warn_once("ioreq of size %d at 0x%x ignored", size, size, addr)
                return _mask(size) if is_read else None
            if flags_data_is_ptr(flags) or count > 1:
                self._rep(bus, addr, data, count, size, flags)
                return None
            return self._access(bus, addr, size, is_read, data)
        if rtype == IOREQ_TYPE_INVALIDATE:
            if self.on_invalidate is not None:
                self.on_invalidate()
            return None
        if rtype == IOREQ_TYPE_TIMEOFFSET:
            return None
        if rtype == IOREQ_TYPE_PCI_CONFIG:
            self._warn_once("PCI config space access 0x%x not emulated", 0, addr)
        else:
            self._warn_once("unknown ioreq type %d ignored", rtype, rtype)
        return _mask(size if size in (1, 2, 4, 8) else 8) if is_read else None

    def _access(self, bus: IoBus, addr: int, size: int, is_read: bool, value: int) -> int | None:
        r = bus.find(addr, size)
        if r is None:
            self._warn_once("access to unclaimed 0x%x ignored", addr, addr)
            return _mask(size) if is_read else None
        off = addr - r.base
        if is_read:
            return int(r.handler.read(off, size)) & _mask(size)
        r.handler.write(off, size, value & _mask(size))
        return None

    def _rep(self, bus: IoBus, addr: int, data: int, count: int, size: int, flags: int) -> None:
        """x86 rep string I/O: ``count`` elements; with data_is_ptr, ``data`` is a guest address."""
        is_read = flags_dir(flags) == IOREQ_READ
        step = -size if flags_df(flags) else size
        if count > MAX_REP:
            self._warn_once("rep count %d cut to %d", 1, count, MAX_REP)
            count = MAX_REP
        ptr = flags_data_is_ptr(flags)
        for i in range(count):
            a = addr + i * step if bus is self.mmio else addr
            try:
                if is_read:
                    v = self._access(bus, a, size, True, 0)
                    if ptr and self.memory is not None:
                        self.memory.write(data + i * step, int(v or 0).to_bytes(size, "little"))
                else:
                    if ptr:
                        if self.memory is None:
                            return
                        v = int.from_bytes(self.memory.read(data + i * step, size), "little")
                    else:
                        v = data
                    self._access(bus, a, size, False, v)
            except GuestMemoryError as e:
                self._warn_once("rep I/O with a bad guest buffer: %s", 2, e)
                return

    # ---- the loop -------------------------------------------------------------------------------

    def serve(
        self,
        stop_fd: int,
        *,
        readers: dict[int, Callable[[], None]] | None = None,
        tick: float | None = None,
        on_tick: Callable[[], None] | None = None,
        should_stop: Callable[[], bool] = lambda: False,
    ) -> None:
        """Serve until ``stop_fd`` is readable or ``should_stop()``; also run ``readers`` callbacks
        when their fds are readable and ``on_tick`` every ``tick`` seconds."""
        poller = select.poll()
        evfd = self.fd
        poller.register(evfd, select.POLLIN)
        poller.register(stop_fd, select.POLLIN)
        readers = dict(readers or {})
        for fd in readers:
            poller.register(fd, select.POLLIN)
        timeout_ms = None if tick is None else int(tick * 1000)
        while not should_stop():
            try:
                events = poller.poll(timeout_ms)
            except InterruptedError:  # pragma: no cover - Python retries poll itself
                continue
            if not events and on_tick is not None:
                on_tick()
                continue
            for fd, _ev in events:
                if fd == stop_fd:
                    return
                if fd == evfd:
                    self.handle_event()
                elif fd in readers:
                    readers[fd]()

    # ---- teardown -------------------------------------------------------------------------------

    def close(self) -> None:
        """Release the ranges, unbind the ports, disable, unmap and destroy the server."""
        lib = self.lib
        for bus, mmio in ((self.mmio, True), (self.pio, False)):
            for r in bus:
                self.release(r.base, mmio=mmio)
        for port in self._vcpu_port:
            if lib.xenevtchn_unbind(self.xce, port) != 0:
                log.debug("unbinding port %d: errno %d", port, lib.errno)
        self._vcpu_port.clear()
        self._ports.clear()
        if self.enabled:
            if lib.xendevicemodel_set_ioreq_server_state(self.dmod, self.domid, self.id, 0) != 0:
                log.debug("disabling ioreq server %s: errno %d", self.id, lib.errno)
            self.enabled = False
        self._page = None
        if self._fres is not None:
            lib.xenforeignmemory_unmap_resource(self.fmem, self._fres)
            self._fres = None
        if self._legacy_page is not None:
            lib.xenforeignmemory_unmap(self.fmem, self._legacy_page, 1)
            self._legacy_page = None
        if self.id is not None:
            if lib.xendevicemodel_destroy_ioreq_server(self.dmod, self.domid, self.id) != 0:
                log.debug("destroying ioreq server %s: errno %d", self.id, lib.errno)
            self.id = None
