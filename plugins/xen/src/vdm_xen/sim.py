"""A simulated Xen, sitting exactly at the binding boundary (for tests and fuzzing; never for users).

:class:`SimXen` is the hypervisor plus dom0's kernel drivers; :meth:`SimXen.lib` returns a
:class:`SimLib`, a stand-in for :class:`vdm_xen.bindings.XenLib` with the same function names and
C signatures (arguments are converted and range-checked exactly as cffi converts them for the real
functions; results have the declared C types). Behind it:

* the shared ioreq page is real shared memory (a memfd page mapped twice: once by the "hypervisor",
  once by ``xenforeignmemory_map_resource`` with libc ``mmap``), laid out exactly as ``ioreq_t``;
* event channels are real file descriptors (a pipe per ``xenevtchn`` handle carrying port numbers,
  as ``/dev/xen/evtchn`` does), with Linux's mask-until-unmask delivery;
* guest RAM is a memfd; foreign and grant mappings are real ``mmap`` s of its pages;
* xenstore is an in-memory tree with watches delivered through a pipe fd; results are "malloc'ed"
  and must be given back with ``free``.

It checks the rules real Xen enforces and records every breach in :attr:`SimXen.violations` (a
guest-crashing one also raises :class:`GuestCrashed` in the guest's thread): no backward ioreq state
transition and no unknown state (Xen: "Weird HVM ioreq state transition" -> domain crash); a slot not
NONE when a new request comes ("device model set bad IO state"); one bound port per vCPU, bound to
the ``vp_eport`` Xen wrote at *enable*; MMIO ranges claimed (end inclusive) before the guest touches
them; ``map_resource`` only by the domain that created the server; every mapping, port, handle and
server released at exit (:meth:`SimXen.leaks`).

The guest side: :meth:`SimXen.mmio_read` / :meth:`SimXen.mmio_write` (a vCPU's access, blocking
until the device model answers), :meth:`SimXen.invalidate`, :attr:`SimXen.ram` (a
:class:`vdm.testing.memory.GuestRam` over the memfd), :meth:`SimXen.grant_range`, and the toolstack:
:meth:`SimXen.libxl_add_virtio_disk`, :meth:`SimXen.destroy_domain`.
"""

from __future__ import annotations

import errno
import itertools
import mmap
import os
import re
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import cffi
from vdm.memory import FlatGuestMemory, MemoryRegion
from vdm.testing.memory import CANARY, GUARD, GuestRam

from .abi import (
    GRANT_ADDR_BIT,
    IOREQ_READ,
    IOREQ_TYPE_COPY,
    IOREQ_TYPE_INVALIDATE,
    IOREQ_TYPE_PIO,
    LIBRARIES,
    PAGE_SIZE,
    STATE_IOREQ_INPROCESS,
    STATE_IOREQ_NONE,
    STATE_IOREQ_READY,
    STATE_IORESP_READY,
    XENMEM_resource_ioreq_server,
    ffi,
    flags_state,
    make_flags,
)
from .bindings import declared_functions

__all__ = ["GuestCrashed", "SimGuestRam", "SimLib", "SimXen", "UnclaimedAccess"]

_libc_ffi = cffi.FFI()
_libc_ffi.cdef(
    "void *mmap(void *addr, size_t length, int prot, int flags, int fd, long offset);"
    "int munmap(void *addr, size_t length);"
)
_libc = _libc_ffi.dlopen(None)
_MAP_FIXED = 0x10
_PROT_NONE = 0
_MAP_FAILED = 2**64 - 1 if _libc_ffi.sizeof("void *") == 8 else 2**32 - 1


class GuestCrashed(AssertionError):
    """Real Xen would have crashed the guest (or the vCPU would hang forever)."""


class UnclaimedAccess(AssertionError):
    """The guest touched an address no enabled ioreq server claimed."""


def _mmap(length: int, prot: int, flags: int, fd: int, offset: int, addr: int = 0) -> int:
    p = _libc.mmap(_libc_ffi.cast("void *", addr), length, prot, flags, fd, offset)
    a = int(_libc_ffi.cast("uintptr_t", p))
    if a == _MAP_FAILED:
        raise OSError(_libc_ffi.errno, os.strerror(_libc_ffi.errno))
    return a


def _munmap(addr: int, length: int) -> None:
    _libc.munmap(_libc_ffi.cast("void *", addr), length)


class SimGuestRam(GuestRam):
    """:class:`GuestRam` over a memfd, so that foreign mappings are real shared mappings of it."""

    def __init__(self, size: int = 16 << 20, base: int = 0x4000_0000) -> None:
        self.base = base
        self.size = size
        self.fd = os.memfd_create("sim-guest-ram", os.MFD_CLOEXEC)
        os.ftruncate(self.fd, size + 2 * GUARD)
        self._mm = mmap.mmap(self.fd, size + 2 * GUARD)
        self._mm[:GUARD] = bytes([CANARY]) * GUARD
        self._mm[GUARD + size :] = bytes([CANARY]) * GUARD
        self._host = memoryview(self._mm)
        self.region = MemoryRegion(base, self._host[GUARD : GUARD + size])
        self.memory = FlatGuestMemory([self.region])
        self._free = [(base, size)]

    def file_offset(self, pfn: int) -> int | None:
        """Where guest page ``pfn`` lives in the memfd, or None if it is not RAM."""
        addr = pfn * PAGE_SIZE
        if self.base <= addr and addr + PAGE_SIZE <= self.base + self.size:
            return GUARD + addr - self.base
        return None


@dataclass
class _Server:
    id: int
    domid: int
    emulator: int  # the domain that created it
    ports: list[int]  # Xen-side port per vCPU
    page_fd: int
    page: mmap.mmap
    enabled: bool = False
    mmio: list[tuple[int, int]] = field(default_factory=list)  # inclusive (start, end)
    pio: list[tuple[int, int]] = field(default_factory=list)
    legacy_gfn: int | None = None


@dataclass
class _Domain:
    domid: int
    nr_vcpus: int
    alive: bool = True
    grants: dict[int, tuple[int, bool]] = field(default_factory=dict)  # gref -> (pfn, readonly)
    grant_maps: dict[int, int] = field(default_factory=dict)  # gref -> times mapped


class _Evtchn:
    """One /dev/xen/evtchn open: a pipe of 4-byte port numbers."""

    def __init__(self) -> None:
        self.r, self.w = os.pipe()
        os.set_blocking(self.r, False)
        self.bound: dict[int, tuple[int, int]] = {}  # local port -> (domid, remote port)
        self.masked: set[int] = set()
        self.pending: set[int] = set()

    def close(self) -> None:
        os.close(self.r)
        os.close(self.w)


class _XsConn:
    """One xenstore connection: its watches and the pipe its watch events come through."""

    def __init__(self, domid: int) -> None:
        self.domid = domid
        self.r, self.w = os.pipe()
        os.set_blocking(self.r, False)
        self.watches: list[tuple[str, str]] = []
        self.queue: list[tuple[str, str]] = []

    def close(self) -> None:
        os.close(self.r)
        os.close(self.w)


_DECL = re.compile(r"\s+")


def _signatures() -> dict[str, Any]:
    """Function name -> cffi function-pointer ctype, from the same declarations the bindings use."""
    out = {}
    for soname, decls in LIBRARIES.items():
        names = declared_functions(soname)
        parts = [d for d in decls.split(";") if "(" in d]
        for name, decl in zip(names, parts):
            flat = _DECL.sub(" ", decl).strip()
            ptr = flat.replace(f"{name}(", "(*)(", 1)
            out[name] = ffi.typeof(ptr)
    return out


SIGNATURES = _signatures()


def _check_arg(name: str, i: int, ctype: Any, value: Any) -> Any:
    """Convert/check one argument the way cffi would for the real function."""
    if ctype.kind == "primitive" or ctype.kind == "enum":
        if ctype.cname == "_Bool":
            return bool(value)
        if isinstance(value, ffi.CData):
            raise TypeError(f"{name}() argument {i + 1}: an integer is required, not {ffi.typeof(value)}")
        ffi.new(ctype.cname + " *", value)  # raises OverflowError / TypeError exactly as cffi does
        return int(value)
    if ctype.kind == "pointer":
        if isinstance(value, bytes) and ctype.item.cname in ("char", "void"):
            return value
        if value is None:
            raise TypeError(f"{name}() argument {i + 1}: expected {ctype.cname}, got None")
        if not isinstance(value, ffi.CData):
            raise TypeError(f"{name}() argument {i + 1}: expected {ctype.cname}, got {type(value).__name__}")
        t = ffi.typeof(value)
        if value == ffi.NULL or t is ctype or ctype.item.cname == "void" or t.cname == "void *":
            return value
        if t.kind in ("pointer", "array") and t.item is ctype.item:
            return value
        if t.kind in ("pointer", "array") and t.item.cname == ctype.item.cname:
            return value
        raise TypeError(f"{name}() argument {i + 1}: expected {ctype.cname}, got {t.cname}")
    return value


class SimLib:
    """The library namespace of one simulated calling domain (normally dom0)."""

    XTL_CRITICAL = 9

    def __init__(self, xen: SimXen, domid: int = 0) -> None:
        self.ffi = ffi
        self.xen = xen
        self.domid = domid
        self._tls = threading.local()
        for name, ftype in SIGNATURES.items():
            impl = getattr(self, "_" + name)
            setattr(self, name, self._wrap(name, ftype, impl))

    # ---- plumbing -------------------------------------------------------------------------------

    def _wrap(self, name: str, ftype: Any, impl: Callable[..., Any]) -> Callable[..., Any]:
        args = ftype.args
        result = ftype.result

        def call(*a: Any) -> Any:
            if len(a) != len(args):
                raise TypeError(f"{name} expects {len(args)} arguments, got {len(a)}")
            conv = [_check_arg(name, i, t, v) for i, (t, v) in enumerate(zip(args, a))]
            self.xen.calls.append(name)
            rv = impl(*conv)
            if result.kind == "pointer":
                return ffi.cast(result, rv if rv is not None else 0)
            if result.cname == "_Bool":
                return bool(rv)
            if result.cname == "void":
                return None
            return int(rv)

        call.__name__ = name
        return call

    @property
    def errno(self) -> int:
        return getattr(self._tls, "errno", 0)

    def _fail(self, err: int, ret: Any = -1) -> Any:
        self._tls.errno = err
        return ret

    @property
    def quiet_logger(self) -> Any:
        return ffi.cast("struct xentoollog_logger *", 0x7106)

    def _handle(self, kind: str, obj: Any) -> int:
        return self.xen._new_handle(kind, obj, self)

    def _get(self, kind: str, h: Any) -> Any:
        return self.xen._handles.get((kind, int(ffi.cast("uintptr_t", h))))

    # ---- libxentoollog / libc -------------------------------------------------------------------

    def _xtl_createlogger_stdiostream(self, f: Any, level: int, flags: int) -> int:
        return 0x7106

    def _xtl_logger_destroy(self, logger: Any) -> None:
        return None

    def _fdopen(self, fd: int, mode: bytes) -> int:
        return self._fail(errno.ENOSYS, 0)

    def _free(self, p: Any) -> None:
        if p == ffi.NULL:
            return
        addr = int(ffi.cast("uintptr_t", p))
        with self.xen.lock:
            if self.xen._allocs.pop(addr, None) is None:
                self.xen.violation(f"free() of 0x{addr:x}, which the library did not return")

    # ---- libxendevicemodel ------------------------------------------------------------------------

    def _dev_open(self, kind: str) -> int:
        x = self.xen
        if not x.privcmd:
            return self._fail(errno.ENOENT, 0)
        if not x.privileged:
            return self._fail(errno.EACCES, 0)
        return self._handle(kind, object())

    def _xendevicemodel_open(self, logger: Any, flags: int) -> int:
        return self._dev_open("dmod")

    def _close(self, kind: str, h: Any) -> int:
        with self.xen.lock:
            key = (kind, int(ffi.cast("uintptr_t", h)))
            obj = self.xen._handles.pop(key, None)
        if obj is None:
            self.xen.violation(f"closing a {kind} handle that is not open")
            return self._fail(errno.EBADF)
        if isinstance(obj, (_Evtchn, _XsConn)):
            if isinstance(obj, _Evtchn) and obj.bound:
                self.xen.violation(f"evtchn handle closed with ports still bound: {sorted(obj.bound)}")
            obj.close()
        return 0

    def _xendevicemodel_close(self, dmod: Any) -> int:
        return self._close("dmod", dmod)

    def _dm(self, dmod: Any, domid: int) -> tuple[int, _Domain | None]:
        if self._get("dmod", dmod) is None:
            return errno.EBADF, None
        if not self.xen.ioreq_support:
            return errno.ENOSYS, None
        d = self.xen.domains.get(domid)
        if d is None or not d.alive:
            return errno.ESRCH, None
        if domid == self.domid:
            return errno.EPERM, None
        return 0, d

    def _server(self, dmod: Any, domid: int, sid: int) -> tuple[int, _Server | None]:
        err, _d = self._dm(dmod, domid)
        if err:
            return err, None
        s = self.xen.servers.get(sid)
        if s is None or s.domid != domid:
            return errno.ENOENT, None
        if s.emulator != self.domid:
            return errno.EPERM, None
        return 0, s

    def _xendevicemodel_nr_vcpus(self, dmod: Any, domid: int, out: Any) -> int:
        err, d = self._dm(dmod, domid)
        if err:
            return self._fail(err)
        assert d is not None
        out[0] = d.nr_vcpus
        return 0

    def _xendevicemodel_create_ioreq_server(self, dmod: Any, domid: int, bufioreq: int, out: Any) -> int:
        err, d = self._dm(dmod, domid)
        if err:
            return self._fail(err)
        if bufioreq != 0:
            return self._fail(errno.EINVAL)  # non-x86 Xen refuses buffered ioreqs; we model none
        assert d is not None
        out[0] = self.xen._create_server(d, self.domid).id
        return 0

    def _xendevicemodel_get_ioreq_server_info(
        self, dmod: Any, domid: int, sid: int, ioreq_gfn: Any, bufioreq_gfn: Any, bufioreq_port: Any
    ) -> int:
        err, s = self._server(dmod, domid, sid)
        if err:
            return self._fail(err)
        if self.xen.arch != "x86":
            return self._fail(errno.EOPNOTSUPP)
        assert s is not None
        if ioreq_gfn != ffi.NULL:
            if s.legacy_gfn is None:
                s.legacy_gfn = self.xen._legacy_gfn_next
                self.xen._legacy_gfn_next += 1
            ioreq_gfn[0] = s.legacy_gfn
        if bufioreq_gfn != ffi.NULL:
            return self._fail(errno.ENOENT)
        return 0

    def _range_op(
        self, dmod: Any, domid: int, sid: int, is_mmio: int, start: int, end: int, add: bool
    ) -> int:
        err, s = self._server(dmod, domid, sid)
        if err:
            return self._fail(err)
        assert s is not None
        if start > end:
            return self._fail(errno.EINVAL)
        ranges = s.mmio if is_mmio else s.pio
        with self.xen.lock:
            if add:
                for a, b in ranges:
                    if start <= b and a <= end:
                        return self._fail(errno.EEXIST)
                ranges.append((start, end))
            else:
                if (start, end) not in ranges:
                    return self._fail(errno.ENOENT)
                ranges.remove((start, end))
        return 0

    def _xendevicemodel_map_io_range_to_ioreq_server(self, dmod, domid, sid, is_mmio, start, end):  # type: ignore[no-untyped-def]
        return self._range_op(dmod, domid, sid, is_mmio, start, end, True)

    def _xendevicemodel_unmap_io_range_from_ioreq_server(self, dmod, domid, sid, is_mmio, start, end):  # type: ignore[no-untyped-def]
        return self._range_op(dmod, domid, sid, is_mmio, start, end, False)

    def _xendevicemodel_set_ioreq_server_state(self, dmod: Any, domid: int, sid: int, enabled: int) -> int:
        err, s = self._server(dmod, domid, sid)
        if err:
            return self._fail(err)
        assert s is not None
        with self.xen.lock:
            if enabled and not s.enabled:
                for vcpu, port in enumerate(s.ports):  # ioreq_server_update_evtchn
                    ffi.cast("ioreq_t *", ffi.from_buffer(s.page))[vcpu].vp_eport = port
            s.enabled = bool(enabled)
        return 0

    def _xendevicemodel_destroy_ioreq_server(self, dmod: Any, domid: int, sid: int) -> int:
        err, _s = self._server(dmod, domid, sid)
        if err == errno.ESRCH:  # the domain is gone: Xen already freed its servers
            with self.xen.lock:
                self.xen.servers.pop(sid, None)
        if err:
            return self._fail(err)
        with self.xen.lock:
            self.xen.servers.pop(sid)
        return 0

    def _irq_op(self, dmod: Any, domid: int, kind: str, irq: int, level: int) -> int:
        err, _ = self._dm(dmod, domid)
        if err:
            return self._fail(err)
        if (kind == "spi") != (self.xen.arch == "arm"):
            return self._fail(errno.EOPNOTSUPP)
        if kind == "spi" and not 32 <= irq < 1020:
            return self._fail(errno.EINVAL)
        with self.xen.irq_cond:
            self.xen.irq_log.append((kind, irq, level))
            self.xen.irq_cond.notify_all()
        return 0

    def _xendevicemodel_set_irq_level(self, dmod: Any, domid: int, irq: int, level: int) -> int:
        return self._irq_op(dmod, domid, "spi", irq, level)

    def _xendevicemodel_set_isa_irq_level(self, dmod: Any, domid: int, irq: int, level: int) -> int:
        return self._irq_op(dmod, domid, "isa", irq, level)

    def _xendevicemodel_inject_msi(self, dmod: Any, domid: int, addr: int, data: int) -> int:
        err, _ = self._dm(dmod, domid)
        if err:
            return self._fail(err)
        if self.xen.arch != "x86":
            return self._fail(errno.EOPNOTSUPP)
        with self.xen.irq_cond:
            self.xen.irq_log.append(("msi", addr, data))
            self.xen.irq_cond.notify_all()
        return 0

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
        base = _mmap(pages * PAGE_SIZE, _PROT_NONE, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS, -1, 0)
        for i, src in enumerate(sources):
            if src is None:
                err[i] = -errno.EINVAL
                continue
            _mmap(PAGE_SIZE, prot, mmap.MAP_SHARED | _MAP_FIXED, src[0], src[1], base + i * PAGE_SIZE)
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
        _munmap(a, pages * PAGE_SIZE)
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
        addr = _mmap(PAGE_SIZE, prot, mmap.MAP_SHARED, s.page_fd, 0)
        paddr[0] = ffi.cast("void *", addr)
        with x.lock:
            h = next(x._ids)
            x.resources[h] = addr
        return h

    def _xenforeignmemory_unmap_resource(self, fmem: Any, fres: Any) -> int:
        h = int(ffi.cast("uintptr_t", fres))
        with self.xen.lock:
            addr = self.xen.resources.pop(h, None)
        if addr is None:
            self.xen.violation("unmap_resource of a handle that is not mapped")
            return self._fail(errno.EINVAL)
        _munmap(addr, PAGE_SIZE)
        return 0

    # ---- libxenevtchn -----------------------------------------------------------------------------

    def _xenevtchn_open(self, logger: Any, flags: int) -> int:
        if not self.xen.privcmd:
            return self._fail(errno.ENOENT, 0)
        return self._handle("xce", _Evtchn())

    def _xenevtchn_close(self, xce: Any) -> int:
        return self._close("xce", xce)

    def _xenevtchn_fd(self, xce: Any) -> int:
        e = self._get("xce", xce)
        return e.r if e is not None else self._fail(errno.EBADF)

    def _xenevtchn_bind_interdomain(self, xce: Any, domid: int, remote: int) -> int:
        x = self.xen
        e = self._get("xce", xce)
        if e is None:
            return self._fail(errno.EBADF)
        d = x.domains.get(domid)
        if d is None or not d.alive:
            return self._fail(errno.ESRCH)
        with x.lock:
            owner = x.xen_ports.get((domid, remote))
            if owner is None or owner[0].emulator != self.domid:
                x.violation(f"bind_interdomain to dom{domid} port {remote}: not an ioreq port for us")
                return self._fail(errno.EINVAL)
            if (domid, remote) in x.port_binding:
                return self._fail(errno.EINVAL)
            local = next(x._ports)
            e.bound[local] = (domid, remote)
            x.port_binding[(domid, remote)] = (e, local)
        return local

    def _xenevtchn_unbind(self, xce: Any, port: int) -> int:
        e = self._get("xce", xce)
        if e is None:
            return self._fail(errno.EBADF)
        with self.xen.lock:
            peer = e.bound.pop(port, None)
            if peer is None:
                return self._fail(errno.EINVAL)
            self.xen.port_binding.pop(peer, None)
            e.masked.discard(port)
            e.pending.discard(port)
        return 0

    def _xenevtchn_notify(self, xce: Any, port: int) -> int:
        e = self._get("xce", xce)
        if e is None:
            return self._fail(errno.EBADF)
        with self.xen.lock:
            peer = e.bound.get(port)
        if peer is None:
            return self._fail(errno.EINVAL)
        self.xen._notify_xen(peer)
        return 0

    def _xenevtchn_pending(self, xce: Any) -> int:
        e = self._get("xce", xce)
        if e is None:
            return self._fail(errno.EBADF)
        try:
            data = os.read(e.r, 4)
        except BlockingIOError:
            self.xen.violation("xenevtchn_pending with nothing pending (the real call would block)")
            return self._fail(errno.EAGAIN)
        return int.from_bytes(data, "little")

    def _xenevtchn_unmask(self, xce: Any, port: int) -> int:
        e = self._get("xce", xce)
        if e is None:
            return self._fail(errno.EBADF)
        with self.xen.lock:
            if port not in e.bound:
                return self._fail(errno.EINVAL)
            e.masked.discard(port)
            again = port in e.pending
            e.pending.discard(port)
        if again:
            self.xen._deliver(e, port)
        return 0

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
            base = _mmap(count * PAGE_SIZE, _PROT_NONE, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS, -1, 0)
            for i, off in enumerate(offs):
                _mmap(PAGE_SIZE, prot, mmap.MAP_SHARED | _MAP_FIXED, x.ram.fd, off, base + i * PAGE_SIZE)
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
        _munmap(a, count * PAGE_SIZE)
        return 0

    # ---- libxenstore ------------------------------------------------------------------------------

    def _xs_open(self, flags: int) -> int:
        if not self.xen.xenstore:
            return self._fail(errno.ENOENT, 0)
        conn = _XsConn(self.domid)
        return self._handle("xs", conn)

    def _xs_close(self, h: Any) -> None:
        if h != ffi.NULL:
            self._close("xs", h)

    def _path(self, p: bytes) -> str:
        s = p.decode()
        return s if s.startswith("/") or s.startswith("@") else f"/local/domain/{self.domid}/{s}"

    def _xs_read(self, h: Any, t: int, path: bytes, length: Any) -> int:
        if self._get("xs", h) is None:
            return self._fail(errno.EBADF, 0)
        v = self.xen.store.get(self._path(path))
        if v is None:
            return self._fail(errno.ENOENT, 0)
        if length != ffi.NULL:
            length[0] = len(v)
        return self.xen._malloc(v.encode() + b"\0")

    def _xs_write(self, h: Any, t: int, path: bytes, data: bytes, length: int) -> bool:
        if self._get("xs", h) is None:
            return self._fail(errno.EBADF, False)
        self.xen.xs_write(self._path(path), bytes(data[:length]).decode())
        return True

    def _xs_rm(self, h: Any, t: int, path: bytes) -> bool:
        if self._get("xs", h) is None:
            return self._fail(errno.EBADF, False)
        if not self.xen.xs_rm(self._path(path)):
            return self._fail(errno.ENOENT, False)
        return True

    def _xs_directory(self, h: Any, t: int, path: bytes, num: Any) -> int:
        if self._get("xs", h) is None:
            return self._fail(errno.EBADF, 0)
        p = self._path(path)
        kids = self.xen.xs_children(p)
        if kids is None:
            return self._fail(errno.ENOENT, 0)
        num[0] = len(kids)
        return self.xen._malloc_vector(kids)

    def _xs_watch(self, h: Any, path: bytes, token: bytes) -> bool:
        c = self._get("xs", h)
        if c is None:
            return self._fail(errno.EBADF, False)
        w = (self._path(path), token.decode())
        with self.xen.lock:
            c.watches.append(w)
        self.xen._fire(c, w[0], w[1])  # xenstored fires every new watch once
        return True

    def _xs_unwatch(self, h: Any, path: bytes, token: bytes) -> bool:
        c = self._get("xs", h)
        if c is None:
            return self._fail(errno.EBADF, False)
        w = (self._path(path), token.decode())
        with self.xen.lock:
            if w not in c.watches:
                return self._fail(errno.ENOENT, False)
            c.watches.remove(w)
        return True

    def _xs_fileno(self, h: Any) -> int:
        c = self._get("xs", h)
        return c.r if c is not None else self._fail(errno.EBADF)

    def _xs_check_watch(self, h: Any) -> int:
        c = self._get("xs", h)
        if c is None:
            return self._fail(errno.EBADF, 0)
        with self.xen.lock:
            if not c.queue:
                return self._fail(errno.EAGAIN, 0)
            path, token = c.queue.pop(0)
            try:
                os.read(c.r, 1)
            except BlockingIOError:
                pass
        return self.xen._malloc_vector([path, token])


class SimXen:
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
        self.domains = {0: _Domain(0, 1), domid: _Domain(domid, nr_vcpus)}
        self.servers: dict[int, _Server] = {}
        self.xen_ports: dict[tuple[int, int], tuple[_Server, int]] = {}  # (domid, port) -> server, vcpu
        self.port_binding: dict[tuple[int, int], tuple[_Evtchn, int]] = {}
        self.foreign_maps: dict[int, int] = {}
        self.grant_maps_live: dict[int, tuple[int, list[int]]] = {}
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

    # ---- internals ------------------------------------------------------------------------------

    def _new_handle(self, kind: str, obj: Any, lib: SimLib) -> int:
        with self.lock:
            h = next(self._ids)
            self._handles[(kind, h)] = obj
        return h

    def _malloc(self, data: bytes) -> Any:
        buf = ffi.new("char[]", data)
        with self.lock:
            self._allocs[int(ffi.cast("uintptr_t", buf))] = buf
        return buf

    def _malloc_vector(self, items: list[str]) -> Any:
        strs = [ffi.new("char[]", s.encode()) for s in items]
        vec = ffi.new("char *[]", [*strs, ffi.NULL])
        with self.lock:
            self._allocs[int(ffi.cast("uintptr_t", vec))] = (vec, strs)
        return vec

    def _create_server(self, d: _Domain, emulator: int) -> _Server:
        with self.lock:
            fd = os.memfd_create("sim-ioreq-page", os.MFD_CLOEXEC)
            os.ftruncate(fd, PAGE_SIZE)
            page = mmap.mmap(fd, PAGE_SIZE)
            ports = []
            s = _Server(self._server_next, d.domid, emulator, ports, fd, page)
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

    def _notify_xen(self, peer: tuple[int, int]) -> None:
        ev = self._woken.get(peer)
        if ev is not None:
            ev.set()

    def _deliver(self, e: _Evtchn, local: int) -> None:
        with self.lock:
            if local in e.masked:
                e.pending.add(local)
                return
            e.masked.add(local)  # the evtchn driver masks a port until user space unmasks it
        os.write(e.w, local.to_bytes(4, "little"))

    def _fire(self, conn: _XsConn, path: str, token: str) -> None:
        with self.lock:
            conn.queue.append((path, token))
        os.write(conn.w, b"w")

    def _watchers(self, path: str) -> list[tuple[_XsConn, str, str]]:
        out = []
        for (kind, _), c in list(self._handles.items()):
            if kind != "xs":
                continue
            for wpath, token in c.watches:
                if path == wpath or path.startswith(wpath + "/") or wpath.startswith(path + "/"):
                    out.append((c, path, token))
        return out

    # ---- xenstore, as the toolstack sees it -------------------------------------------------------

    def xs_write(self, path: str, value: str) -> None:
        with self.lock:
            parts = path.strip("/").split("/")
            for i in range(1, len(parts)):
                self.store.setdefault("/" + "/".join(parts[:i]), "")
            self.store[path] = value
            self.xs_writes.append((path, value))
            hooks = list(self.on_xs_write)
            fire = self._watchers(path)
        for hook in hooks:
            hook(path, value)
        for c, p, t in fire:
            self._fire(c, p, t)

    def xs_rm(self, path: str) -> bool:
        with self.lock:
            gone = [k for k in self.store if k == path or k.startswith(path + "/")]
            for k in gone:
                del self.store[k]
            fire = self._watchers(path)
        for c, p, t in fire:
            self._fire(c, p, t)
        return bool(gone)

    def xs_children(self, path: str) -> list[str] | None:
        with self.lock:
            if path not in self.store:
                return None
            pre = path.rstrip("/") + "/"
            return sorted({k[len(pre) :].split("/")[0] for k in self.store if k.startswith(pre)})

    def libxl_add_virtio_disk(
        self, devid: int, params: str, *, base: int, irq: int, mode: str = "w", be_domid: int = 0
    ) -> str:
        """Write what Xen 4.17's libxl writes for ``backendtype=standalone,specification=virtio``."""
        fe = self.domid
        be_path = f"/local/domain/{be_domid}/backend/virtio_disk/{fe}/{devid}"
        fe_path = f"/local/domain/{fe}/device/virtio_disk/{devid}"
        for k, v in {
            "backend-id": str(be_domid),
            "state": "1",
            "virtual-device": str(devid),
            "device-type": "disk",
            "backend": be_path,
        }.items():
            self.xs_write(f"{fe_path}/{k}", v)
        for k, v in {
            "frontend": fe_path,
            "frontend-id": str(fe),
            "online": "1",
            "removable": "0",
            "bootable": "1",
            "dev": "xvda",
            "type": "standalone",
            "mode": mode,
            "device-type": "disk",
            "discard-enable": "0",
            "specification": "virtio",
            "transport": "mmio",
            "base": str(base),
            "irq": str(irq),
            "params": params,
            "state": "1",
        }.items():
            self.xs_write(f"{be_path}/{k}", v)
        return be_path

    def wait_xs(self, path: str, value: str, timeout: float | None = None) -> None:
        """Wait (as libxl does) until ``path`` holds ``value``."""
        deadline = time.monotonic() + (timeout or self.timeout)
        while self.store.get(path) != value:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{path} is {self.store.get(path)!r}, never {value!r}")
            time.sleep(0.002)

    def destroy_domain(self, domid: int | None = None) -> None:
        """The guest dies: Xen frees its servers and ports; @releaseDomain fires."""
        domid = self.domid if domid is None else domid
        with self.lock:
            self.domains[domid].alive = False
            fire = self._watchers("@releaseDomain")
        for c, p, t in fire:
            self._fire(c, p, t)

    # ---- the guest --------------------------------------------------------------------------------

    def grant_range(self, addr: int, length: int, readonly: bool = False) -> int:
        """The guest grants the pages of [addr, addr+length) (consecutive references); returns
        the grant DMA address a Linux guest would put in a descriptor."""
        d = self.domains[self.domid]
        first = addr // PAGE_SIZE
        last = (addr + max(length, 1) - 1) // PAGE_SIZE
        with self.lock:
            gref0 = self.next_grant
            for i, pfn in enumerate(range(first, last + 1)):
                d.grants[gref0 + i] = (pfn, readonly)
            self.next_grant += last - first + 1
        return GRANT_ADDR_BIT | (gref0 << 12) | (addr % PAGE_SIZE)

    def revoke_grants(self, dma_addr: int, length: int) -> bool:
        """gnttab_end_foreign_access: fails (False) while the backend still maps a page."""
        d = self.domains[self.domid]
        gref0 = (dma_addr & ~GRANT_ADDR_BIT) >> 12
        n = ((dma_addr % PAGE_SIZE) + max(length, 1) - 1) // PAGE_SIZE + 1
        with self.lock:
            if any(d.grant_maps.get(g, 0) for g in range(gref0, gref0 + n)):
                return False
            for g in range(gref0, gref0 + n):
                d.grants.pop(g, None)
        return True

    def _route(self, rtype: int, addr: int, size: int) -> list[_Server]:
        d = self.domid
        with self.lock:
            servers = [s for s in self.servers.values() if s.domid == d and s.enabled]
        if rtype not in (IOREQ_TYPE_COPY, IOREQ_TYPE_PIO):
            return servers  # INVALIDATE (and, here, any other type) goes to every server
        for s in servers:
            ranges = s.mmio if rtype == IOREQ_TYPE_COPY else s.pio
            for a, b in ranges:
                if a <= addr and addr + size - 1 <= b:
                    return [s]
        raise UnclaimedAccess(f"dom{d}: {'MMIO' if rtype == IOREQ_TYPE_COPY else 'port'} 0x{addr:x}/{size}")

    def request(
        self,
        rtype: int,
        addr: int,
        size: int,
        *,
        data: int = 0,
        read: bool,
        vcpu: int = 0,
        count: int = 1,
        data_is_ptr: int = 0,
        df: int = 0,
    ) -> int:
        """vCPU ``vcpu`` sends one ioreq and blocks until the device model answers; returns data."""
        if not self.domains[self.domid].alive:
            raise GuestCrashed("the domain is dead")
        value = data
        for s in self._route(rtype, addr, size):
            value = self._one(s, vcpu, rtype, addr, size, data, read, count, data_is_ptr, df)
        return value

    def _one(self, s: _Server, vcpu: int, rtype: int, addr: int, size: int, data: int, read: bool,
             count: int, data_is_ptr: int, df: int) -> int:  # fmt: skip
        slot = ffi.cast("ioreq_t *", ffi.from_buffer(s.page)) + vcpu
        port = s.ports[vcpu]
        with self._vcpu_locks[vcpu]:
            state = flags_state(slot.flags)
            if state != STATE_IOREQ_NONE:
                self._crash(f"vCPU {vcpu}: device model set bad IO state {state} (slot not NONE)")
            slot.addr, slot.data, slot.count, slot.size, slot.type = addr, data, count, size, rtype
            woken = self._woken[(s.domid, port)]
            woken.clear()
            slot.flags = make_flags(STATE_IOREQ_READY, data_is_ptr, IOREQ_READ if read else 0, df)
            with self.lock:
                binding = self.port_binding.get((s.domid, port))
            if binding is None:
                self._crash(f"vCPU {vcpu}: no device model bound event channel {port}; the vCPU hangs")
            self._deliver(*binding)
            seen = STATE_IOREQ_READY
            deadline = time.monotonic() + self.timeout
            while True:
                notified = woken.wait(0.0005)
                state = flags_state(slot.flags)
                if state != seen:
                    self.state_trace.append((vcpu, state))
                    if state < seen or state not in (STATE_IOREQ_INPROCESS, STATE_IORESP_READY):
                        self._crash(f"vCPU {vcpu}: Weird HVM ioreq state transition {seen} -> {state}")
                    seen = state
                if notified:
                    woken.clear()
                    if state == STATE_IORESP_READY:
                        break
                    # READY/INPROCESS: Xen keeps waiting (a spurious notification)
                if time.monotonic() > deadline:
                    self._crash(f"vCPU {vcpu}: no answer within {self.timeout}s (state {state})")
            result = int(slot.data)
            slot.flags = make_flags(STATE_IOREQ_NONE)
            self.requests_done += 1
            mask = (1 << (8 * min(size, 8))) - 1
            return result & mask if read and not data_is_ptr else result

    def _crash(self, what: str) -> None:
        self.violation(what)
        with self.lock:
            self.domains[self.domid].alive = False
        raise GuestCrashed(what)

    def mmio_read(self, addr: int, size: int = 4, vcpu: int = 0) -> int:
        return self.request(IOREQ_TYPE_COPY, addr, size, read=True, vcpu=vcpu)

    def mmio_write(self, addr: int, size: int, value: int, vcpu: int = 0) -> None:
        self.request(IOREQ_TYPE_COPY, addr, size, data=value, read=False, vcpu=vcpu)

    def pio_read(self, port: int, size: int = 1, vcpu: int = 0) -> int:
        return self.request(IOREQ_TYPE_PIO, port, size, read=True, vcpu=vcpu)

    def invalidate(self, vcpu: int = 0) -> None:
        """What Xen sends after the guest's memory map changed (x86 decrease_reservation)."""
        self.request(IOREQ_TYPE_INVALIDATE, 0, 8, read=False, vcpu=vcpu)

    def wait_irq(self, predicate: Callable[[list[tuple[str, int, int]]], bool], timeout: float = 5.0) -> None:
        with self.irq_cond:
            if not self.irq_cond.wait_for(lambda: predicate(self.irq_log), timeout):
                raise TimeoutError(f"interrupts seen: {self.irq_log[-10:]}")

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
