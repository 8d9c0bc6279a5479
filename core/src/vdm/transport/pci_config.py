"""PCI type-0 configuration space: the register offsets and bits, and a 256-byte space with write masks.

The virtio-pci transport builds its function's configuration space from these; a hypervisor
plugin's PCI bus (vdm-kvm's x86 configuration mechanism #1, ``vdm_kvm.pci_bus``) routes the
guest's configuration accesses to a :class:`PciFunction`. Reads outside the 256 bytes return all
ones and writes there are dropped, as on hardware; only the bits a register's mask allows change.
"""

from __future__ import annotations

import threading
from typing import Protocol

__all__ = ["ConfigSpace", "PciFunction"]

# config space offsets
VENDOR_ID = 0x00
DEVICE_ID = 0x02
COMMAND = 0x04
STATUS = 0x06
REVISION = 0x08
CLASS_PROG = 0x09
HEADER_TYPE = 0x0E
BAR0 = 0x10
SUBSYSTEM_VENDOR = 0x2C
SUBSYSTEM_ID = 0x2E
CAP_PTR = 0x34
INTERRUPT_LINE = 0x3C
INTERRUPT_PIN = 0x3D

STATUS_CAP_LIST = 1 << 4
COMMAND_MEMORY = 1 << 1
COMMAND_MASTER = 1 << 2
COMMAND_INTX_DISABLE = 1 << 10


class PciFunction(Protocol):
    """One PCI function as the bus sees it."""

    def config_read(self, offset: int, size: int) -> int: ...

    def config_write(self, offset: int, size: int, value: int) -> None: ...


class ConfigSpace:
    """256 bytes of type-0 configuration space with per-byte write masks."""

    def __init__(self) -> None:
        self.data = bytearray(256)
        self.wmask = bytearray(256)
        self.lock = threading.Lock()

    def set(self, offset: int, size: int, value: int, writable_mask: int = 0) -> None:
        self.data[offset : offset + size] = value.to_bytes(size, "little")
        self.wmask[offset : offset + size] = writable_mask.to_bytes(size, "little")

    def get(self, offset: int, size: int) -> int:
        return int.from_bytes(self.data[offset : offset + size], "little")

    def read(self, offset: int, size: int) -> int:
        if offset < 0 or offset + size > 256:
            return (1 << (8 * size)) - 1
        with self.lock:
            return int.from_bytes(self.data[offset : offset + size], "little")

    def write(self, offset: int, size: int, value: int) -> None:
        if offset < 0 or offset + size > 256:
            return
        with self.lock:
            for i in range(size):
                m = self.wmask[offset + i]
                b = (value >> (8 * i)) & 0xFF
                self.data[offset + i] = (self.data[offset + i] & ~m) | (b & m)
