"""vdm_kvm.kvm on this machine's /dev/kvm with small real-mode guests."""

from __future__ import annotations

import os
import select
import struct
import threading
import time

import pytest
from vdm_kvm import kvm_abi as abi
from vdm_kvm.kvm import Kvm
from vdm_kvm.kvm_abi import ffi
from vdm_kvm.machine import setup_lapic_lint

from tests.kvm.realmode import CODE, Asm, Recorder, kvm_or_skip, real_mode_vm


@pytest.fixture(scope="module")
def kvm() -> Kvm:
    k = kvm_or_skip()
    yield k
    k.close()


def run_until_exit(vcpu, limit: int = 1000) -> int:
    """run_once until something other than PIO/MMIO ends the run; return that exit reason."""
    for _ in range(limit):
        r = vcpu.run_once()
        if r not in (abi.KVM_EXIT_IO, abi.KVM_EXIT_MMIO):
            return r
    raise AssertionError("guest did not stop")


def test_kvm_basics(kvm: Kvm) -> None:
    assert kvm.api_version == 12
    assert kvm.vcpu_mmap_size >= 4096
    assert kvm.check_extension(abi.KVM_CAP_USER_MEMORY) > 0
    leaves = {e.function for e in kvm.supported_cpuid()}
    assert 0 in leaves and 1 in leaves


def test_pio_out_in_exits(kvm: Kvm) -> None:
    a = Asm().mov_dx(0x1234)
    a.mov_al(0x41).out_dx(1).mov_ax(0xBEEF).out_dx(2).mov_eax(0xDEADBEEF).out_dx(4)
    a.in_dx(1).store(0x2000, 1).in_dx(2).store(0x2002, 2).in_dx(4).store(0x2004, 4).hlt()
    vm, vcpu = real_mode_vm(kvm, a.bytes())
    with vm:
        dev = Recorder(lambda off, size: {1: 0x5A, 2: 0xA55A, 4: 0x12345678}[size] + off)
        vm.pio_bus.register(0x1230, 8, dev, "test")
        assert run_until_exit(vcpu) == abi.KVM_EXIT_HLT
        assert dev.log == [
            ("w", 4, 1, 0x41), ("w", 4, 2, 0xBEEF), ("w", 4, 4, 0xDEADBEEF),
            ("r", 4, 1, 0x5E), ("r", 4, 2, 0xA55E), ("r", 4, 4, 0x1234567C),
        ]
        mem = vm.guest_memory
        assert mem.read(0x2000, 1) == b"\x5e"
        assert mem.read_u16(0x2002) == 0xA55E
        assert mem.read_u32(0x2004) == 0x1234567C
        assert vcpu.exit_counts[abi.KVM_EXIT_IO] == 6


def test_unclaimed_pio_reads_all_ones_and_writes_are_dropped(kvm: Kvm) -> None:
    a = Asm().mov_dx(0x99).in_dx(1).store(0x2000, 1).in_dx(2).store(0x2002, 2).in_dx(4).store(0x2004, 4)
    a.mov_al(7).out_dx(1).hlt()
    vm, vcpu = real_mode_vm(kvm, a.bytes())
    with vm:
        assert run_until_exit(vcpu) == abi.KVM_EXIT_HLT
        assert vm.guest_memory.read(0x2000, 8) == b"\xff\x00\xff\xff\xff\xff\xff\xff"
        assert (vm.pio_bus.unclaimed_reads, vm.pio_bus.unclaimed_writes) == (3, 1)


def test_rep_outsb_delivers_every_byte_in_order(kvm: Kvm) -> None:
    a = Asm().mov_dx(0x300).raw(0xBE, struct.pack("<H", 0x2000))  # mov si, 0x2000
    a.raw(0xB9, struct.pack("<H", 5)).raw(0xFC, 0xF3, 0x6E).hlt()  # mov cx,5; cld; rep outsb
    vm, vcpu = real_mode_vm(kvm, a.bytes())
    with vm:
        vm.guest_memory.write(0x2000, b"hello")
        dev = Recorder()
        vm.pio_bus.register(0x300, 1, dev, "test")
        assert run_until_exit(vcpu) == abi.KVM_EXIT_HLT
        assert bytes(v for _, _, _, v in dev.log) == b"hello"


def test_mmio_read_and_write_exits(kvm: Kvm) -> None:
    # RAM is 0-64 KiB; segment 0x2000 puts ds:0 at 0x20000, which is MMIO
    a = Asm().mov_ax(0x2000).mov_ds_ax()
    a.mov_al(0x55).store(0x10, 1).mov_ax(0x1234).store(0x12, 2).mov_eax(0xCAFEF00D).store(0x14, 4)
    a.load(0x18, 4)
    a.raw(0x31, 0xDB, 0x8E, 0xDB)  # xor bx,bx; mov ds,bx
    a.store(0x3000, 4).hlt()
    vm, vcpu = real_mode_vm(kvm, a.bytes())
    with vm:
        dev = Recorder(lambda off, size: 0x87654321)
        vm.mmio_bus.register(0x20000, 0x1000, dev, "test")
        assert run_until_exit(vcpu) == abi.KVM_EXIT_HLT
        assert dev.log == [("w", 0x10, 1, 0x55), ("w", 0x12, 2, 0x1234), ("w", 0x14, 4, 0xCAFEF00D),
                           ("r", 0x18, 4, 0x87654321)]
        assert vm.guest_memory.read_u32(0x3000) == 0x87654321


def test_memory_slot_is_shared_both_ways(kvm: Kvm) -> None:
    # the guest copies a host-written dword and writes a marker; the host sees both in its mapping
    a = Asm().load(0x4000, 4).store(0x4004, 4).mov_eax(0x600DF00D).store(0x4008, 4).hlt()
    vm, vcpu = real_mode_vm(kvm, a.bytes())
    with vm:
        (region,) = vm.memory_regions
        region.view[0x4000:0x4004] = struct.pack("<I", 0x13572468)
        assert run_until_exit(vcpu) == abi.KVM_EXIT_HLT
        assert struct.unpack_from("<II", region.view, 0x4004) == (0x13572468, 0x600DF00D)


def test_memfd_backed_memory_and_second_slot(kvm: Kvm) -> None:
    a = Asm().mov_ax(0x2000).mov_ds_ax().mov_eax(0xA1B2C3D4).store(0x0, 4).hlt()
    vm, vcpu = real_mode_vm(kvm, a.bytes())
    with vm:
        high = vm.add_memory(0x20000, 0x10000, memfd=True)
        assert run_until_exit(vcpu) == abi.KVM_EXIT_HLT
        assert struct.unpack_from("<I", high.view, 0)[0] == 0xA1B2C3D4
        ((addr, size, fd),) = vm.memory_fds()
        assert (addr, size) == (0x20000, 0x10000)
        assert struct.unpack("<I", os.pread(fd, 4, 0))[0] == 0xA1B2C3D4
        with pytest.raises(ValueError):
            vm.add_memory(0x28000, 0x10000)  # overlaps


def test_ioeventfd_pio_datamatch_signals_without_exit(kvm: Kvm) -> None:
    a = Asm().mov_dx(0x500)
    for _ in range(5):
        a.mov_al(7).out_dx(1)
    a.mov_al(8).out_dx(1).hlt()
    vm, vcpu = real_mode_vm(kvm, a.bytes())
    fd = os.eventfd(0, os.EFD_NONBLOCK)
    try:
        with vm:
            dev = Recorder()
            vm.pio_bus.register(0x500, 1, dev, "test")
            vm.ioeventfd(0x500, 1, fd, datamatch=7, pio=True)
            assert run_until_exit(vcpu) == abi.KVM_EXIT_HLT
            assert os.eventfd_read(fd) == 5
            assert dev.log == [("w", 0, 1, 8)]  # only the non-matching write exited
            assert vcpu.exit_counts[abi.KVM_EXIT_IO] == 1
    finally:
        os.close(fd)


def test_ioeventfd_mmio_any_value_and_deassign(kvm: Kvm) -> None:
    a = Asm().mov_ax(0x2000).mov_ds_ax()
    a.mov_ax(1).store(0x50, 2).mov_ax(2).store(0x50, 2).hlt()
    vm, vcpu = real_mode_vm(kvm, a.bytes())
    fd = os.eventfd(0, os.EFD_NONBLOCK)
    try:
        with vm:
            dev = Recorder()
            vm.mmio_bus.register(0x20000, 0x100, dev, "test")
            vm.ioeventfd(0x20050, 2, fd)  # no datamatch: every 2-byte write
            assert run_until_exit(vcpu) == abi.KVM_EXIT_HLT
            assert os.eventfd_read(fd) == 2
            assert dev.log == []
            vm.ioeventfd(0x20050, 2, fd, deassign=True)
            vcpu.set_regs(rip=CODE, rflags=2)
            assert run_until_exit(vcpu) == abi.KVM_EXIT_HLT
            assert dev.log == [("w", 0x50, 2, 1), ("w", 0x50, 2, 2)]
    finally:
        os.close(fd)


def _interrupt_counting_guest(irq: int) -> bytes:
    """Programs the master PIC (vectors 0x20-0x27), unmasks ``irq`` and counts its interrupts at
    0x3000; the handler EOIs and then writes the count to port 0x510 so the host can follow."""
    vector = 0x20 + irq
    a = Asm()
    # IVT[vector] = 0000:handler (patched below)
    a.raw(0xC7, 0x06, struct.pack("<H", vector * 4)).raw(b"\x00\x00")
    patch_at = len(a.b) - 2
    a.raw(0xC7, 0x06, struct.pack("<H", vector * 4 + 2), struct.pack("<H", 0))
    for port, value in ((0x20, 0x11), (0x21, 0x20), (0x21, 0x04), (0x21, 0x01), (0x21, 0xFF & ~(1 << irq))):
        a.mov_al(value).out_imm(port)
    a.mov_al(0).out_imm(0xE0)  # a marker exit: "ready"
    a.raw(0xFB)  # sti
    a.label("idle").hlt().jmp("idle")
    handler = a.here()
    a.raw(0xFF, 0x06, struct.pack("<H", 0x3000))  # inc word [0x3000]
    a.mov_al(0x20).out_imm(0x20)  # EOI
    a.load(0x3000, 2).raw(0xBA, struct.pack("<H", 0x510)).out_dx(2)  # out 0x510, ax
    a.raw(0xCF)  # iret
    a.b[patch_at : patch_at + 2] = struct.pack("<H", handler)
    return a.bytes()


class _Counter:
    def __init__(self) -> None:
        self.values: list[int] = []
        self.cond = threading.Condition()
        self.ready = threading.Event()

    def read(self, offset: int, size: int) -> int:
        return 0

    def write(self, offset: int, size: int, value: int) -> None:
        with self.cond:
            self.values.append(value)
            self.cond.notify_all()

    def wait_for(self, n: int, timeout: float = 10) -> list[int]:
        with self.cond:
            self.cond.wait_for(lambda: len(self.values) >= n, timeout)
            return list(self.values)


class _Ready:
    def __init__(self) -> None:
        self.event = threading.Event()

    def read(self, offset: int, size: int) -> int:
        return 0

    def write(self, offset: int, size: int, value: int) -> None:
        self.event.set()


def _irq_vm(kvm: Kvm, irq: int):
    vm, vcpu = real_mode_vm(kvm, _interrupt_counting_guest(irq), irqchip=True)
    setup_lapic_lint(vcpu)
    counter, ready = _Counter(), _Ready()
    vm.pio_bus.register(0x510, 2, counter, "counter")
    vm.pio_bus.register(0xE0, 1, ready, "ready")
    vm.start()
    assert ready.event.wait(10), f"guest did not get ready: {vm.exit}"
    time.sleep(0.05)  # let it reach hlt
    return vm, counter


def test_irq_line_interrupts_the_guest(kvm: Kvm) -> None:
    vm, counter = _irq_vm(kvm, 5)
    with vm:
        for i in range(3):
            vm.irq_line(5, True)
            vm.irq_line(5, False)
            assert counter.wait_for(i + 1) == list(range(1, i + 2))
        assert vm.stop().reason == "stopped"


def test_irq_line_object_remembers_the_level(kvm: Kvm) -> None:
    vm, counter = _irq_vm(kvm, 5)
    with vm:
        line = vm.line(5)
        assert vm.line(5) is line
        line.set_level(True)
        assert counter.wait_for(1) == [1]
        vm.irq_line(5, False)  # edge-triggered PIC input: lower it behind the object's back...
        line.set_level(True)  # ...the object still thinks it is high: no new edge, no interrupt
        time.sleep(0.3)
        assert counter.values == [1]
        line.set_level(False)
        line.set_level(True)
        assert counter.wait_for(2) == [1, 2]
        line.set_level(False)
        line.trigger()
        assert counter.wait_for(3) == [1, 2, 3]
        assert not line.level


def test_irqfd_line(kvm: Kvm) -> None:
    vm, counter = _irq_vm(kvm, 7)
    with vm:
        line = vm.irqfd_line(7)
        line.trigger()
        assert counter.wait_for(1) == [1]
        line.set_level(True)
        assert counter.wait_for(2) == [1, 2]


def test_irqfd_raises_the_interrupt_in_the_kernel(kvm: Kvm) -> None:
    vm, counter = _irq_vm(kvm, 5)
    fd = os.eventfd(0, os.EFD_NONBLOCK)
    try:
        with vm:
            vm.irqfd(5, fd)
            for i in range(3):
                os.eventfd_write(fd, 1)
                assert counter.wait_for(i + 1) == list(range(1, i + 2))
            # an MSI route on another GSI re-states the routing table: GSI 5 must still reach the PIC
            vm.set_msi_route(40, 0xFEE00000, 0x30)
            os.eventfd_write(fd, 1)
            assert counter.wait_for(4) == [1, 2, 3, 4]
            vm.irqfd(5, fd, deassign=True)
            os.eventfd_write(fd, 1)
            time.sleep(0.3)
            assert counter.values == [1, 2, 3, 4]
    finally:
        os.close(fd)


def test_irqfd_resample_signals_after_guest_eoi(kvm: Kvm) -> None:
    vm, counter = _irq_vm(kvm, 6)
    fd = os.eventfd(0, os.EFD_NONBLOCK)
    rfd = os.eventfd(0, os.EFD_NONBLOCK)
    try:
        with vm:
            vm.irqfd(6, fd, resample_fd=rfd)
            os.eventfd_write(fd, 1)
            assert counter.wait_for(1) == [1]
            r, _, _ = select.select([rfd], [], [], 5)
            assert r == [rfd], "no resample signal after the guest's EOI"
            assert os.eventfd_read(rfd) >= 1
    finally:
        os.close(fd)
        os.close(rfd)


def test_stop_a_spinning_vcpu(kvm: Kvm) -> None:
    a = Asm().label("spin").jmp("spin")
    vm, vcpu = real_mode_vm(kvm, a.bytes())
    with vm:
        vm.start()
        time.sleep(0.2)
        assert vcpu.running
        t = time.monotonic()
        ex = vm.stop()
        assert ex.reason == "stopped"
        assert not vcpu.running
        assert time.monotonic() - t < 2


def test_stop_a_vcpu_halted_in_the_kernel(kvm: Kvm) -> None:
    # with the in-kernel irqchip, cli; hlt sleeps inside KVM_RUN: only the kick signal ends it
    a = Asm().raw(0xFA).hlt().label("x").jmp("x")
    vm, vcpu = real_mode_vm(kvm, a.bytes(), irqchip=True)
    with vm:
        vm.start()
        time.sleep(0.2)
        assert vcpu.running and vm.exit is None
        assert vm.stop().reason == "stopped"
        assert vm.join(2)


def test_hlt_without_irqchip_ends_the_vm(kvm: Kvm) -> None:
    vm, _vcpu = real_mode_vm(kvm, Asm().hlt().bytes())
    with vm:
        vm.start()
        ex = vm.wait(5)
        assert ex is not None and ex.reason == "hlt" and ex.vcpu == 0


@pytest.mark.skipif(os.path.exists("/sys/module/kvm_pvm"),
                    reason="kvm_pvm never completes a real-mode triple fault (KVM_RUN spins); "
                           "this runs in the KVM lab instead")
def test_triple_fault_is_a_reset(kvm: Kvm) -> None:
    # an IDT with limit 0, then int3: #GP -> #DF -> triple fault (KVM_EXIT_SHUTDOWN)
    a = Asm().raw(0x0F, 0x01, 0x1E, struct.pack("<H", 0x2000)).raw(0xCC).hlt()
    vm, _vcpu = real_mode_vm(kvm, a.bytes())
    with vm:
        vm.guest_memory.write(0x2000, b"\0" * 6)
        vm.start()
        ex = vm.wait(5)
        assert ex is not None and ex.reason == "reset", ex


def test_handler_exception_does_not_kill_the_vcpu(kvm: Kvm) -> None:
    class Broken:
        def read(self, offset: int, size: int) -> int:
            raise RuntimeError("bug")

        def write(self, offset: int, size: int, value: int) -> None:
            raise RuntimeError("bug")

    a = Asm().mov_dx(0x700).mov_al(1).out_dx(1).in_dx(1).store(0x2000, 1).hlt()
    vm, _vcpu = real_mode_vm(kvm, a.bytes())
    with vm:
        vm.pio_bus.register(0x700, 1, Broken(), "broken")
        vm.start()
        ex = vm.wait(5)
        assert ex is not None and ex.reason == "hlt"
        assert vm.guest_memory.read(0x2000, 1) == b"\xff"


def test_exit_loop_throughput(kvm: Kvm) -> None:
    """Measures PIO exits per second through the vCPU thread (printed; a floor catches regressions)."""
    n = 20000
    a = Asm().raw(0xB9, struct.pack("<H", n)).mov_dx(0x10).label("l").out_dx(1).raw(0xE2, 0xFD).hlt()
    vm, vcpu = real_mode_vm(kvm, a.bytes())
    with vm:
        vm.pio_bus.register(0x10, 1, Recorder(), "sink")
        t = time.perf_counter()
        vm.start()
        ex = vm.wait(60)
        dt = time.perf_counter() - t
        assert ex is not None and ex.reason == "hlt"
        assert vcpu.exit_counts[abi.KVM_EXIT_IO] == n
        print(f"\nPIO exits to a Python handler: {n / dt:,.0f}/s")
        assert n / dt > 100  # the KVM lab on a loaded host manages ~1,000/s; kvm_pvm ~40,000/s


def _msi_guest() -> bytes:
    """Counts interrupts on vectors 0x40 (at 0x3000, reported on port 0x510) and 0x50 (0x3002, port
    0x512); the LAPIC is enabled by the host, the guest never EOIs (0x50 outranks 0x40)."""
    a = Asm()
    patches = []
    for vector in (0x40, 0x50):
        a.raw(0xC7, 0x06, struct.pack("<H", vector * 4)).raw(b"\x00\x00")
        patches.append(len(a.b) - 2)
        a.raw(0xC7, 0x06, struct.pack("<H", vector * 4 + 2), struct.pack("<H", 0))
    a.mov_al(0).out_imm(0xE0)  # ready
    a.raw(0xFB)
    a.label("idle").hlt().jmp("idle")
    for i, (counter, port) in enumerate(((0x3000, 0x510), (0x3002, 0x512))):
        a.b[patches[i] : patches[i] + 2] = struct.pack("<H", a.here())
        a.raw(0xFF, 0x06, struct.pack("<H", counter)).load(counter, 2)
        a.raw(0xBA, struct.pack("<H", port)).out_dx(2).raw(0xCF)
    return a.bytes()


def test_msi_and_msi_routed_irqfd_reach_the_lapic(kvm: Kvm) -> None:
    vm, vcpu = real_mode_vm(kvm, _msi_guest(), irqchip=True)
    fd = os.eventfd(0, os.EFD_NONBLOCK)
    try:
        with vm:
            lapic = vcpu.get_lapic()
            svr = int.from_bytes(bytes(ffi.buffer(lapic.regs))[0xF0:0xF4], "little") | 0x1FF  # enable
            ffi.memmove(ffi.addressof(lapic.regs, 0xF0), svr.to_bytes(4, "little"), 4)
            vcpu.set_lapic(lapic)
            c40, c50, ready = _Counter(), _Counter(), _Ready()
            vm.pio_bus.register(0x510, 2, c40, "v40")
            vm.pio_bus.register(0x512, 2, c50, "v50")
            vm.pio_bus.register(0xE0, 1, ready, "ready")
            vm.start()
            assert ready.event.wait(10)
            time.sleep(0.05)
            # fixed delivery, physical destination APIC 0
            assert vm.signal_msi(0xFEE00000, 0x40) > 0
            assert c40.wait_for(1) == [1]
            vm.set_msi_route(40, 0xFEE00000, 0x50)
            vm.irqfd(40, fd)
            os.eventfd_write(fd, 1)
            assert c50.wait_for(1) == [1]
            assert c40.values == [1]
    finally:
        os.close(fd)


def test_msrs_fpu_cpuid_round_trip(kvm: Kvm) -> None:
    from vdm_kvm.cpuid import vcpu_cpuid

    vm, vcpu = real_mode_vm(kvm, Asm().hlt().bytes(), irqchip=True)
    with vm:
        vcpu.set_cpuid(vcpu_cpuid(kvm.supported_cpuid(), 0, 1))  # KVM accepts what it offered
        assert vcpu.set_msrs({0x174: 0x10, 0x175: 0x8000}) == 2  # IA32_SYSENTER_CS/ESP
        assert vcpu.get_msrs([0x174, 0x175]) == {0x174: 0x10, 0x175: 0x8000}
        fpu = vcpu.get_fpu()
        fpu.fcw, fpu.fsw = 0x27F, 0x0100  # (KVM_SET_FPU/KVM_GET_FPU leave MXCSR out, both ways)
        vcpu.set_fpu(fpu)
        assert (vcpu.get_fpu().fcw, vcpu.get_fpu().fsw) == (0x27F, 0x0100)
        assert vcpu.get_mp_state() == 0  # KVM_MP_STATE_RUNNABLE: the boot processor
        ap = vm.create_vcpu()
        assert ap.get_mp_state() == 1  # KVM_MP_STATE_UNINITIALIZED: waits for INIT/SIPI
