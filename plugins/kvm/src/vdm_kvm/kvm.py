"""KVM from Python: ``/dev/kvm``, a VM with its memory slots, interrupt plumbing and vCPU threads.

* :class:`Kvm` (here) -- the ``/dev/kvm`` handle: API version, capabilities, supported CPUID;
* :class:`~vdm_kvm.vm.Vm` (:mod:`~vdm_kvm.vm`) -- one VM: guest RAM slots, the in-kernel irqchip and
  PIT, IRQ lines, MSIs, ioeventfds, irqfds, the PIO and MMIO buses, the vCPUs' lifetime;
* :class:`~vdm_kvm.vcpu.Vcpu` (:mod:`~vdm_kvm.vcpu`) -- one vCPU and its ``KVM_RUN`` thread;
* :mod:`~vdm_kvm.exits` (:class:`VmExit`, exit names) and :mod:`~vdm_kvm.ioctl` (:class:`KvmError`).

Every name of these modules that other code uses is importable from here too.
"""

from __future__ import annotations

import errno
import os
from typing import Any

from . import kvm_abi as abi
from .exits import EXIT_NAMES, VmExit
from .ioctl import KvmError, kvm_ioctl
from .kvm_abi import ffi
from .vcpu import KICK_SIGNAL, CpuidEntry, Vcpu
from .vm import KvmIrqLine, Vm

__all__ = ["EXIT_NAMES", "KICK_SIGNAL", "CpuidEntry", "Kvm", "KvmError", "KvmIrqLine", "Vcpu", "Vm", "VmExit"]


class Kvm:
    """An open ``/dev/kvm``."""

    def __init__(self, path: str = "/dev/kvm") -> None:
        self.path = path
        self.fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        try:
            self.api_version = kvm_ioctl(self.fd, abi.KVM_GET_API_VERSION, 0, "KVM_GET_API_VERSION")
            if self.api_version != abi.KVM_API_VERSION:
                raise KvmError(errno.ENOTSUP, f"{path}: KVM API version {self.api_version}, need 12")
            self.vcpu_mmap_size = kvm_ioctl(self.fd, abi.KVM_GET_VCPU_MMAP_SIZE, 0, "KVM_GET_VCPU_MMAP_SIZE")
        except BaseException:
            os.close(self.fd)
            raise

    def check_extension(self, cap: int) -> int:
        """``KVM_CHECK_EXTENSION``: 0 if unsupported, else a positive capability value."""
        return kvm_ioctl(self.fd, abi.KVM_CHECK_EXTENSION, cap, "KVM_CHECK_EXTENSION")

    def supported_cpuid(self) -> list[CpuidEntry]:
        """``KVM_GET_SUPPORTED_CPUID``: every leaf this KVM can expose to a guest."""
        n = abi.KVM_MAX_CPUID_ENTRIES
        while True:
            buf = ffi.new("struct kvm_cpuid2 *", {"nent": n, "entries": n})
            try:
                kvm_ioctl(self.fd, abi.KVM_GET_SUPPORTED_CPUID, buf, "KVM_GET_SUPPORTED_CPUID")
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

