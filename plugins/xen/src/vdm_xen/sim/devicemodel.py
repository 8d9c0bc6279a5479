"""libxendevicemodel, simulated: ioreq servers, their I/O ranges, and interrupts."""

from __future__ import annotations

import errno
from typing import Any

from ..abi import ffi
from .calls import LibCalls
from .state import SimDomain, SimServer


class DeviceModelCalls(LibCalls):
    """The ``xendevicemodel_*`` calls of :class:`~vdm_xen.sim.lib.SimLib`."""

    # ---- libxendevicemodel ------------------------------------------------------------------------

    def _xendevicemodel_open(self, logger: Any, flags: int) -> int:
        return self._dev_open("dmod")

    def _xendevicemodel_close(self, dmod: Any) -> int:
        return self._close("dmod", dmod)

    def _dm(self, dmod: Any, domid: int) -> tuple[int, SimDomain | None]:
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

    def _server(self, dmod: Any, domid: int, sid: int) -> tuple[int, SimServer | None]:
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
        out[0] = self.xen.create_server(d, self.domid).id
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
                s.legacy_gfn = self.xen.next_legacy_gfn()
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
