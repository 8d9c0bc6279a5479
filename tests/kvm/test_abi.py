"""The cffi declarations and ioctl numbers of vdm_kvm.kvm_abi against the installed kernel headers.

A small C program is compiled against <linux/kvm.h> (Debian: linux-libc-dev, and a C compiler) and
prints every size, field offset, ioctl number and constant we declare; each must match ours.
"""

from __future__ import annotations

import shutil
import subprocess

import pytest
from vdm_kvm import kvm_abi as abi
from vdm_kvm.kvm_abi import ffi

STRUCTS = [
    "kvm_regs", "kvm_sregs", "kvm_segment", "kvm_dtable", "kvm_fpu", "kvm_lapic_state", "kvm_msr_entry",
    "kvm_msrs", "kvm_cpuid_entry2", "kvm_cpuid2", "kvm_userspace_memory_region", "kvm_irq_level",
    "kvm_irqchip", "kvm_pic_state", "kvm_ioapic_state", "kvm_pit_config", "kvm_run", "kvm_ioeventfd",
    "kvm_irq_routing_entry", "kvm_irq_routing", "kvm_irq_routing_msi", "kvm_irqfd", "kvm_msi",
    "kvm_signal_mask", "kvm_mp_state", "kvm_enable_cap", "kvm_debug_exit_arch",
]

FIELDS = [
    ("kvm_run", "immediate_exit"), ("kvm_run", "exit_reason"), ("kvm_run", "cr8"), ("kvm_run", "apic_base"),
    ("kvm_run", "io.direction"), ("kvm_run", "io.size"), ("kvm_run", "io.port"), ("kvm_run", "io.count"),
    ("kvm_run", "io.data_offset"), ("kvm_run", "mmio.phys_addr"), ("kvm_run", "mmio.data"),
    ("kvm_run", "mmio.len"), ("kvm_run", "mmio.is_write"), ("kvm_run", "system_event.type"),
    ("kvm_run", "system_event.ndata"), ("kvm_run", "system_event.data"), ("kvm_run", "internal.suberror"),
    ("kvm_run", "fail_entry.hardware_entry_failure_reason"), ("kvm_run", "kvm_valid_regs"), ("kvm_run", "s"),
    ("kvm_sregs", "cs"), ("kvm_sregs", "ldt"), ("kvm_sregs", "gdt"), ("kvm_sregs", "idt"),
    ("kvm_sregs", "cr0"), ("kvm_sregs", "cr3"), ("kvm_sregs", "cr4"), ("kvm_sregs", "efer"),
    ("kvm_sregs", "apic_base"), ("kvm_sregs", "interrupt_bitmap"),
    ("kvm_segment", "limit"), ("kvm_segment", "selector"), ("kvm_segment", "type"), ("kvm_segment", "l"),
    ("kvm_segment", "unusable"), ("kvm_regs", "rip"), ("kvm_regs", "rflags"), ("kvm_regs", "rsi"),
    ("kvm_fpu", "fcw"), ("kvm_fpu", "ftwx"), ("kvm_fpu", "last_ip"), ("kvm_fpu", "xmm"), ("kvm_fpu", "mxcsr"),
    ("kvm_cpuid2", "entries"), ("kvm_cpuid_entry2", "eax"), ("kvm_cpuid_entry2", "edx"),
    ("kvm_msrs", "entries"), ("kvm_msr_entry", "data"),
    ("kvm_userspace_memory_region", "guest_phys_addr"), ("kvm_userspace_memory_region", "userspace_addr"),
    ("kvm_ioeventfd", "addr"), ("kvm_ioeventfd", "len"), ("kvm_ioeventfd", "fd"), ("kvm_ioeventfd", "flags"),
    ("kvm_irqfd", "gsi"), ("kvm_irqfd", "resamplefd"), ("kvm_msi", "data"), ("kvm_msi", "devid"),
    ("kvm_irq_routing_entry", "u"), ("kvm_irq_routing_entry", "u.msi.data"),
    ("kvm_irq_routing_entry", "u.irqchip.pin"), ("kvm_irq_routing", "entries"),
    ("kvm_irqchip", "chip"), ("kvm_ioapic_state", "redirtbl"), ("kvm_pic_state", "elcr"),
]

CONSTANT_PREFIXES = ("KVM_EXIT_", "KVM_SYSTEM_EVENT_", "KVM_CAP_", "KVM_MEM_", "KVM_IOEVENTFD_FLAG_",
                     "KVM_IRQFD_FLAG_", "KVM_IRQ_ROUTING_", "KVM_IRQCHIP_", "KVM_PIT_SPEAKER",
                     "KVM_CPUID_FLAG_", "KVM_API_VERSION")


def _constants() -> dict[str, int]:
    return {k: v for k, v in vars(abi).items() if k.startswith(CONSTANT_PREFIXES) and isinstance(v, int)}


def _c_offset(struct: str, field: str) -> str:
    return f"__builtin_offsetof(struct {struct}, {field})"


@pytest.fixture(scope="module")
def kernel_values(tmp_path_factory: pytest.TempPathFactory) -> dict[str, int]:
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.skip("no C compiler to check the ABI against the kernel headers (apt install gcc)")
    lines = []
    for s in STRUCTS:
        lines.append(f'printf("size:{s} %zu\\n", sizeof(struct {s}));')
    for s, f in FIELDS:
        lines.append(f'printf("off:{s}.{f} %zu\\n", (size_t){_c_offset(s, f)});')
    for name in list(abi.ioctl_numbers()) + list(_constants()):
        lines.append(f'printf("val:{name} %llu\\n", (unsigned long long)({name}));')
    src = "#include <stdio.h>\n#include <stddef.h>\n#include <linux/kvm.h>\nint main(void){\n"
    src += "\n".join(lines) + "\nreturn 0;}\n"
    d = tmp_path_factory.mktemp("abi")
    (d / "abi.c").write_text(src)
    r = subprocess.run([cc, "-o", str(d / "abi"), str(d / "abi.c")], capture_output=True, text=True)
    if r.returncode != 0:
        if "linux/kvm.h" in r.stderr and "No such file" in r.stderr:
            pytest.skip("kernel headers not installed (apt install linux-libc-dev)")
        pytest.fail(f"the ABI check program does not compile:\n{r.stderr[-3000:]}")
    out = subprocess.run([str(d / "abi")], capture_output=True, text=True, check=True).stdout
    return {k: int(v) for k, v in (line.split() for line in out.splitlines())}


@pytest.mark.parametrize("struct", STRUCTS)
def test_struct_size(kernel_values: dict[str, int], struct: str) -> None:
    assert ffi.sizeof(f"struct {struct}") == kernel_values[f"size:{struct}"]


@pytest.mark.parametrize(("struct", "field"), FIELDS)
def test_field_offset(kernel_values: dict[str, int], struct: str, field: str) -> None:
    ctype = ffi.typeof(f"struct {struct}")
    off = 0
    for part in field.split("."):
        off += ffi.offsetof(ctype, part)
        ctype = dict(ctype.fields)[part].type
    assert off == kernel_values[f"off:{struct}.{field}"]


def test_ioctl_numbers(kernel_values: dict[str, int]) -> None:
    numbers = abi.ioctl_numbers()
    assert len(numbers) >= 35
    wrong = {k: (hex(v), hex(kernel_values[f"val:{k}"])) for k, v in numbers.items()
             if v != kernel_values[f"val:{k}"]}
    assert not wrong


def test_constants(kernel_values: dict[str, int]) -> None:
    consts = _constants()
    wrong = {k: (v, kernel_values[f"val:{k}"]) for k, v in consts.items() if v != kernel_values[f"val:{k}"]}
    assert not wrong


def test_ioctl_encoding_of_known_numbers() -> None:
    # independent of any header: the numbers kvmtool-era tools print (e.g. strace) for two requests
    assert abi.KVM_RUN == 0xAE80
    assert abi.KVM_SET_USER_MEMORY_REGION == 0x4020AE46
