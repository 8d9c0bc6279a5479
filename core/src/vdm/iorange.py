"""What the owner of a guest MMIO or port-I/O range implements.

A hypervisor plugin routes each guest access that falls in a registered range (a vCPU exit under
KVM, an I/O request under Xen) to the range's :class:`IoHandler`: a virtio-mmio or virtio-pci
transport, a UART, a PCI bus. The handler runs on the caller's thread and answers at once.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

__all__ = ["IoHandler"]


@runtime_checkable
class IoHandler(Protocol):
    """The owner of a registered MMIO or PIO range.

    ``offset`` is relative to the start of the range and ``size`` is 1, 2, 4 or 8 bytes. A handler
    never raises for a bad offset or size: it answers the way hardware would (reads return 0 or all
    ones, writes are ignored) because the guest chose the access.
    """

    def read(self, offset: int, size: int) -> int: ...

    def write(self, offset: int, size: int, value: int) -> None: ...
