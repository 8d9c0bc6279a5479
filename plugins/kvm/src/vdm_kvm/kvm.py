"""KVM from Python: ``/dev/kvm``, a VM with its memory slots, interrupt plumbing and vCPU threads.

* :class:`Kvm` -- the ``/dev/kvm`` handle: API version, capabilities, supported CPUID.
* :class:`Vm` -- one VM: guest RAM slots (anonymous or memfd ``mmap``), the in-kernel irqchip and
  PIT, ``KVM_IRQ_LINE``, MSIs (``KVM_SIGNAL_MSI`` and GSI routes), ioeventfds, irqfds, the PIO and
  MMIO buses, and the vCPUs' lifetime (:meth:`Vm.start`, :meth:`Vm.wait`, :meth:`Vm.stop`).
* :class:`Vcpu` -- one vCPU: registers, CPUID, LAPIC, MSRs, and the ``KVM_RUN`` loop on its own
  thread, which dispatches port and MMIO exits to the VM's buses.

Stopping: every vCPU thread blocks :data:`KICK_SIGNAL` and lets ``KVM_RUN`` unblock it
(``KVM_SET_SIGNAL_MASK``), so a ``pthread_kill`` interrupts a running guest without any Python
signal handler and cannot be lost: a kick that arrives while the thread is outside ``KVM_RUN``
stays pending and ends the next ``KVM_RUN`` at once (``immediate_exit`` is set as well).
"""

from __future__ import annotations

import errno
import logging
import mmap
import os
import signal
import struct
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable

from vdm.eventfd import EFD_CLOEXEC, EFD_NONBLOCK, eventfd
from vdm.hypervisor import EventfdIrqLine, IrqLine
from vdm.memory import FlatGuestMemory, MemoryRegion

from . import kvm_abi as abi
from .bus import IoBus
from .kvm_abi import C_FIXED, C, ffi

__all__ = ["KICK_SIGNAL", "CpuidEntry", "Kvm", "KvmError", "KvmIrqLine", "Vcpu", "Vm", "VmExit"]

log = logging.getLogger(__name__)

#: The signal used to kick vCPU threads out of KVM_RUN (blocked outside KVM_RUN).
KICK_SIGNAL = signal.SIGUSR2
_MAP_NORESERVE = getattr(mmap, "MAP_NORESERVE", 0x4000)

# kvm_run as the exit loop reads it: exit_reason at 8, the exit union at 32
_IO_EXIT = struct.Struct("<8xI20xBBHIQ")  # reason, io.direction, io.size, io.port, io.count, io.data_offset
_MMIO_EXIT = struct.Struct("<8xI20xQ8sIB")  # reason, mmio.phys_addr, mmio.data, mmio.len, mmio.is_write
_MMIO_DATA = 40


def _ffi_errno() -> int:
    return abi._ffi_fixed.errno


EXIT_NAMES = {
    v: k[len("KVM_EXIT_"):] for k, v in vars(abi).items() if k.startswith("KVM_EXIT_") and k.count("_") >= 2
    and not k.startswith("KVM_EXIT_IO_")
}


class KvmError(OSError):
    """An ioctl on /dev/kvm, a VM or a vCPU failed."""


def _ioctl(fd: int, request: int, arg: Any = 0, what: str = "") -> int:
    if isinstance(arg, int):
        arg = ffi.cast("unsigned long", arg)
    r = C.ioctl(fd, request, arg)
    if r < 0:
        e = ffi.errno
        raise KvmError(e, f"{what or hex(request)}: {os.strerror(e)}")
    return r


def _host_address(buf: Any) -> int:
    return int(ffi.cast("uintptr_t", ffi.from_buffer(buf)))


@dataclass(frozen=True)
class CpuidEntry:
    """One ``kvm_cpuid_entry2``."""

    function: int
    index: int
    flags: int
    eax: int
    ebx: int
    ecx: int
    edx: int


@dataclass(frozen=True)
class VmExit:
    """Why a VM stopped running.

    ``reason``: ``poweroff`` (guest powered off: ACPI sleep or ``KVM_SYSTEM_EVENT_SHUTDOWN``),
    ``reset`` (guest asked for a reboot, or a triple fault), ``hlt`` (a vCPU halted with no
    in-kernel irqchip to wake it), ``stopped`` (the host called :meth:`Vm.stop`), ``crash``,
    ``error`` (an exit vdm cannot handle, or a failing ioctl).
    """

    reason: str
    detail: str = ""
    vcpu: int = -1


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
        _ioctl(self._fd, abi.KVM_IRQ_LINE, self._req, "KVM_IRQ_LINE")

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


class Kvm:
    """An open ``/dev/kvm``."""

    def __init__(self, path: str = "/dev/kvm") -> None:
        self.path = path
        self.fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        try:
            self.api_version = _ioctl(self.fd, abi.KVM_GET_API_VERSION, 0, "KVM_GET_API_VERSION")
            if self.api_version != abi.KVM_API_VERSION:
                raise KvmError(errno.ENOTSUP, f"{path}: KVM API version {self.api_version}, need 12")
            self.vcpu_mmap_size = _ioctl(self.fd, abi.KVM_GET_VCPU_MMAP_SIZE, 0, "KVM_GET_VCPU_MMAP_SIZE")
        except BaseException:
            os.close(self.fd)
            raise

    def check_extension(self, cap: int) -> int:
        """``KVM_CHECK_EXTENSION``: 0 if unsupported, else a positive capability value."""
        return _ioctl(self.fd, abi.KVM_CHECK_EXTENSION, cap, "KVM_CHECK_EXTENSION")

    def supported_cpuid(self) -> list[CpuidEntry]:
        """``KVM_GET_SUPPORTED_CPUID``: every leaf this KVM can expose to a guest."""
        n = abi.KVM_MAX_CPUID_ENTRIES
        while True:
            buf = ffi.new("struct kvm_cpuid2 *", {"nent": n, "entries": n})
            try:
                _ioctl(self.fd, abi.KVM_GET_SUPPORTED_CPUID, buf, "KVM_GET_SUPPORTED_CPUID")
            except KvmError as e:
                if e.errno == errno.E2BIG and n < 4096:
                    n *= 2
                    continue
                raise
            return [
                CpuidEntry(e.function, e.index, e.flags, e.eax, e.ebx, e.ecx, e.edx)
                for e in buf.entries[0 : buf.nent]
            ]

    def create_vm(self, **kwargs: Any) -> Vm:
        return Vm(self, **kwargs)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> Kvm:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


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
        self.fd = _ioctl(kvm.fd, abi.KVM_CREATE_VM, 0, "KVM_CREATE_VM")
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
        self._stopping = False
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
        _ioctl(self.fd, abi.KVM_SET_USER_MEMORY_REGION, region, "KVM_SET_USER_MEMORY_REGION")

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
        _ioctl(self.fd, abi.KVM_SET_TSS_ADDR, addr, "KVM_SET_TSS_ADDR")

    def set_identity_map_addr(self, addr: int = 0xFFFBC000) -> None:
        p = ffi.new("__u64 *", addr)
        _ioctl(self.fd, abi.KVM_SET_IDENTITY_MAP_ADDR, p, "KVM_SET_IDENTITY_MAP_ADDR")

    def create_irqchip(self) -> None:
        """``KVM_CREATE_IRQCHIP``: in-kernel PIC pair, IOAPIC (at 0xfec00000) and LAPICs.

        Must come before the vCPUs are created. GSIs 0-23 are then routed to the IOAPIC pins of the
        same number (and 0-15 also to the PICs).
        """
        if self.vcpus:
            raise RuntimeError("create the irqchip before the vCPUs")
        _ioctl(self.fd, abi.KVM_CREATE_IRQCHIP, 0, "KVM_CREATE_IRQCHIP")
        self.has_irqchip = True

    def create_pit2(self, speaker_dummy: bool = True) -> None:
        """``KVM_CREATE_PIT2``: the in-kernel i8254 timer (ports 0x40-0x43, and 0x61 if dummy)."""
        cfg = ffi.new("struct kvm_pit_config *", {"flags": abi.KVM_PIT_SPEAKER_DUMMY if speaker_dummy else 0})
        _ioctl(self.fd, abi.KVM_CREATE_PIT2, cfg, "KVM_CREATE_PIT2")

    def irq_line(self, gsi: int, level: bool) -> None:
        """``KVM_IRQ_LINE``: drive GSI ``gsi`` to ``level`` (needs the in-kernel irqchip)."""
        lvl = ffi.new("struct kvm_irq_level *")
        lvl.irq = gsi
        lvl.level = 1 if level else 0
        _ioctl(self.fd, abi.KVM_IRQ_LINE, lvl, "KVM_IRQ_LINE")

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
        _ioctl(self.fd, abi.KVM_GET_IRQCHIP, chip, "KVM_GET_IRQCHIP")
        return chip

    def signal_msi(self, address: int, data: int) -> int:
        """``KVM_SIGNAL_MSI``: deliver one MSI. Returns >0 if delivered, 0 if the guest blocked it."""
        msi = ffi.new("struct kvm_msi *", {
            "address_lo": address & 0xFFFFFFFF, "address_hi": address >> 32, "data": data & 0xFFFFFFFF,
        })
        return _ioctl(self.fd, abi.KVM_SIGNAL_MSI, msi, "KVM_SIGNAL_MSI")

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
        _ioctl(self.fd, abi.KVM_SET_GSI_ROUTING, table, "KVM_SET_GSI_ROUTING")

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
        _ioctl(self.fd, abi.KVM_IOEVENTFD, ev, "KVM_IOEVENTFD")

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
        _ioctl(self.fd, abi.KVM_IRQFD, req, "KVM_IRQFD")

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
            self._stopping = True
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

    @property
    def stopping(self) -> bool:
        return self._stopping

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

    def _vcpu_ended(self) -> None:
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


class Vcpu:
    """One virtual CPU and its ``KVM_RUN`` loop."""

    def __init__(self, vm: Vm, index: int) -> None:
        self.vm = vm
        self.index = index
        self.fd = _ioctl(vm.fd, abi.KVM_CREATE_VCPU, index, "KVM_CREATE_VCPU")
        self._run_mm = mmap.mmap(self.fd, vm.kvm.vcpu_mmap_size, mmap.MAP_SHARED,
                                 mmap.PROT_READ | mmap.PROT_WRITE)
        self._run_buf = ffi.from_buffer(self._run_mm)
        self.run_struct = ffi.cast("struct kvm_run *", self._run_buf)
        self._thread: threading.Thread | None = None
        self._tid: int | None = None
        self.running = False
        self.exit_counts: dict[int, int] = {abi.KVM_EXIT_IO: 0}
        #: extra exit handlers: exit reason -> callable(vcpu) returning True to keep running
        self.exit_handlers: dict[int, Callable[[Vcpu], bool]] = {}

    # ---- registers -----------------------------------------------------------------------------

    def get_regs(self) -> Any:
        regs = ffi.new("struct kvm_regs *")
        _ioctl(self.fd, abi.KVM_GET_REGS, regs, "KVM_GET_REGS")
        return regs

    def set_regs(self, regs: Any = None, **fields: int) -> None:
        """``KVM_SET_REGS`` from a ``struct kvm_regs *`` or from the given fields (others zero)."""
        if regs is None:
            regs = ffi.new("struct kvm_regs *", fields)
        _ioctl(self.fd, abi.KVM_SET_REGS, regs, "KVM_SET_REGS")

    def get_sregs(self) -> Any:
        sregs = ffi.new("struct kvm_sregs *")
        _ioctl(self.fd, abi.KVM_GET_SREGS, sregs, "KVM_GET_SREGS")
        return sregs

    def set_sregs(self, sregs: Any) -> None:
        _ioctl(self.fd, abi.KVM_SET_SREGS, sregs, "KVM_SET_SREGS")

    def get_fpu(self) -> Any:
        fpu = ffi.new("struct kvm_fpu *")
        _ioctl(self.fd, abi.KVM_GET_FPU, fpu, "KVM_GET_FPU")
        return fpu

    def set_fpu(self, fpu: Any) -> None:
        _ioctl(self.fd, abi.KVM_SET_FPU, fpu, "KVM_SET_FPU")

    def get_lapic(self) -> Any:
        lapic = ffi.new("struct kvm_lapic_state *")
        _ioctl(self.fd, abi.KVM_GET_LAPIC, lapic, "KVM_GET_LAPIC")
        return lapic

    def set_lapic(self, lapic: Any) -> None:
        _ioctl(self.fd, abi.KVM_SET_LAPIC, lapic, "KVM_SET_LAPIC")

    def set_cpuid(self, entries: Iterable[CpuidEntry]) -> None:
        """``KVM_SET_CPUID2``."""
        items = [{"function": e.function, "index": e.index, "flags": e.flags, "eax": e.eax,
                  "ebx": e.ebx, "ecx": e.ecx, "edx": e.edx} for e in entries]
        buf = ffi.new("struct kvm_cpuid2 *", {"nent": len(items), "entries": items})
        _ioctl(self.fd, abi.KVM_SET_CPUID2, buf, "KVM_SET_CPUID2")

    def get_msrs(self, indices: Iterable[int]) -> dict[int, int]:
        idx = list(indices)
        buf = ffi.new("struct kvm_msrs *", {"nmsrs": len(idx), "entries": [{"index": i} for i in idx]})
        n = _ioctl(self.fd, abi.KVM_GET_MSRS, buf, "KVM_GET_MSRS")
        return {buf.entries[i].index: buf.entries[i].data for i in range(n)}

    def set_msrs(self, values: dict[int, int]) -> int:
        """``KVM_SET_MSRS``; returns how many were set (KVM stops at the first it refuses)."""
        items = [{"index": k, "data": v} for k, v in values.items()]
        buf = ffi.new("struct kvm_msrs *", {"nmsrs": len(items), "entries": items})
        return _ioctl(self.fd, abi.KVM_SET_MSRS, buf, "KVM_SET_MSRS")

    def get_mp_state(self) -> int:
        st = ffi.new("struct kvm_mp_state *")
        _ioctl(self.fd, abi.KVM_GET_MP_STATE, st, "KVM_GET_MP_STATE")
        return st.mp_state

    # ---- running ---------------------------------------------------------------------------------

    def run_once(self) -> int:
        """One ``KVM_RUN`` on the calling thread; PIO/MMIO exits are dispatched. Returns the exit reason.

        For tests and single-stepping; :meth:`start` runs the loop on a thread instead.
        """
        r = C_FIXED.ioctl(self.fd, abi.KVM_RUN, 0)
        if r < 0:
            e = _ffi_errno()
            if e in (errno.EINTR, errno.EAGAIN):
                return abi.KVM_EXIT_INTR
            raise KvmError(e, f"KVM_RUN: {os.strerror(e)}")
        reason = self.run_struct.exit_reason
        self.exit_counts[reason] = self.exit_counts.get(reason, 0) + 1
        if reason == abi.KVM_EXIT_IO:
            self._handle_io()
        elif reason == abi.KVM_EXIT_MMIO:
            self._handle_mmio()
        return reason

    def _handle_io(self) -> None:
        _, direction, size, port, count, off = _IO_EXIT.unpack_from(self._run_mm, 0)
        self._do_io(direction, size, port, count, off)

    def _do_io(self, direction: int, size: int, port: int, count: int, off: int) -> None:
        mm = self._run_mm
        if size not in (1, 2, 4) or off + size * count > len(mm):
            return  # KVM never does this; never trust it blindly with an index into our mapping
        bus = self.vm.pio_bus
        if direction == abi.KVM_EXIT_IO_OUT:
            for i in range(count):
                p = off + i * size
                bus.write(port, size, int.from_bytes(mm[p : p + size], "little"))
        else:
            for i in range(count):
                p = off + i * size
                mm[p : p + size] = bus.read(port, size).to_bytes(size, "little")

    def _handle_mmio(self) -> None:
        mm = self._run_mm
        _, addr, data, size, is_write = _MMIO_EXIT.unpack_from(mm, 0)
        if size not in (1, 2, 4, 8):
            return
        if is_write:
            self.vm.mmio_bus.write(addr, size, int.from_bytes(data[:size], "little"))
        else:
            mm[_MMIO_DATA : _MMIO_DATA + size] = self.vm.mmio_bus.read(addr, size).to_bytes(size, "little")

    def start(self) -> None:
        """Run this vCPU on its own thread until the VM stops."""
        if self._thread is not None:
            raise RuntimeError("vCPU already started")
        self.running = True
        self._thread = threading.Thread(target=self._thread_main, name=f"vcpu{self.index}", daemon=True)
        self._thread.start()

    def kick(self) -> None:
        """Make this vCPU leave KVM_RUN soon (safe from any thread, any time)."""
        run = self.run_struct
        if run is None:  # closed
            return
        run.immediate_exit = 1
        tid = self._tid
        if tid is not None and self.running:
            try:
                signal.pthread_kill(tid, KICK_SIGNAL)
            except (ProcessLookupError, OSError):
                pass

    def join(self, timeout: float | None = None) -> bool:
        if self._thread is None:
            return True
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def _set_run_sigmask(self) -> None:
        # The thread blocks KICK_SIGNAL; during KVM_RUN the mask below applies instead: the same
        # mask without KICK_SIGNAL, so a kick interrupts the guest.
        old = signal.pthread_sigmask(signal.SIG_BLOCK, {KICK_SIGNAL})
        mask = 0
        for s in old:
            if s != KICK_SIGNAL:
                mask |= 1 << (int(s) - 1)
        sm = ffi.new("struct kvm_signal_mask *", {"len": 8, "sigset": list(mask.to_bytes(8, "little"))})
        _ioctl(self.fd, abi.KVM_SET_SIGNAL_MASK, sm, "KVM_SET_SIGNAL_MASK")

    def _drain_kick(self) -> None:
        try:
            while signal.sigtimedwait({KICK_SIGNAL}, 0) is not None:
                pass
        except OSError:
            pass

    def _thread_main(self) -> None:
        vm = self.vm
        try:
            self._set_run_sigmask()
            self._tid = threading.get_ident()
            if vm.stopping:
                return
            self._loop()
        except BaseException as e:  # a vCPU thread must never die silently
            log.exception("vcpu%d failed", self.index)
            vm.request_exit(VmExit("error", f"{type(e).__name__}: {e}", self.index))
        finally:
            self.running = False
            self._tid = None
            vm._vcpu_ended()

    def _loop(self) -> None:
        # The hot path: every guest port/MMIO access to a device handled in Python comes through
        # here, so it reads the exit with one struct unpack and touches as few objects as it can.
        vm = self.vm
        fd = self.fd
        run = self.run_struct
        mm = self._run_mm
        counts = self.exit_counts
        ioctl = C_FIXED.ioctl
        unpack_io = _IO_EXIT.unpack_from
        mm_len = len(mm)
        pio_read, pio_write = vm.pio_bus.read, vm.pio_bus.write
        handle_mmio, do_io = self._handle_mmio, self._do_io
        KVM_RUN = abi.KVM_RUN
        EXIT_IO, EXIT_MMIO = abi.KVM_EXIT_IO, abi.KVM_EXIT_MMIO
        while not vm._stopping:
            if ioctl(fd, KVM_RUN, 0) < 0:
                e = _ffi_errno()
                if e in (errno.EINTR, errno.EAGAIN):
                    self._drain_kick()
                    if not vm._stopping:
                        run.immediate_exit = 0
                    continue
                vm.request_exit(VmExit("error", f"KVM_RUN: {os.strerror(e)}", self.index))
                return
            reason, direction, size, port, count, off = unpack_io(mm, 0)
            if reason == EXIT_IO:
                counts[EXIT_IO] += 1
                if count == 1 and off + size <= mm_len:
                    if direction:
                        pio_write(port, size, int.from_bytes(mm[off : off + size], "little"))
                    else:
                        mm[off : off + size] = pio_read(port, size).to_bytes(size, "little")
                else:
                    do_io(direction, size, port, count, off)
                continue
            counts[reason] = counts.get(reason, 0) + 1
            if reason == EXIT_MMIO:
                handle_mmio()
            elif not self._handle_other(reason):
                return

    def _handle_other(self, reason: int) -> bool:
        """Exits other than PIO/MMIO. Returns False when this vCPU must stop."""
        vm = self.vm
        handler = self.exit_handlers.get(reason)
        if handler is not None:
            return handler(self)
        run = self.run_struct
        if reason == abi.KVM_EXIT_HLT:
            vm.request_exit(VmExit("hlt", "vCPU halted", self.index))
            return False
        if reason in (abi.KVM_EXIT_INTR, abi.KVM_EXIT_IRQ_WINDOW_OPEN):
            return True
        if reason == abi.KVM_EXIT_SHUTDOWN:
            vm.request_exit(VmExit("reset", "triple fault (KVM_EXIT_SHUTDOWN)", self.index))
            return False
        if reason == abi.KVM_EXIT_SYSTEM_EVENT:
            t = run.system_event.type
            what = {abi.KVM_SYSTEM_EVENT_SHUTDOWN: "poweroff", abi.KVM_SYSTEM_EVENT_RESET: "reset",
                    abi.KVM_SYSTEM_EVENT_CRASH: "crash"}.get(t, "error")
            vm.request_exit(VmExit(what, f"KVM_SYSTEM_EVENT type {t}", self.index))
            return False
        detail = EXIT_NAMES.get(reason, str(reason))
        if reason == abi.KVM_EXIT_INTERNAL_ERROR:
            detail += f" suberror {run.internal.suberror}"
        elif reason == abi.KVM_EXIT_FAIL_ENTRY:
            detail += f" hardware reason 0x{run.fail_entry.hardware_entry_failure_reason:x}"
        try:
            detail += f" rip=0x{self.get_regs().rip:x}"
        except KvmError:
            pass
        vm.request_exit(VmExit("error", detail, self.index))
        return False

    def close(self) -> None:
        if self.running:
            self.kick()
            if not self.join(5.0):
                # never unmap kvm_run under a thread that may still be using it: leak it instead
                log.error("vcpu%d did not stop; leaving its mapping and fd open", self.index)
                return
        self.run_struct = None
        try:
            self._run_buf = None
            self._run_mm.close()
        except BufferError:
            pass
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
