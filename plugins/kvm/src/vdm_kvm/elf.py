"""Loading an uncompressed x86-64 Linux kernel (``vmlinux``, an ELF executable).

Booting ``vmlinux`` skips the bzImage decompressor, which is slow where guest code runs slowly
(nested or emulated: about 10 s of the KVM lab's boot). As kvmtool and Firecracker do for ELF
kernels, every ``PT_LOAD`` segment goes to its physical address (``p_paddr``; Linux links it at
``LOAD_PHYSICAL_ADDR``, 16 MiB on Debian), the zero-filled tail (``p_memsz > p_filesz``: .bss,
.brk) is cleared, and the boot CPU enters at ``e_entry`` -- the physical address of
``startup_64`` -- in long mode with ``rsi`` = zero page, exactly as for the bzImage 64-bit entry.
The zero page then carries a setup header vdm writes itself (:func:`vdm_kvm.bootparams.synthetic_header`).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

__all__ = ["ElfError", "ElfKernel", "LoadSegment", "is_elf", "parse_vmlinux"]

ELF_MAGIC = b"\x7fELF"
ELFCLASS64, ELFDATA2LSB, ET_EXEC, EM_X86_64, PT_LOAD = 2, 1, 2, 62, 1
_EHDR = struct.Struct("<16sHHIQQQIHHHHHH")
_PHDR = struct.Struct("<IIQQQQQQ")


class ElfError(ValueError):
    """Not an x86-64 ELF kernel we can load."""


@dataclass(frozen=True)
class LoadSegment:
    paddr: int
    offset: int
    filesz: int
    memsz: int


@dataclass(frozen=True)
class ElfKernel:
    entry: int
    segments: tuple[LoadSegment, ...]

    @property
    def start(self) -> int:
        return min(s.paddr for s in self.segments)

    @property
    def end(self) -> int:
        return max(s.paddr + s.memsz for s in self.segments)


def is_elf(image: bytes) -> bool:
    return image[:4] == ELF_MAGIC


def parse_vmlinux(image: bytes, file_size: int | None = None) -> ElfKernel:
    """Check an ELF64 x86-64 executable and list its loadable segments (all bounds checked).

    ``image`` may be just the start of the file (it must hold the program header table);
    ``file_size`` is then the whole file's size.
    """
    size = len(image) if file_size is None else file_size
    if len(image) < _EHDR.size or not is_elf(image):
        raise ElfError("not an ELF file")
    ident, e_type, machine, _ver, entry, phoff, _shoff, _flags, _ehsize, phentsize, phnum, *_ = (
        _EHDR.unpack_from(image, 0)
    )
    if ident[4] != ELFCLASS64 or ident[5] != ELFDATA2LSB:
        raise ElfError("not a 64-bit little-endian ELF file")
    if e_type != ET_EXEC or machine != EM_X86_64:
        raise ElfError("not an x86-64 executable (a vmlinux)")
    if phentsize != _PHDR.size or phnum == 0 or phoff + phnum * phentsize > len(image):
        raise ElfError("bad program header table")
    segs = []
    for i in range(phnum):
        p_type, _pflags, offset, _vaddr, paddr, filesz, memsz, _align = _PHDR.unpack_from(
            image, phoff + i * phentsize
        )
        if p_type != PT_LOAD or memsz == 0:
            continue
        if filesz > memsz or offset + filesz > size:
            raise ElfError(f"segment {i} reaches past the end of the file")
        segs.append(LoadSegment(paddr, offset, filesz, memsz))
    if not segs:
        raise ElfError("no loadable segments")
    segs.sort(key=lambda s: s.paddr)
    for a, b in zip(segs, segs[1:]):
        if a.paddr + a.memsz > b.paddr:
            raise ElfError("loadable segments overlap")
    k = ElfKernel(entry, tuple(segs))
    if not k.start <= entry < k.end:
        raise ElfError(f"entry point 0x{entry:x} is outside the loaded image (not a physical address?)")
    return k
