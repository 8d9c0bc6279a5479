"""Vmm: attaching devices through the VMM hooks of a hypervisor backend (a fake one here)."""

from __future__ import annotations

import threading

from vdm import vmmimpl
from vdm.eventfd import eventfd_write
from vdm.testing import GuestRam
from vdm.testing.devices import EchoDevice
from vdm.transport.mmio import Reg
from vdm.vmm import Vmm
from vdm_kvm.pci_bus import PciBus


class FakeHypervisor:
    """A backend with flat memory, an MMIO map, IRQ levels, MSIs and ioeventfds."""

    def __init__(self, ram: GuestRam, ioeventfd: bool = True) -> None:
        self.ram = ram
        self.mmio: dict[int, tuple[int, object]] = {}
        self.irq_levels: dict[int, list[bool]] = {}
        self.msis: list[tuple[int, int]] = []
        self.eventfds: dict[tuple[int, int | None], int] = {}
        self.next_irq = 5
        self.next_mmio = 0xD000_0000
        self.with_ioeventfd = ioeventfd
        self.changed = threading.Condition()

    @vmmimpl
    def vmm_guest_memory(self):
        return self.ram.memory

    @vmmimpl
    def vmm_allocate_irq(self, owner):
        self.next_irq += 1
        return self.next_irq

    @vmmimpl
    def vmm_allocate_mmio(self, size, owner):
        base = -(-self.next_mmio // size) * size
        self.next_mmio = base + size
        return base

    @vmmimpl
    def vmm_register_mmio(self, base, size, handler, owner):
        self.mmio[base] = (size, handler)
        return True

    @vmmimpl
    def vmm_set_irq_level(self, irq, level):
        with self.changed:
            self.irq_levels.setdefault(irq, []).append(level)
            self.changed.notify_all()
        return True

    @vmmimpl
    def vmm_send_msi(self, address, data):
        with self.changed:
            self.msis.append((address, data))
            self.changed.notify_all()
        return True

    @vmmimpl
    def vmm_ioeventfd(self, addr, size, datamatch, fd, pio):
        if not self.with_ioeventfd:
            return None
        self.eventfds[(addr, datamatch)] = fd
        return True

    # the guest side
    def guest_write(self, addr: int, value: int, size: int = 4) -> None:
        for (a, match), fd in self.eventfds.items():
            if a == addr and match in (None, value):
                eventfd_write(fd, 1)  # what KVM does instead of exiting
                return
        for base, (length, handler) in self.mmio.items():
            if base <= addr < base + length:
                handler.write(addr - base, size, value)
                return
        raise AssertionError(f"unrouted write to 0x{addr:x}")


def test_attach_mmio_routes_registers_irq_and_kicks():
    ram = GuestRam(1 << 20)
    hv = FakeHypervisor(ram)
    vmm = Vmm(hv, name="t")
    dev = EchoDevice()
    transport = vmm.attach_mmio(dev)
    try:
        base = transport.base
        assert hv.mmio[base][1] is transport and transport.read(Reg.MAGIC, 4) == 0x74726976
        assert (base + Reg.QUEUE_NOTIFY, 0) in hv.eventfds  # kick of queue 0 through an eventfd
        # bring the device up with the test driver's register sequence, on the attached transport
        from vdm.testing import VirtioTestDriver

        drv = VirtioTestDriver(dev, ram=ram, transport=transport)
        drv.init()
        head = drv.post(0, [b"ping"], [4])
        with hv.changed:
            hv.guest_write(base + Reg.QUEUE_NOTIFY, 0)  # served on the Vmm's event loop thread
            assert hv.changed.wait_for(lambda: True in hv.irq_levels.get(transport.irq_number, []), 5)
        used = drv.collect(0)
        assert [(u.head, u.data) for u in used] == [(head, b"ping")]
    finally:
        vmm.close()
    ram.check_guards()


def test_attach_pci_uses_msi_and_a_bar():
    ram = GuestRam(1 << 20)
    hv = FakeHypervisor(ram, ioeventfd=False)
    vmm = Vmm(hv, name="t")
    bus = PciBus()
    dev = EchoDevice()
    transport = vmm.attach_pci(dev, bus)
    try:
        assert transport.bar_address % 0x8000 == 0 and hv.mmio[transport.bar_address][1] is transport
        # the guest finds it by scanning bus 0 through 0xcf8/0xcfc
        bus.write(0, 4, 0x8000_0000 | transport.slot << 11)
        assert bus.read(4, 4) == (0x1040 + dev.device_id) << 16 | 0x1AF4
        bus.write(0, 4, 0x8000_0000 | 31 << 11)
        assert bus.read(4, 4) == 0xFFFFFFFF  # empty slot
        from vdm.testing import VirtioPciTestDriver

        drv = VirtioPciTestDriver(dev, ram=ram, transport=transport)
        drv.init()
        u = drv.request(0, [b"pci!"], [4])
        assert u.data == b"pci!"
        assert hv.msis and hv.msis[-1] == (0xFEE0_0000, 0x41)  # queue 0's vector, delivered by the VMM
    finally:
        vmm.close()


class _Counting:
    """Every call that goes through the Vmm's pluggy dispatch, by hook name (pluggy's own tracing)."""

    def __init__(self, vmm: Vmm) -> None:
        self.calls: list[str] = []
        self._undo = vmm.pm.add_hookcall_monitoring(self._before, lambda *a: None)

    def _before(self, hook_name, hook_impls, kwargs) -> None:
        self.calls.append(hook_name)

    def stop(self) -> None:
        self._undo()


def test_interrupts_do_not_go_through_pluggy_dispatch():
    """Issue 19 item 4: the hooks stay the contract, but MSIs and IRQ levels call the backend
    directly -- resolved when the Vmm is made -- so N interrupts make no pluggy hook call."""
    ram = GuestRam(1 << 20)
    hv = FakeHypervisor(ram, ioeventfd=False)
    vmm = Vmm(hv, name="t")
    try:
        bus = PciBus()
        dev, dev2 = EchoDevice(), EchoDevice()
        pt = vmm.attach_pci(dev, bus, intx=False)
        mt = vmm.attach_mmio(dev2)
        from vdm.testing import VirtioPciTestDriver, VirtioTestDriver

        pdrv = VirtioPciTestDriver(dev, ram=ram, transport=pt)
        mdrv = VirtioTestDriver(dev2, ram=ram, transport=mt)
        pdrv.init()
        mdrv.init()
        counting = _Counting(vmm)
        n = 50
        for i in range(n):
            assert pdrv.request(0, [b"msi%d" % i], [8]).data.startswith(b"msi")
            assert mdrv.request(0, [b"int%d" % i], [8]).data.startswith(b"int")
            mdrv.ack_interrupts()
        counting.stop()
        assert len(hv.msis) >= n  # every request interrupted, by MSI-X ...
        assert hv.irq_levels[mt.irq_number].count(True) >= n  # ... and on the wired line
        assert counting.calls == []
    finally:
        vmm.close()


def test_resolved_hooks_keep_firstresult_order():
    """Two backends: the later-registered answers first; ``None`` passes to the next; no
    implementation at all is ``None`` (send_msi then returns False)."""

    class NoMsi:
        @vmmimpl
        def vmm_send_msi(self, address, data):
            return None

    class Msi:
        def __init__(self) -> None:
            self.got: list[int] = []

        @vmmimpl
        def vmm_send_msi(self, data):  # pluggy lets an implementation take fewer arguments
            self.got.append(data)
            return True

    msi = Msi()
    vmm = Vmm(msi, NoMsi(), name="t")
    try:
        assert vmm.send_msi(0xFEE0_0000, 7) is True and msi.got == [7]
    finally:
        vmm.close()
    vmm = Vmm(NoMsi(), name="t")
    try:
        assert vmm.send_msi(0xFEE0_0000, 7) is False
    finally:
        vmm.close()


def test_a_wrapper_implementation_keeps_pluggy_semantics():
    """A backend that wraps a hook (pluggy ``wrapper=True``) is honoured: that hook keeps pluggy's
    dispatch, so the wrapper sees every call and may change the answer."""

    class Msi:
        @vmmimpl
        def vmm_send_msi(self, address, data):
            return None  # "no MSI here" ...

    class Wrapper:
        def __init__(self) -> None:
            self.seen: list[int] = []

        @vmmimpl(wrapper=True)
        def vmm_send_msi(self, address, data):
            result = yield
            self.seen.append(data)
            return True if result is None else result  # ... delivered another way

    wrapper = Wrapper()
    vmm = Vmm(Msi(), wrapper, name="t")
    try:
        assert vmm.send_msi(0xFEE0_0000, 3) is True and wrapper.seen == [3]
    finally:
        vmm.close()
