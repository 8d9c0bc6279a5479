"""Identity-mapped page tables and a flat GDT: what the 64-bit Linux boot protocol asks for.

boot.rst (64-bit boot protocol): the CPU must be in long mode with paging on; the ranges holding
the kernel (from its load address for ``init_size``), the zero page and the command line must be
identity mapped; a GDT must hold flat 4 GiB descriptors for ``__BOOT_CS`` (0x10, execute/read) and
``__BOOT_DS`` (0x18, read/write), with CS = ``__BOOT_CS`` and DS/ES/SS = ``__BOOT_DS``; interrupts
off; ``rsi`` = the zero page's address.

We identity-map the first ``map_gib`` GiB (default 4) with 2 MiB pages: one PML4 page, one PDPT
page and one page directory per GiB.
"""

from __future__ import annotations

import struct

__all__ = ["BOOT_CS", "BOOT_DS", "BOOT_TSS", "gdt", "gdt_entry", "identity_map", "page_tables_size"]

PAGE = 4096
_PRESENT, _RW, _PS = 1 << 0, 1 << 1, 1 << 7
BOOT_CS = 0x10
BOOT_DS = 0x18
BOOT_TSS = 0x20


def page_tables_size(map_gib: int = 4) -> int:
    """Bytes :func:`identity_map` needs: PML4 + PDPT + one page directory per GiB."""
    if not 1 <= map_gib <= 512:
        raise ValueError("map between 1 and 512 GiB")
    return (2 + map_gib) * PAGE


def identity_map(base: int, map_gib: int = 4) -> bytes:
    """Page tables placed at guest address ``base`` (page aligned) mapping VA == PA for ``map_gib`` GiB.

    Returns the bytes to copy to ``base``; CR3 = ``base``.
    """
    if base % PAGE:
        raise ValueError("page tables must be page aligned")
    size = page_tables_size(map_gib)
    out = bytearray(size)
    pdpt = base + PAGE
    struct.pack_into("<Q", out, 0, pdpt | _PRESENT | _RW)
    for g in range(map_gib):
        pd = base + (2 + g) * PAGE
        struct.pack_into("<Q", out, PAGE + 8 * g, pd | _PRESENT | _RW)
        for i in range(512):
            phys = (g << 30) | (i << 21)
            struct.pack_into("<Q", out, (2 + g) * PAGE + 8 * i, phys | _PRESENT | _RW | _PS)
    return bytes(out)


def gdt_entry(base: int, limit: int, access: int, flags: int) -> int:
    """One 8-byte segment descriptor. ``access``: P/DPL/S/type byte; ``flags``: G/DB/L/AVL nibble."""
    return (
        (limit & 0xFFFF)
        | ((base & 0xFFFFFF) << 16)
        | ((access & 0xFF) << 40)
        | (((limit >> 16) & 0xF) << 48)
        | ((flags & 0xF) << 52)
        | (((base >> 24) & 0xFF) << 56)
    )


#: (access byte, flags nibble) of the boot descriptors
CODE64 = (0x9B, 0xA)  # present, code, execute/read, accessed; G=1, L=1
DATA = (0x93, 0xC)  # present, data, read/write, accessed; G=1, DB=1
TSS = (0x8B, 0x0)  # present, busy 32/64-bit TSS


def gdt() -> bytes:
    """The boot GDT: null, null, __BOOT_CS (64-bit code), __BOOT_DS (data), a TSS descriptor."""
    entries = [0, 0, gdt_entry(0, 0xFFFFF, *CODE64), gdt_entry(0, 0xFFFFF, *DATA), gdt_entry(0, 0x67, *TSS)]
    return struct.pack(f"<{len(entries)}Q", *entries)
