"""vdm-xen's hypervisor backend: the :class:`vdm.hookspecs.VmmSpec` hooks for one Xen guest.

:class:`XenVmm` opens the library handles (quietly), owns the :class:`~vdm_xen.ioreq.IoreqServer`
and the guest memory, and answers the hooks a :class:`vdm.vmm.Vmm` calls when devices attach:
MMIO/PIO ranges become claimed ioreq ranges, interrupt lines become ``set_irq_level`` calls,
guest memory is :class:`~vdm_xen.memory.XenGuestMemory`. Xen has no ioeventfd or irqfd for a
device model in dom0 (before Linux 6.7's privcmd irqfd), so those hooks are not implemented and
vdm-core falls back to handling kicks in the MMIO handler.
"""

from __future__ import annotations

import errno
import logging
from typing import Any

from vdm import vmmimpl
from vdm.interrupts import IrqLine
from vdm.iorange import IoHandler
from vdm.memory import GuestMemory

from .ioreq import IS_X86, IoreqServer, XenError
from .irq import XenIrqLine
from .memory import ForeignPages, GrantPages, XenGuestMemory

__all__ = ["XenVmm"]

log = logging.getLogger(__name__)


class XenVmm:
    """Serves devices to Xen domain ``domid`` as an IOREQ server."""

    def __init__(self, lib: Any, domid: int, *, irq_kind: str | None = None) -> None:
        self.lib = lib
        self.domid = domid
        self.irq_kind = irq_kind
        ffi = lib.ffi
        self.xce = self.fmem = self.dmod = self.xgt = ffi.NULL
        self._lines: dict[int, XenIrqLine] = {}
        self.server: IoreqServer | None = None
        self._served = (0, 0)  # the closed server's (requests, reads)
        self.memory: XenGuestMemory | None = None
        try:
            logger = lib.quiet_logger
            self.xce = self._open("xenevtchn_open", logger)
            self.fmem = self._open("xenforeignmemory_open", logger)
            self.dmod = self._open("xendevicemodel_open", logger)
            self.xgt = lib.xengnttab_open(logger, 0)
            if self.xgt == ffi.NULL:  # only grant-using guests need it
                log.info("no /dev/xen/gntdev (errno %d): grant addresses will not be mapped", lib.errno)
            grants = GrantPages(lib, self.xgt, domid) if self.xgt != ffi.NULL else None
            self.memory = XenGuestMemory(ForeignPages(lib, self.fmem, domid), grants)
            self.server = IoreqServer(
                lib,
                domid,
                dmod=self.dmod,
                fmem=self.fmem,
                xce=self.xce,
                memory=self.memory,
                on_invalidate=self.memory.invalidate,
            )
        except BaseException:
            self.close()
            raise

    def _open(self, name: str, logger: Any) -> Any:
        handle = getattr(self.lib, name)(logger, 0)
        if handle == self.lib.ffi.NULL:
            err = self.lib.errno or errno.EIO
            raise XenError(err, f"{name}: {errno.errorcode.get(err, err)}")
        return handle

    def start(self) -> None:
        assert self.server is not None
        self.server.start()

    def domain_alive(self) -> bool:
        """False once Xen no longer knows the domain (ESRCH)."""
        n = self.lib.ffi.new("unsigned int *")
        if self.lib.xendevicemodel_nr_vcpus(self.dmod, self.domid, n) == 0:
            return True
        return self.lib.errno != errno.ESRCH

    # ---- VmmSpec ----------------------------------------------------------------------------------

    @vmmimpl
    def vmm_guest_memory(self) -> GuestMemory:
        assert self.memory is not None
        return self.memory

    @vmmimpl
    def vmm_register_mmio(self, base: int, size: int, handler: IoHandler, owner: str) -> bool:
        assert self.server is not None
        self.server.claim(base, size, handler, owner, mmio=True)
        return True

    @vmmimpl
    def vmm_register_pio(self, port: int, count: int, handler: IoHandler, owner: str) -> bool | None:
        if not IS_X86:
            return None
        assert self.server is not None
        self.server.claim(port, count, handler, owner, mmio=False)
        return True

    @vmmimpl
    def vmm_irq_line(self, irq: int) -> IrqLine:
        line = self._lines.get(irq)
        if line is None:
            line = self._lines[irq] = XenIrqLine(self.lib, self.dmod, self.domid, irq, self.irq_kind)
        return line

    def traffic(self) -> str:
        """One line: ioreqs served (reads / writes) and interrupts raised, per line."""
        srv = self.server
        n, r = (srv.requests, srv.reads) if srv is not None else self._served
        irqs = ", ".join(f"irq {i}: {ln.raised}" for i, ln in sorted(self._lines.items()))
        return f"{n} ioreqs ({r} reads, {n - r} writes), interrupts raised: {irqs or 'none'}"

    @vmmimpl
    def vmm_set_irq_level(self, irq: int, level: bool) -> bool:
        self.vmm_irq_line(irq).set_level(level)
        return True

    @vmmimpl
    def vmm_send_msi(self, address: int, data: int) -> bool | None:
        if not IS_X86:
            return None
        if self.lib.xendevicemodel_inject_msi(self.dmod, self.domid, address, data) != 0:
            log.warning(
                "dom%d: inject_msi 0x%x/0x%x failed: errno %d", self.domid, address, data, self.lib.errno
            )
        return True

    # ---- teardown ---------------------------------------------------------------------------------

    def close(self) -> None:
        """Tear the server down, release every guest mapping, close the handles. Idempotent."""
        lib, ffi = self.lib, self.lib.ffi
        if self.server is not None:
            self.server.close()
            self._served = (self.server.requests, self.server.reads)
            self.server = None
        if self.memory is not None:
            self.memory.close()
            self.memory = None
        for name, attr in (
            ("xengnttab_close", "xgt"),
            ("xendevicemodel_close", "dmod"),
            ("xenforeignmemory_close", "fmem"),
            ("xenevtchn_close", "xce"),
        ):
            handle = getattr(self, attr)
            if handle != ffi.NULL:
                getattr(lib, name)(handle)
                setattr(self, attr, ffi.NULL)
