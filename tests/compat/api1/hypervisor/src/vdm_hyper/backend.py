"""The hyper hypervisor backend: the VMM hooks vdm-core calls to attach devices to one VM.

One :class:`HyperBackend` per running VM. ``vdm.vmm.Vmm(backend)`` uses it to allocate MMIO
space and interrupt lines, register MMIO handlers and raise interrupts; devices only ever see the
guest memory and the transport. This skeleton keeps everything in the process -- MMIO accesses are
routed by :meth:`HyperBackend.mmio_access` (what a vCPU exit loop or an I/O request handler
calls) and interrupt levels are recorded. Replace each hook's body with the real hypervisor call.
Hooks not implemented here (ioeventfd, irqfd, MSI, port I/O) answer None: vdm falls back.
"""

from __future__ import annotations

import threading

from vdm import vmmimpl
from vdm.hypervisor import IoHandler
from vdm.memory import FlatGuestMemory, GuestMemory, MemoryRegion

PAGE = 4096


class HyperBackend:
    def __init__(
        self,
        memory: GuestMemory | None = None,
        *,
        ram_size: int = 64 << 20,
        ram_base: int = 0x4000_0000,
        mmio_base: int = 0xD000_0000,
        first_irq: int = 5,
    ) -> None:
        #: guest RAM as devices see it (a real backend maps the VM's RAM here)
        self.memory = memory if memory is not None else FlatGuestMemory(
            [MemoryRegion(ram_base, bytearray(ram_size))]
        )
        self._next_mmio = mmio_base
        self._next_irq = first_irq
        self._lock = threading.Lock()
        self.mmio: list[tuple[int, int, IoHandler, str]] = []
        #: the last level set on each interrupt line
        self.irq_levels: dict[int, bool] = {}

    # ---- the VMM hooks ---------------------------------------------------------------------------

    @vmmimpl
    def vmm_guest_memory(self) -> GuestMemory:
        return self.memory

    @vmmimpl
    def vmm_allocate_irq(self, owner: str) -> int:
        with self._lock:
            irq, self._next_irq = self._next_irq, self._next_irq + 1
        return irq

    @vmmimpl
    def vmm_allocate_mmio(self, size: int, owner: str) -> int:
        with self._lock:
            base = self._next_mmio
            self._next_mmio += -(-size // PAGE) * PAGE
        return base

    @vmmimpl
    def vmm_register_mmio(self, base: int, size: int, handler: IoHandler, owner: str) -> bool:
        with self._lock:
            for b, s, _, other in self.mmio:
                if base < b + s and b < base + size:
                    raise ValueError(f"{owner}: MMIO 0x{base:x}+0x{size:x} overlaps {other}")
            self.mmio.append((base, size, handler, owner))
        return True

    @vmmimpl
    def vmm_set_irq_level(self, irq: int, level: bool) -> bool:
        self.irq_levels[irq] = level
        return True

    # ---- what the hypervisor side calls ----------------------------------------------------------

    def mmio_access(self, addr: int, size: int, write: bool, value: int = 0) -> int:
        """A guest MMIO access at ``addr``: route it to its handler (unclaimed: reads all ones)."""
        for base, length, handler, _ in self.mmio:
            if base <= addr < base + length:
                if write:
                    handler.write(addr - base, size, value)
                    return 0
                return handler.read(addr - base, size)
        return 0 if write else (1 << (8 * size)) - 1
