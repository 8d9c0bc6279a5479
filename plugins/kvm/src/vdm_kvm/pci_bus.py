"""A PCI bus behind the x86 configuration mechanism #1 (ports 0xcf8-0xcff), with a host bridge.

The bus is an :class:`~vdm.iorange.IoHandler` for the eight ports; devices are
:class:`PciFunction` objects in slots of bus 0 (function 0 only). Absent devices read as all ones,
as on real hardware, so the guest's scan finds exactly what is there.
"""

from __future__ import annotations

import logging
import threading

from vdm.transport.pci_config import (
    CLASS_PROG,
    COMMAND,
    COMMAND_MEMORY,
    DEVICE_ID,
    SUBSYSTEM_ID,
    SUBSYSTEM_VENDOR,
    VENDOR_ID,
    ConfigSpace,
    PciFunction,
)

__all__ = ["CONF1_PORT", "CONF1_PORTS", "HostBridge", "PciBus"]

log = logging.getLogger(__name__)

CONF1_PORT = 0xCF8
CONF1_PORTS = 8

class HostBridge:
    """Bus 0, slot 0: a host bridge with nothing to configure."""

    def __init__(self) -> None:
        self.cfg = ConfigSpace()
        self.cfg.set(VENDOR_ID, 2, 0x1B36)  # Red Hat, Inc.
        self.cfg.set(DEVICE_ID, 2, 0x0008)  # a generic PCIe host bridge
        self.cfg.set(COMMAND, 2, COMMAND_MEMORY, 0x0006)
        self.cfg.set(CLASS_PROG, 3, 0x060000)  # bridge / host bridge
        self.cfg.set(SUBSYSTEM_VENDOR, 2, 0x1AF4)
        self.cfg.set(SUBSYSTEM_ID, 2, 0x1100)

    def config_read(self, offset: int, size: int) -> int:
        return self.cfg.read(offset, size)

    def config_write(self, offset: int, size: int, value: int) -> None:
        self.cfg.write(offset, size, value)


class PciBus:
    """Bus 0 through configuration mechanism #1 (0xcf8 address, 0xcfc-0xcff data)."""

    MAX_SLOTS = 32

    def __init__(self) -> None:
        self.slots: dict[int, PciFunction] = {0: HostBridge()}
        self._address = 0
        self._lock = threading.Lock()

    def add(self, function: PciFunction, slot: int | None = None) -> int:
        """Plug ``function`` into ``slot`` (the next free one by default); return the slot."""
        if slot is None:
            slot = next((s for s in range(1, self.MAX_SLOTS) if s not in self.slots), None)
            if slot is None:
                raise ValueError("PCI bus 0 is full (32 slots)")
        if slot in self.slots or not 0 <= slot < self.MAX_SLOTS:
            raise ValueError(f"PCI slot {slot} is taken or does not exist")
        self.slots[slot] = function
        return slot

    def _target(self, offset: int) -> tuple[PciFunction | None, int]:
        addr = self._address
        if not addr & 0x8000_0000:
            return None, 0
        bus, slot, func = (addr >> 16) & 0xFF, (addr >> 11) & 0x1F, (addr >> 8) & 0x7
        if bus or func:
            return None, 0
        return self.slots.get(slot), (addr & 0xFC) + (offset - 4)

    # ---- IoHandler (ports 0xcf8..0xcff) ----------------------------------------------------------

    def read(self, offset: int, size: int) -> int:
        ones = (1 << (8 * size)) - 1
        if offset < 4:
            return self._address if offset == 0 and size == 4 else ones
        with self._lock:
            fn, reg = self._target(offset)
        if fn is None or reg + size > 256:
            return ones
        return fn.config_read(reg, size) & ones

    def write(self, offset: int, size: int, value: int) -> None:
        if offset < 4:
            if offset == 0 and size == 4:
                with self._lock:
                    self._address = value & 0x80FF_FFFC
            return
        with self._lock:
            fn, reg = self._target(offset)
        if fn is not None and reg + size <= 256:
            fn.config_write(reg, size, value)
