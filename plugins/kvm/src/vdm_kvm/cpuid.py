"""The CPUID a vCPU gets: KVM's supported leaves, with per-vCPU topology filled in.

Linux reads its APIC id from CPUID leaf 1 (EBX[31:24]) and, where present, the x2APIC id from
leaves 0xb/0x1f (EDX). We give vCPU ``i`` APIC id ``i`` (matching the MADT), say how many logical
processors the package has, and hide what a vdm guest has no device for.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Iterable

from .kvm import CpuidEntry

__all__ = ["vcpu_cpuid"]

_HYPERVISOR_BIT = 1 << 31  # leaf 1 ECX
_X2APIC_BIT = 1 << 21  # leaf 1 ECX
_HTT_BIT = 1 << 28  # leaf 1 EDX
_TSC_DEADLINE_BIT = 1 << 24  # leaf 1 ECX


def vcpu_cpuid(supported: Iterable[CpuidEntry], apic_id: int, nr_vcpus: int) -> list[CpuidEntry]:
    """The CPUID table for the vCPU with ``apic_id`` among ``nr_vcpus``."""
    out: list[CpuidEntry] = []
    for e in supported:
        if e.function == 1:
            ebx = (e.ebx & 0x0000FFFF) | ((apic_id & 0xFF) << 24) | ((max(nr_vcpus, 1) & 0xFF) << 16)
            edx = e.edx | (_HTT_BIT if nr_vcpus > 1 else 0)
            e = replace(e, ebx=ebx, ecx=e.ecx | _HYPERVISOR_BIT, edx=edx)
        elif e.function in (0xB, 0x1F):
            # level 0 (SMT): one thread per core; level 1 (core): nr_vcpus cores; EDX: x2APIC id
            shift = (nr_vcpus - 1).bit_length()
            if e.index == 0:
                e = replace(e, eax=0, ebx=1, ecx=(1 << 8) | 0, edx=apic_id)
            elif e.index == 1:
                e = replace(e, eax=shift, ebx=nr_vcpus, ecx=(2 << 8) | 1, edx=apic_id)
            else:
                e = replace(e, eax=0, ebx=0, ecx=e.index, edx=apic_id)
        elif e.function == 4:
            # cache/core topology (Intel): EAX[31:26] = cores per package - 1
            e = replace(e, eax=(e.eax & 0x03FFFFFF) | (((nr_vcpus - 1) & 0x3F) << 26))
        elif e.function == 0x8000001E:
            e = replace(e, eax=apic_id, ebx=(e.ebx & ~0xFF) | (apic_id & 0xFF))
        out.append(e)
    return out
