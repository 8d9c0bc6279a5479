"""One vCPU: registers, CPUID, LAPIC, MSRs, and the ``KVM_RUN`` loop on its own thread, which
dispatches port and MMIO exits to the VM's buses.

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
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Iterable

from . import kvm_abi as abi
from .exits import EXIT_NAMES, IO_EXIT, MMIO_DATA, MMIO_EXIT, VmExit
from .ioctl import KvmError, fixed_errno, kvm_ioctl
from .kvm_abi import C_FIXED, ffi

if TYPE_CHECKING:
    from .vm import Vm

log = logging.getLogger(__name__)

#: The signal used to kick vCPU threads out of KVM_RUN (blocked outside KVM_RUN).
KICK_SIGNAL = signal.SIGUSR2


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


class Vcpu:
    """One virtual CPU and its ``KVM_RUN`` loop."""

    def __init__(self, vm: Vm, index: int) -> None:
        self.vm = vm
        self.index = index
        self.fd = kvm_ioctl(vm.fd, abi.KVM_CREATE_VCPU, index, "KVM_CREATE_VCPU")
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
        kvm_ioctl(self.fd, abi.KVM_GET_REGS, regs, "KVM_GET_REGS")
        return regs

    def set_regs(self, regs: Any = None, **fields: int) -> None:
        """``KVM_SET_REGS`` from a ``struct kvm_regs *`` or from the given fields (others zero)."""
        if regs is None:
            regs = ffi.new("struct kvm_regs *", fields)
        kvm_ioctl(self.fd, abi.KVM_SET_REGS, regs, "KVM_SET_REGS")

    def get_sregs(self) -> Any:
        sregs = ffi.new("struct kvm_sregs *")
        kvm_ioctl(self.fd, abi.KVM_GET_SREGS, sregs, "KVM_GET_SREGS")
        return sregs

    def set_sregs(self, sregs: Any) -> None:
        kvm_ioctl(self.fd, abi.KVM_SET_SREGS, sregs, "KVM_SET_SREGS")

    def get_fpu(self) -> Any:
        fpu = ffi.new("struct kvm_fpu *")
        kvm_ioctl(self.fd, abi.KVM_GET_FPU, fpu, "KVM_GET_FPU")
        return fpu

    def set_fpu(self, fpu: Any) -> None:
        kvm_ioctl(self.fd, abi.KVM_SET_FPU, fpu, "KVM_SET_FPU")

    def get_lapic(self) -> Any:
        lapic = ffi.new("struct kvm_lapic_state *")
        kvm_ioctl(self.fd, abi.KVM_GET_LAPIC, lapic, "KVM_GET_LAPIC")
        return lapic

    def set_lapic(self, lapic: Any) -> None:
        kvm_ioctl(self.fd, abi.KVM_SET_LAPIC, lapic, "KVM_SET_LAPIC")

    def set_cpuid(self, entries: Iterable[CpuidEntry]) -> None:
        """``KVM_SET_CPUID2``."""
        items = [{"function": e.function, "index": e.index, "flags": e.flags, "eax": e.eax,
                  "ebx": e.ebx, "ecx": e.ecx, "edx": e.edx} for e in entries]
        buf = ffi.new("struct kvm_cpuid2 *", {"nent": len(items), "entries": items})
        kvm_ioctl(self.fd, abi.KVM_SET_CPUID2, buf, "KVM_SET_CPUID2")

    def get_msrs(self, indices: Iterable[int]) -> dict[int, int]:
        idx = list(indices)
        buf = ffi.new("struct kvm_msrs *", {"nmsrs": len(idx), "entries": [{"index": i} for i in idx]})
        n = kvm_ioctl(self.fd, abi.KVM_GET_MSRS, buf, "KVM_GET_MSRS")
        return {buf.entries[i].index: buf.entries[i].data for i in range(n)}

    def set_msrs(self, values: dict[int, int]) -> int:
        """``KVM_SET_MSRS``; returns how many were set (KVM stops at the first it refuses)."""
        items = [{"index": k, "data": v} for k, v in values.items()]
        buf = ffi.new("struct kvm_msrs *", {"nmsrs": len(items), "entries": items})
        return kvm_ioctl(self.fd, abi.KVM_SET_MSRS, buf, "KVM_SET_MSRS")

    def get_mp_state(self) -> int:
        st = ffi.new("struct kvm_mp_state *")
        kvm_ioctl(self.fd, abi.KVM_GET_MP_STATE, st, "KVM_GET_MP_STATE")
        return st.mp_state

    # ---- running ---------------------------------------------------------------------------------

    def run_once(self) -> int:
        """One ``KVM_RUN`` on the calling thread; PIO/MMIO exits are dispatched. Returns the exit reason.

        For tests and single-stepping; :meth:`start` runs the loop on a thread instead.
        """
        r = C_FIXED.ioctl(self.fd, abi.KVM_RUN, 0)
        if r < 0:
            e = fixed_errno()
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
        _, direction, size, port, count, off = IO_EXIT.unpack_from(self._run_mm, 0)
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
        _, addr, data, size, is_write = MMIO_EXIT.unpack_from(mm, 0)
        if size not in (1, 2, 4, 8):
            return
        if is_write:
            self.vm.mmio_bus.write(addr, size, int.from_bytes(data[:size], "little"))
        else:
            mm[MMIO_DATA : MMIO_DATA + size] = self.vm.mmio_bus.read(addr, size).to_bytes(size, "little")

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
        kvm_ioctl(self.fd, abi.KVM_SET_SIGNAL_MASK, sm, "KVM_SET_SIGNAL_MASK")

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
            vm.vcpu_ended()

    def _loop(self) -> None:
        # The hot path: every guest port/MMIO access to a device handled in Python comes through
        # here, so it reads the exit with one struct unpack and touches as few objects as it can.
        vm = self.vm
        fd = self.fd
        run = self.run_struct
        mm = self._run_mm
        counts = self.exit_counts
        ioctl = C_FIXED.ioctl
        unpack_io = IO_EXIT.unpack_from
        mm_len = len(mm)
        pio_read, pio_write = vm.pio_bus.read, vm.pio_bus.write
        handle_mmio, do_io = self._handle_mmio, self._do_io
        KVM_RUN = abi.KVM_RUN
        EXIT_IO, EXIT_MMIO = abi.KVM_EXIT_IO, abi.KVM_EXIT_MMIO
        while not vm.stopping:
            if ioctl(fd, KVM_RUN, 0) < 0:
                e = fixed_errno()
                if e in (errno.EINTR, errno.EAGAIN):
                    self._drain_kick()
                    if not vm.stopping:
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

