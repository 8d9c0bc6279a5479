"""The simulated hypervisor: :class:`SimXen`, Xen plus dom0's kernel drivers, with one guest domain.

The guest's side is in :mod:`.guest`, the toolstack's in :mod:`.toolstack`; what a device model
calls goes through :class:`~vdm_xen.sim.lib.SimLib` (:meth:`SimXen.lib`).
"""

from __future__ import annotations

import itertools
import mmap
import os
import threading
from typing import Any, Callable

from ..abi import PAGE_SIZE, ffi
from .guest import GuestSide
from .lib import SimLib
from .memory import SimGuestRam
from .state import SimDomain, SimEvtchn, SimServer, SimXsConn
from .toolstack import Toolstack


class SimXen(Toolstack, GuestSide):
    """The simulated hypervisor with one guest domain (``domid``) and dom0.

    ``arch``: "arm" (SPIs, resource mapping only) or "x86" (ISA IRQs/MSI, legacy gfn mapping when
    ``resource_mapping`` is False). ``privcmd``/``privileged``/``ioreq_support``/``xenstore``/
    ``gntdev`` switch off what a host may lack.
    """

    def __init__(
        self,
        *,
        domid: int = 1,
        nr_vcpus: int = 2,
        ram_size: int = 16 << 20,
        ram_base: int = 0x4000_0000,
        arch: str = "arm",
        resource_mapping: bool = True,
        privcmd: bool = True,
        privileged: bool = True,
        ioreq_support: bool = True,
        xenstore: bool = True,
        gntdev: bool = True,
        timeout: float = 10.0,
    ) -> None:
        self.domid = domid
        self.arch = arch
        self.resource_mapping = resource_mapping
        self.privcmd, self.privileged = privcmd, privileged
        self.ioreq_support, self.xenstore, self.gntdev = ioreq_support, xenstore, gntdev
        self.timeout = timeout
        self.lock = threading.RLock()
        self.ram = SimGuestRam(ram_size, ram_base)
        self.domains = {0: SimDomain(0, 1), domid: SimDomain(domid, nr_vcpus)}
        self.servers: dict[int, SimServer] = {}
        self.xen_ports: dict[tuple[int, int], tuple[SimServer, int]] = {}  # (domid, port) -> server, vcpu
        self.port_binding: dict[tuple[int, int], tuple[SimEvtchn, int]] = {}
        self.foreign_maps: dict[int, int] = {}
        self.grant_maps_live: dict[int, tuple[int, list[int]]] = {}
        #: called with the references of every xengnttab_map_domain_grant_refs before it maps;
        #: an errno it returns fails the call (tests: a failing gntdev, a guest dying mid-request)
        self.on_grant_map: Callable[[list[int]], int | None] | None = None
        self.resources: dict[int, int] = {}
        self.violations: list[str] = []
        self.calls: list[str] = []
        self.irq_log: list[tuple[str, int, int]] = []
        self.irq_cond = threading.Condition()
        self.store: dict[str, str] = {
            "/local/domain/0/domid": "0",
            f"/local/domain/{domid}/domid": str(domid),
        }
        self.xs_writes: list[tuple[str, str]] = []
        self.on_xs_write: list[Callable[[str, str], None]] = []
        self._handles: dict[tuple[str, int], Any] = {}
        self._allocs: dict[int, Any] = {}
        self._ids = itertools.count(0x1000)
        self._ports = itertools.count(100)
        self._xen_port_next = 5
        self._server_next = 0
        self._legacy_gfn_next = 0xFEFF0
        self._vcpu_locks = [threading.Lock() for _ in range(nr_vcpus)]
        self._woken: dict[tuple[int, int], threading.Event] = {}
        self.state_trace: list[tuple[int, int]] = []  # (vcpu, state) as the vCPU saw them
        self.requests_done = 0
        self.next_grant = 8
        self._pages: list[tuple[int, mmap.mmap]] = []

    def lib(self, domid: int = 0) -> SimLib:
        """The library namespace a process in domain ``domid`` sees."""
        return SimLib(self, domid)

    def violation(self, what: str) -> None:
        with self.lock:
            self.violations.append(what)

    # ---- what the library parts (calls, evtchn, xenstore, ...) and the mixins share ---------------

    def new_handle(self, kind: str, obj: Any, lib: SimLib) -> int:
        """Open a handle of ``kind`` on ``obj``; its number."""
        with self.lock:
            h = next(self._ids)
            self._handles[(kind, h)] = obj
        return h

    def handle(self, kind: str, h: int) -> Any:
        """The object behind an open handle, or None."""
        return self._handles.get((kind, h))

    def take_handle(self, kind: str, h: int) -> Any:
        """Forget an open handle (it is being closed); its object, or None if it was not open."""
        with self.lock:
            return self._handles.pop((kind, h), None)

    def next_id(self) -> int:
        """A fresh number for a handle or a mapped resource (call with :attr:`lock` held)."""
        return next(self._ids)

    def next_port(self) -> int:
        """A fresh local event-channel port (call with :attr:`lock` held)."""
        return next(self._ports)

    def next_legacy_gfn(self) -> int:
        """The guest frame of the next ioreq page mapped the legacy (x86) way."""
        with self.lock:
            gfn = self._legacy_gfn_next
            self._legacy_gfn_next += 1
            return gfn

    def free(self, addr: int) -> bool:
        """Release what :meth:`malloc`/:meth:`malloc_vector` returned at ``addr``; False if nothing was."""
        with self.lock:
            return self._allocs.pop(addr, None) is not None

    def malloc(self, data: bytes) -> Any:
        buf = ffi.new("char[]", data)
        with self.lock:
            self._allocs[int(ffi.cast("uintptr_t", buf))] = buf
        return buf

    def malloc_vector(self, items: list[str]) -> Any:
        strs = [ffi.new("char[]", s.encode()) for s in items]
        vec = ffi.new("char *[]", [*strs, ffi.NULL])
        with self.lock:
            self._allocs[int(ffi.cast("uintptr_t", vec))] = (vec, strs)
        return vec

    def create_server(self, d: SimDomain, emulator: int) -> SimServer:
        with self.lock:
            fd = os.memfd_create("sim-ioreq-page", os.MFD_CLOEXEC)
            os.ftruncate(fd, PAGE_SIZE)
            page = mmap.mmap(fd, PAGE_SIZE)
            ports = []
            s = SimServer(self._server_next, d.domid, emulator, ports, fd, page)
            self._server_next += 1
            for vcpu in range(d.nr_vcpus):
                port = self._xen_port_next
                self._xen_port_next += 1
                ports.append(port)
                self.xen_ports[(d.domid, port)] = (s, vcpu)
                self._woken[(d.domid, port)] = threading.Event()
            self.servers[s.id] = s
            self._pages.append((fd, page))
            return s

    def vcpu_notified(self, domid: int, port: int) -> threading.Event:
        """Set whenever the device model notifies Xen-side ``port`` of ``domid`` (an ioreq answered)."""
        return self._woken[(domid, port)]

    def notify_xen(self, peer: tuple[int, int]) -> None:
        ev = self._woken.get(peer)
        if ev is not None:
            ev.set()

    def deliver_event(self, e: SimEvtchn, local: int) -> None:
        with self.lock:
            if local in e.masked:
                e.pending.add(local)
                return
            e.masked.add(local)  # the evtchn driver masks a port until user space unmasks it
        os.write(e.w, local.to_bytes(4, "little"))

    def fire_watch(self, conn: SimXsConn, path: str, token: str) -> None:
        with self.lock:
            conn.queue.append((path, token))
        os.write(conn.w, b"w")

    def _watchers(self, path: str) -> list[tuple[SimXsConn, str, str]]:
        out = []
        for (kind, _), c in list(self._handles.items()):
            if kind != "xs":
                continue
            for wpath, token in c.watches:
                if path == wpath or path.startswith(wpath + "/") or wpath.startswith(path + "/"):
                    out.append((c, path, token))
        return out

    # ---- the end ----------------------------------------------------------------------------------

    def leaks(self) -> list[str]:
        """Everything the device model still holds (empty after a clean exit)."""
        with self.lock:
            out = []
            if self.servers:
                out.append(f"ioreq servers not destroyed: {sorted(self.servers)}")
            for s in self.servers.values():
                if s.mmio or s.pio:
                    out.append(f"server {s.id} still claims {s.mmio + s.pio}")
            if self.port_binding:
                out.append(f"event channels still bound: {sorted(self.port_binding)}")
            if self.foreign_maps:
                out.append(f"{len(self.foreign_maps)} foreign mapping(s) not released")
            if self.grant_maps_live:
                out.append(f"{len(self.grant_maps_live)} grant mapping(s) not released")
            if self.resources:
                out.append(f"{len(self.resources)} resource mapping(s) not released")
            if self._handles:
                out.append(f"handles still open: {sorted(k for k, _ in self._handles)}")
            if self._allocs:
                out.append(f"{len(self._allocs)} xenstore result(s) never freed")
            return out

    def close(self) -> None:
        """Release the simulator's own resources (after the device model is done)."""
        for fd, page in self._pages:
            try:
                page.close()
            except BufferError:  # a slot pointer still refers to it; the fd goes anyway
                pass
            os.close(fd)
        self._pages.clear()
        for (kind, _), obj in list(self._handles.items()):
            if kind in ("xce", "xs"):
                obj.close()
        self._handles.clear()
