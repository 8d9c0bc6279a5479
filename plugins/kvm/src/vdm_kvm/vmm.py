"""vdm's VMM hooks on a KVM :class:`~vdm_kvm.machine.Machine`.

Guest RAM is flat-mapped in advance (KVM memory slots), MMIO/PIO exits go to the VM's I/O buses,
interrupts go through the in-kernel irqchip (``KVM_IRQ_LINE``) or as MSIs (``KVM_SIGNAL_MSI``),
kicks arrive through ioeventfds, so a vCPU thread never runs device code for a kick.
"""

from __future__ import annotations

import logging

from vdm import vmmimpl
from vdm.interrupts import IrqLine
from vdm.iorange import IoHandler
from vdm.memory import GuestMemory

from .machine import Machine

__all__ = ["KvmVmm"]

log = logging.getLogger(__name__)


class KvmVmm:
    """Implements :class:`vdm.hookspecs.VmmSpec` for one KVM VM."""

    def __init__(self, machine: Machine) -> None:
        self.machine = machine
        self.vm = machine.vm

    @vmmimpl
    def vmm_guest_memory(self) -> GuestMemory:
        return self.vm.guest_memory

    @vmmimpl
    def vmm_allocate_irq(self, owner: str) -> int:
        return self.machine.allocate_irq(owner)

    @vmmimpl
    def vmm_allocate_mmio(self, size: int, owner: str) -> int:
        if size & (size - 1) == 0 and size > 0x1000:
            # Naturally aligned, as a PCI BAR must be: take a larger window and align inside it.
            base = self.machine.allocate_mmio(2 * size, owner)
            return (base + size - 1) & ~(size - 1)
        return self.machine.allocate_mmio(size, owner)

    @vmmimpl
    def vmm_register_mmio(self, base: int, size: int, handler: IoHandler, owner: str) -> bool:
        self.vm.mmio_bus.register(base, size, handler, owner)
        return True

    @vmmimpl
    def vmm_register_pio(self, port: int, count: int, handler: IoHandler, owner: str) -> bool:
        self.vm.pio_bus.register(port, count, handler, owner)
        return True

    @vmmimpl
    def vmm_set_irq_level(self, irq: int, level: bool) -> bool:
        self.vm.line(irq).set_level(level)
        return True

    @vmmimpl
    def vmm_irq_line(self, irq: int) -> IrqLine:
        # one object per GSI that remembers its level, so repeated raises cost no ioctl
        return self.vm.line(irq)

    @vmmimpl
    def vmm_irqfd(self, irq: int, fd: int) -> bool:
        self.vm.irqfd(irq, fd)
        return True

    @vmmimpl
    def vmm_send_msi(self, address: int, data: int) -> bool:
        self.vm.signal_msi(address, data)
        return True

    @vmmimpl
    def vmm_ioeventfd(self, addr: int, size: int, datamatch: int | None, fd: int, pio: bool) -> bool:
        self.vm.ioeventfd(addr, size, fd, datamatch, pio=pio)
        return True
