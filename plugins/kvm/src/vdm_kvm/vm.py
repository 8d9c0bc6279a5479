"""One KVM virtual machine: guest RAM slots, interrupt controllers and lines, and its vCPUs' lifetime.

* :class:`Vm` -- guest RAM slots (anonymous or memfd ``mmap``), the in-kernel irqchip and PIT,
  ``KVM_IRQ_LINE``, MSIs (``KVM_SIGNAL_MSI`` and GSI routes), ioeventfds, irqfds, the PIO and MMIO
  buses, and the vCPUs' lifetime (:meth:`Vm.start`, :meth:`Vm.wait`, :meth:`Vm.stop`);
* :class:`KvmIrqLine` -- one GSI of the in-kernel irqchip as a :class:`vdm.interrupts.IrqLine`.
"""

from __future__ import annotations

import logging
import mmap
import os
import threading
import time
from typing import TYPE_CHECKING, Any, Callable

from vdm.eventfd import EFD_CLOEXEC, EFD_NONBLOCK, eventfd
from vdm.interrupts import EventfdIrqLine, IrqLine
from vdm.memory import FlatGuestMemory, MemoryRegion

from . import kvm_abi as abi
from .bus import IoBus
from .exits import VmExit
from .ioctl import kvm_ioctl
from .kvm_abi import ffi
from .vcpu import Vcpu

if TYPE_CHECKING:
    from .kvm import Kvm

log = logging.getLogger(__name__)

_MAP_NORESERVE = getattr(mmap, "MAP_NORESERVE", 0x4000)


def _host_address(buf: Any) -> int:
    return int(ffi.cast("uintptr_t", ffi.from_buffer(buf)))


class KvmIrqLine(IrqLine):
    """A GSI of the in-kernel irqchip driven with ``KVM_IRQ_LINE`` (one ioctl, no vCPU exit).

    One object per GSI (:meth:`Vm.line`): it remembers the level, so raising a line that is
    already high costs nothing, as on a real wire.
    """

    def __init__(self, vm: Vm, gsi: int) -> None:
        self._fd = vm.fd
        self.gsi = gsi
        self._level = False
        self._lock = threading.Lock()
        self._req = ffi.new("struct kvm_irq_level *")

    @property
    def level(self) -> bool:
        return self._level

    def _set(self, level: bool) -> None:
        self._req.irq = self.gsi
        self._req.level = 1 if level else 0
        kvm_ioctl(self._fd, abi.KVM_IRQ_LINE, self._req, "KVM_IRQ_LINE")

    def set_level(self, level: bool) -> None:
        level = bool(level)
        with self._lock:
            if level != self._level:
                self._set(level)
                self._level = level

    def trigger(self) -> None:
        with self._lock:
            if not self._level:
                self._set(True)
            self._set(False)
            self._level = False


class _Slot:
    __slots__ = ("fd", "flags", "guest_addr", "host_addr", "mm", "region", "size", "slot")

    def __init__(self, slot: int, guest_addr: int, size: int, mm: mmap.mmap, fd: int, flags: int) -> None:
        self.slot = slot
        self.guest_addr = guest_addr
        self.size = size
        self.mm = mm
        self.fd = fd
        self.flags = flags
        self.host_addr = _host_address(mm)
        self.region = MemoryRegion(guest_addr, mm)


class Vm:
    """One KVM virtual machine."""

    def __init__(self, kvm: Kvm) -> None:
        self.kvm = kvm
        self.fd = kvm_ioctl(kvm.fd, abi.KVM_CREATE_VM, 0, "KVM_CREATE_VM")
        self.pio_bus = IoBus("pio", 0x10000)
        self.mmio_bus = IoBus("mmio", 1 << 64)
        self.vcpus: list[Vcpu] = []
        self.has_irqchip = False
        self._slots: list[_Slot] = []
        self._memory = FlatGuestMemory()
        self._gsi_routes: dict[int, tuple[int, int]] = {}  # gsi -> (address, data) for MSI routes
        self._lines: dict[int, KvmIrqLine] = {}
        self._own_fds: list[int] = []
        self._lock = threading.Lock()
        self._exit: VmExit | None = None
        self._exited = threading.Event()
        #: set once by :meth:`request_exit`; vCPU threads read it on every exit (a plain attribute:
        #: no property call on that path); nothing else writes it
        self.stopping = False
        #: called once, with the :class:`VmExit`, when the VM stops for any reason
        self.on_exit: list[Callable[[VmExit], None]] = []

    # ---- memory -------------------------------------------------------------------------------

    def add_memory(self, guest_addr: int, size: int, *, memfd: bool = False, readonly: bool = False,
                   name: str = "vdm-ram") -> MemoryRegion:
        """Back ``[guest_addr, guest_addr + size)`` with fresh host memory and give it to the guest.

        ``memfd``: back it with a memfd (shared mapping, so another process can map the same RAM,
        as vhost-user needs); otherwise anonymous private memory. Both are ``MAP_NORESERVE``: host
        pages are only used when the guest touches them.
        """
        if guest_addr % mmap.PAGESIZE or size <= 0 or size % mmap.PAGESIZE:
            raise ValueError("guest memory must be page aligned")
        fd = -1
        if memfd:
            fd = os.memfd_create(name, os.MFD_CLOEXEC)
            os.ftruncate(fd, size)
            mm = mmap.mmap(fd, size, mmap.MAP_SHARED | _MAP_NORESERVE, mmap.PROT_READ | mmap.PROT_WRITE)
        else:
            mm = mmap.mmap(-1, size, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | _MAP_NORESERVE,
                           mmap.PROT_READ | mmap.PROT_WRITE)
        if hasattr(mm, "madvise") and hasattr(mmap, "MADV_HUGEPAGE") and not memfd:
            try:
                mm.madvise(mmap.MADV_HUGEPAGE)
            except OSError:
                pass
        flags = abi.KVM_MEM_READONLY if readonly else 0
        with self._lock:
            slot = _Slot(len(self._slots), guest_addr, size, mm, fd, flags)
            self._memory.add_region(slot.region)  # raises on overlap before KVM sees it
            try:
                self._set_slot(slot)
            except BaseException:
                self._memory.remove_region(guest_addr)
                raise
            self._slots.append(slot)
        return slot.region

    def _set_slot(self, slot: _Slot, size: int | None = None) -> None:
        region = ffi.new("struct kvm_userspace_memory_region *", {
            "slot": slot.slot, "flags": slot.flags, "guest_phys_addr": slot.guest_addr,
            "memory_size": slot.size if size is None else size, "userspace_addr": slot.host_addr,
        })
        kvm_ioctl(self.fd, abi.KVM_SET_USER_MEMORY_REGION, region, "KVM_SET_USER_MEMORY_REGION")

    @property
    def memory_regions(self) -> tuple[MemoryRegion, ...]:
        """The guest RAM regions, sorted by guest address (for :class:`vdm.memory.FlatGuestMemory`)."""
        return self._memory.regions

    @property
    def guest_memory(self) -> FlatGuestMemory:
        """All guest RAM as one bounds-checked :class:`vdm.memory.FlatGuestMemory`."""
        return self._memory

    def memory_fds(self) -> list[tuple[int, int, int]]:
        """``(guest_addr, size, fd)`` of memfd-backed slots (for sharing RAM with another process)."""
        return [(s.guest_addr, s.size, s.fd) for s in self._slots if s.fd >= 0]

    # ---- interrupt controllers and lines -------------------------------------------------------

    def set_tss_addr(self, addr: int = 0xFFFBD000) -> None:
        """``KVM_SET_TSS_ADDR``: three pages Intel VMX needs for real mode (harmless elsewhere)."""
        kvm_ioctl(self.fd, abi.KVM_SET_TSS_ADDR, addr, "KVM_SET_TSS_ADDR")

    def set_identity_map_addr(self, addr: int = 0xFFFBC000) -> None:
        p = ffi.new("__u64 *", addr)
        kvm_ioctl(self.fd, abi.KVM_SET_IDENTITY_MAP_ADDR, p, "KVM_SET_IDENTITY_MAP_ADDR")

    def create_irqchip(self) -> None:
        """``KVM_CREATE_IRQCHIP``: in-kernel PIC pair, IOAPIC (at 0xfec00000) and LAPICs.

        Must come before the vCPUs are created. GSIs 0-23 are then routed to the IOAPIC pins of the
        same number (and 0-15 also to the PICs).
        """
        if self.vcpus:
            raise RuntimeError("create the irqchip before the vCPUs")
        kvm_ioctl(self.fd, abi.KVM_CREATE_IRQCHIP, 0, "KVM_CREATE_IRQCHIP")
        self.has_irqchip = True

    def create_pit2(self, speaker_dummy: bool = True) -> None:
        """``KVM_CREATE_PIT2``: the in-kernel i8254 timer (ports 0x40-0x43, and 0x61 if dummy)."""
        cfg = ffi.new("struct kvm_pit_config *", {"flags": abi.KVM_PIT_SPEAKER_DUMMY if speaker_dummy else 0})
        kvm_ioctl(self.fd, abi.KVM_CREATE_PIT2, cfg, "KVM_CREATE_PIT2")

    def irq_line(self, gsi: int, level: bool) -> None:
        """``KVM_IRQ_LINE``: drive GSI ``gsi`` to ``level`` (needs the in-kernel irqchip)."""
        lvl = ffi.new("struct kvm_irq_level *")
        lvl.irq = gsi
        lvl.level = 1 if level else 0
        kvm_ioctl(self.fd, abi.KVM_IRQ_LINE, lvl, "KVM_IRQ_LINE")

    def line(self, gsi: int) -> KvmIrqLine:
        """The :class:`KvmIrqLine` for ``gsi`` (the same object on every call)."""
        with self._lock:
            line = self._lines.get(gsi)
            if line is None:
                line = self._lines[gsi] = KvmIrqLine(self, gsi)
            return line

    def irqfd_line(self, gsi: int) -> EventfdIrqLine:
        """An edge-signalled line on ``gsi`` through a new irqfd (closed with the VM)."""
        fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC)
        try:
            self.irqfd(gsi, fd)
        except BaseException:
            os.close(fd)
            raise
        with self._lock:
            self._own_fds.append(fd)
        return EventfdIrqLine(fd)

    def get_irqchip(self, chip_id: int) -> Any:
        """``KVM_GET_IRQCHIP``: the state of PIC master (0), PIC slave (1) or the IOAPIC (2)."""
        chip = ffi.new("struct kvm_irqchip *", {"chip_id": chip_id})
        kvm_ioctl(self.fd, abi.KVM_GET_IRQCHIP, chip, "KVM_GET_IRQCHIP")
        return chip

    def signal_msi(self, address: int, data: int) -> int:
        """``KVM_SIGNAL_MSI``: deliver one MSI. Returns >0 if delivered, 0 if the guest blocked it."""
        msi = ffi.new("struct kvm_msi *", {
            "address_lo": address & 0xFFFFFFFF, "address_hi": address >> 32, "data": data & 0xFFFFFFFF,
        })
        return kvm_ioctl(self.fd, abi.KVM_SIGNAL_MSI, msi, "KVM_SIGNAL_MSI")

    def set_msi_route(self, gsi: int, address: int, data: int) -> None:
        """Route GSI ``gsi`` to an MSI, so an irqfd on ``gsi`` sends it (:meth:`remove_msi_route` undoes).

        KVM replaces the whole routing table at once, so the default irqchip routes (GSI 0-23 to
        the IOAPIC, 0-15 to the PICs) are re-stated every time.
        """
        with self._lock:
            self._gsi_routes[gsi] = (address, data)
            self._commit_routes()

    def remove_msi_route(self, gsi: int) -> None:
        with self._lock:
            if self._gsi_routes.pop(gsi, None) is not None:
                self._commit_routes()

    def _commit_routes(self) -> None:
        entries: list[dict[str, Any]] = []
        if self.has_irqchip:
            for pin in range(24):
                if pin in self._gsi_routes:
                    continue
                if pin < 16:
                    chip = abi.KVM_IRQCHIP_PIC_MASTER if pin < 8 else abi.KVM_IRQCHIP_PIC_SLAVE
                    entries.append({"gsi": pin, "type": abi.KVM_IRQ_ROUTING_IRQCHIP,
                                    "u": {"irqchip": {"irqchip": chip, "pin": pin % 8}}})
                entries.append({"gsi": pin, "type": abi.KVM_IRQ_ROUTING_IRQCHIP,
                                "u": {"irqchip": {"irqchip": abi.KVM_IRQCHIP_IOAPIC, "pin": pin}}})
        for gsi, (address, data) in sorted(self._gsi_routes.items()):
            entries.append({"gsi": gsi, "type": abi.KVM_IRQ_ROUTING_MSI, "u": {"msi": {
                "address_lo": address & 0xFFFFFFFF, "address_hi": address >> 32, "data": data}}})
        table = ffi.new("struct kvm_irq_routing *", {"nr": len(entries), "entries": entries})
        kvm_ioctl(self.fd, abi.KVM_SET_GSI_ROUTING, table, "KVM_SET_GSI_ROUTING")

    def ioeventfd(self, addr: int, size: int, fd: int, datamatch: int | None = None, *, pio: bool = False,
                  deassign: bool = False) -> None:
        """``KVM_IOEVENTFD``: a guest write of ``size`` bytes at ``addr`` (matching ``datamatch``
        unless None) signals eventfd ``fd`` inside the kernel, with no exit to vdm."""
        if size not in (1, 2, 4, 8):
            raise ValueError("ioeventfd size must be 1, 2, 4 or 8")
        flags = 0
        if datamatch is not None:
            flags |= abi.KVM_IOEVENTFD_FLAG_DATAMATCH
        if pio:
            flags |= abi.KVM_IOEVENTFD_FLAG_PIO
        if deassign:
            flags |= abi.KVM_IOEVENTFD_FLAG_DEASSIGN
        ev = ffi.new("struct kvm_ioeventfd *", {
            "datamatch": datamatch or 0, "addr": addr, "len": size, "fd": fd, "flags": flags})
        kvm_ioctl(self.fd, abi.KVM_IOEVENTFD, ev, "KVM_IOEVENTFD")

    def irqfd(self, gsi: int, fd: int, resample_fd: int | None = None, *, deassign: bool = False) -> None:
        """``KVM_IRQFD``: a write to eventfd ``fd`` raises GSI ``gsi`` inside the kernel.

        With ``resample_fd`` the line is level-triggered: KVM keeps it asserted until the guest
        EOIs it, then lowers it and signals ``resample_fd`` so the device can re-assert if it still
        has work pending.
        """
        flags = abi.KVM_IRQFD_FLAG_DEASSIGN if deassign else 0
        if resample_fd is not None and not deassign:
            flags |= abi.KVM_IRQFD_FLAG_RESAMPLE
        req = ffi.new("struct kvm_irqfd *", {
            "fd": fd, "gsi": gsi, "flags": flags,
            "resamplefd": resample_fd if resample_fd is not None else 0,
        })
        kvm_ioctl(self.fd, abi.KVM_IRQFD, req, "KVM_IRQFD")

    # ---- vCPUs and running ---------------------------------------------------------------------

    def create_vcpu(self, index: int | None = None) -> Vcpu:
        vcpu = Vcpu(self, len(self.vcpus) if index is None else index)
        self.vcpus.append(vcpu)
        return vcpu

    def start(self) -> None:
        """Start one thread per vCPU running ``KVM_RUN``."""
        for v in self.vcpus:
            v.start()

    @property
    def exit(self) -> VmExit | None:
        """Why the VM stopped, once it has."""
        return self._exit

    def request_exit(self, reason: VmExit) -> None:
        """Record why the VM ends (the first reason wins) and kick every vCPU out of KVM_RUN."""
        with self._lock:
            first = self._exit is None
            if first:
                self._exit = reason
            self.stopping = True
        if first:
            log.info("VM exit: %s %s (vcpu %d)", reason.reason, reason.detail, reason.vcpu)
        for v in self.vcpus:
            v.kick()
        if first:
            for cb in list(self.on_exit):
                try:
                    cb(reason)
                except Exception:
                    log.exception("VM exit callback failed")

    def stop(self, timeout: float = 5.0) -> VmExit:
        """Stop every vCPU and wait for its thread (the reason is ``stopped`` unless one came first)."""
        self.request_exit(VmExit("stopped", "host request"))
        self.join(timeout)
        assert self._exit is not None
        return self._exit

    def join(self, timeout: float | None = None) -> bool:
        """Wait for all vCPU threads to end; True if they did."""
        deadline = None if timeout is None else time.monotonic() + timeout
        for v in self.vcpus:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            if not v.join(left):
                return False
        return True

    def wait(self, timeout: float | None = None) -> VmExit | None:
        """Wait until the VM stops (any vCPU reports an exit); return why, or None on timeout."""
        if not self._exited.wait(timeout):
            return None
        self.join(5.0)
        return self._exit

    def vcpu_ended(self) -> None:
        """Called by each vCPU thread as it ends; the last one wakes :meth:`wait`."""
        if all(not v.running for v in self.vcpus):
            self._exited.set()

    def close(self) -> None:
        """Stop the vCPUs and release every fd and mapping."""
        if any(v.running for v in self.vcpus):
            self.stop()
        for v in self.vcpus:
            v.close()
        self.vcpus.clear()
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        for fd in self._own_fds:
            os.close(fd)
        self._own_fds.clear()
        for s in self._slots:
            if s.fd >= 0:
                os.close(s.fd)
        # mmaps are released when the last view on them goes away (devices may still hold some)
        self._slots.clear()

    def __enter__(self) -> Vm:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

