"""Where things are in a vdm KVM guest's physical address space (x86-64).

| guest-physical | what |
| --- | --- |
| 0x0000_0500 | boot GDT |
| 0x0000_7000 | zero page (``struct boot_params``) |
| 0x0000_9000 | identity page tables (PML4, PDPT, 4 page directories: first 4 GiB, 2 MiB pages) |
| 0x0002_0000 | kernel command line (up to 64 KiB) |
| 0x0009_fc00 - 0x0010_0000 | reserved (EBDA, BIOS area): ACPI tables at 0xe0000, reset stub at 0xffff0 |
| 0x0010_0000 | protected-mode kernel (64-bit entry at +0x200) |
| RAM end (below 4 GiB) | initrd, as high as allowed |
| 0xc000_0000 - 0xd000_0000 | reserved gap (RAM stops here; the rest is above 4 GiB) |
| 0xd000_0000 - 0xfec0_0000 | MMIO for devices (virtio-mmio windows, 4 KiB apart) |
| 0xfec0_0000 / 0xfee0_0000 | in-kernel IOAPIC / LAPICs |
| 0xfffb_c000 - 0xfffc_0000 | KVM identity map page and TSS (Intel VMX real mode) |
| 0x1_0000_0000 - | RAM above 3 GiB of guest memory |

Ports: COM1 0x3f8 (IRQ 4), the ACPI sleep control/status register ``SLEEP_PORT``, the ACPI reset
register ``RESET_PORT``, the i8042 command port 0x64 (reset only); the in-kernel PIT at
0x40-0x43 and PIC at 0x20/0xa0.
"""

from __future__ import annotations

BOOT_GDT = 0x500
ZERO_PAGE = 0x7000
BOOT_STACK = 0x8FF0
PAGE_TABLES = 0x9000
CMDLINE = 0x20000
CMDLINE_MAX = 0x10000
EBDA_START = 0x9FC00
ACPI_TABLES = 0xE0000
ACPI_TABLES_END = 0xFFFF0
RESET_VECTOR = 0xFFFF0  # F000:FFF0, where a CPU (or Linux's BIOS reboot) starts: a reset stub
KERNEL = 0x100000
KERNEL_64_ENTRY_OFFSET = 0x200
RAM_32BIT_END = 0xC0000000
HIGH_RAM = 0x100000000
MMIO_BASE = 0xD0000000
MMIO_END = 0xFEC00000
MMIO_ALIGN = 0x1000
IOAPIC = 0xFEC00000
LAPIC = 0xFEE00000
IDENTITY_MAP_PAGE = 0xFFFBC000
TSS = 0xFFFBD000

COM1_PORT = 0x3F8
LEGACY_UART_PORTS = (0x3F8, 0x2F8, 0x3E8, 0x2E8)  # COM1..COM4
COM1_IRQ = 4
SLEEP_PORT = 0x600
RESET_PORT = 0x601
RESET_VALUE = 0x01
I8042_COMMAND_PORT = 0x64
#: GSIs handed out to devices: above the ISA IRQs in use, up to the IOAPIC's 24 pins
FIRST_DEVICE_GSI = 5
LAST_GSI = 23


def ram_ranges(mem_size: int) -> list[tuple[int, int]]:
    """Guest RAM as ``(addr, size)`` ranges: below the 32-bit gap, then above 4 GiB."""
    low = min(mem_size, RAM_32BIT_END)
    out = [(0, low)]
    if mem_size > low:
        out.append((HIGH_RAM, mem_size - low))
    return out
