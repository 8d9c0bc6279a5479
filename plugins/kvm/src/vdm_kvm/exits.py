"""Why a vCPU left ``KVM_RUN`` and why a VM stopped: the exit layouts of ``kvm_run``, exit names,
:class:`VmExit`.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from . import kvm_abi as abi

# kvm_run as the exit loop (vdm_kvm.vcpu) reads it: exit_reason at 8, the exit union at 32
IO_EXIT = struct.Struct("<8xI20xBBHIQ")  # reason, io.direction, io.size, io.port, io.count, io.data_offset
MMIO_EXIT = struct.Struct("<8xI20xQ8sIB")  # reason, mmio.phys_addr, mmio.data, mmio.len, mmio.is_write
MMIO_DATA = 40

EXIT_NAMES = {
    v: k[len("KVM_EXIT_"):] for k, v in vars(abi).items() if k.startswith("KVM_EXIT_") and k.count("_") >= 2
    and not k.startswith("KVM_EXIT_IO_")
}


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

