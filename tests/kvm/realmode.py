"""Tiny real-mode guests for the KVM unit tests (hand-assembled 16-bit x86).

These run on any /dev/kvm, including kvm_pvm, which runs small real-mode programs fine.
"""

from __future__ import annotations

import os
import struct

import pytest
from vdm_kvm.kvm import Kvm, Vcpu, Vm

CODE = 0x1000
STACK = 0xF000


def kvm_or_skip() -> Kvm:
    if not os.path.exists("/dev/kvm"):
        pytest.skip("no /dev/kvm on this machine")
    try:
        return Kvm()
    except OSError as e:
        pytest.skip(f"/dev/kvm not usable: {e}")


class Asm:
    """A few 16-bit instructions, enough for the tests."""

    def __init__(self) -> None:
        self.b = bytearray()
        self.labels: dict[str, int] = {}

    def here(self) -> int:
        return CODE + len(self.b)

    def raw(self, *data: int | bytes) -> Asm:
        for d in data:
            self.b += d if isinstance(d, (bytes, bytearray)) else bytes([d])
        return self

    def mov_dx(self, v: int) -> Asm:
        return self.raw(0xBA, struct.pack("<H", v))

    def mov_al(self, v: int) -> Asm:
        return self.raw(0xB0, v)

    def mov_ax(self, v: int) -> Asm:
        return self.raw(0xB8, struct.pack("<H", v))

    def mov_eax(self, v: int) -> Asm:
        return self.raw(0x66, 0xB8, struct.pack("<I", v))

    def mov_ds_ax(self) -> Asm:
        return self.raw(0x8E, 0xD8)

    def out_dx(self, size: int) -> Asm:
        return self.raw({1: b"\xee", 2: b"\xef", 4: b"\x66\xef"}[size])

    def in_dx(self, size: int) -> Asm:
        return self.raw({1: b"\xec", 2: b"\xed", 4: b"\x66\xed"}[size])

    def out_imm(self, port: int) -> Asm:  # out imm8, al
        return self.raw(0xE6, port)

    def store(self, addr: int, size: int) -> Asm:  # mov [addr], al/ax/eax
        return self.raw({1: b"\xa2", 2: b"\xa3", 4: b"\x66\xa3"}[size], struct.pack("<H", addr))

    def load(self, addr: int, size: int) -> Asm:  # mov al/ax/eax, [addr]
        return self.raw({1: b"\xa0", 2: b"\xa1", 4: b"\x66\xa1"}[size], struct.pack("<H", addr))

    def hlt(self) -> Asm:
        return self.raw(0xF4)

    def label(self, name: str) -> Asm:
        self.labels[name] = self.here()
        return self

    def jmp(self, name: str) -> Asm:  # short jump backwards to a label
        rel = self.labels[name] - (self.here() + 2)
        return self.raw(0xEB, rel & 0xFF)

    def bytes(self) -> bytes:
        return bytes(self.b)


def real_mode_vm(kvm: Kvm, code: bytes, *, mem: int = 0x10000, irqchip: bool = False) -> tuple[Vm, Vcpu]:
    """A VM with ``mem`` bytes of RAM at 0, ``code`` at 0x1000, one vCPU in real mode at 0:0x1000."""
    vm = kvm.create_vm()
    if irqchip:
        vm.set_tss_addr()
        vm.create_irqchip()
    region = vm.add_memory(0, mem)
    region.view[CODE : CODE + len(code)] = code
    vcpu = vm.create_vcpu()
    s = vcpu.get_sregs()
    for seg in (s.cs, s.ds, s.es, s.ss):
        seg.base = 0
        seg.selector = 0
    vcpu.set_sregs(s)
    vcpu.set_regs(rip=CODE, rflags=2, rsp=STACK)
    return vm, vcpu


class Recorder:
    """An IoHandler that records accesses and answers reads from a function."""

    def __init__(self, answer=lambda offset, size: 0) -> None:
        self.log: list[tuple[str, int, int, int]] = []
        self.answer = answer

    def read(self, offset: int, size: int) -> int:
        v = self.answer(offset, size)
        self.log.append(("r", offset, size, v))
        return v

    def write(self, offset: int, size: int, value: int) -> None:
        self.log.append(("w", offset, size, value))
