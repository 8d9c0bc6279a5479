"""The Linux x86 boot protocol: a bzImage's setup header and the zero page (``struct boot_params``).

Facts from Documentation/arch/x86/boot.rst and zero-page.rst:

* The setup header starts at offset 0x1f1 of the bzImage and of the zero page; it ends at
  ``0x202 + byte[0x201]``. ``boot_flag`` (0x1fe) is 0xaa55 and ``header`` (0x202) is "HdrS".
* ``setup_sects`` (0 means 4) 512-byte sectors of real-mode setup follow the boot sector; the
  protected-mode kernel starts at ``(setup_sects + 1) * 512`` in the file.
* A 64-bit boot loader needs protocol 2.12+ (``xloadflags``): ``XLF_KERNEL_64`` says the kernel has
  the 64-bit entry point at load address + 0x200. The kernel is relocatable (2.05+), we load it at
  1 MiB; ``init_size`` (2.10+) is how much memory it needs from there while it decompresses.
* The loader zeroes the zero page, copies the header into it, sets ``type_of_loader`` (0xff:
  undefined), ``loadflags`` (CAN_USE_HEAP, and LOADED_HIGH which the kernel has), ``cmd_line_ptr``,
  ``ramdisk_image``/``ramdisk_size`` (below ``initrd_addr_max``), the e820 map, and (2.14+)
  ``acpi_rsdp_addr``.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from . import e820

__all__ = ["BootProtocolError", "SetupHeader", "ZeroPage", "parse_bzimage"]

HEADER_OFFSET = 0x1F1
BOOT_FLAG = 0xAA55
HDRS = 0x53726448  # "HdrS"
MIN_VERSION = 0x020C  # 2.12: xloadflags, so we know the 64-bit entry exists

LOADED_HIGH = 0x01
KEEP_SEGMENTS = 0x40
CAN_USE_HEAP = 0x80
XLF_KERNEL_64 = 1 << 0
XLF_CAN_BE_LOADED_ABOVE_4G = 1 << 1

# zero page offsets (zero-page.rst)
ZP_ACPI_RSDP_ADDR = 0x070
ZP_EXT_RAMDISK_IMAGE = 0x0C0
ZP_EXT_RAMDISK_SIZE = 0x0C4
ZP_EXT_CMD_LINE_PTR = 0x0C8
ZP_E820_ENTRIES = 0x1E8
ZP_SENTINEL = 0x1EF
ZP_E820_TABLE = 0x2D0
ZERO_PAGE_SIZE = 4096

# setup header fields: name -> (offset in the zero page / bzImage, struct format)
FIELDS = {
    "setup_sects": (0x1F1, "B"),
    "syssize": (0x1F4, "I"),
    "vid_mode": (0x1FA, "H"),
    "boot_flag": (0x1FE, "H"),
    "jump": (0x200, "H"),
    "header": (0x202, "I"),
    "version": (0x206, "H"),
    "type_of_loader": (0x210, "B"),
    "loadflags": (0x211, "B"),
    "code32_start": (0x214, "I"),
    "ramdisk_image": (0x218, "I"),
    "ramdisk_size": (0x21C, "I"),
    "heap_end_ptr": (0x224, "H"),
    "cmd_line_ptr": (0x228, "I"),
    "initrd_addr_max": (0x22C, "I"),
    "kernel_alignment": (0x230, "I"),
    "relocatable_kernel": (0x234, "B"),
    "xloadflags": (0x236, "H"),
    "cmdline_size": (0x238, "I"),
    "pref_address": (0x258, "Q"),
    "init_size": (0x260, "I"),
}


class BootProtocolError(ValueError):
    """The file is not a bzImage this loader can boot."""


@dataclass
class SetupHeader:
    """The fields of a bzImage's setup header that a 64-bit loader uses."""

    raw: bytes  # the whole header, 0x1f1 .. end, as in the file
    setup_sects: int
    version: int
    loadflags: int
    xloadflags: int
    relocatable_kernel: int
    kernel_alignment: int
    initrd_addr_max: int
    cmdline_size: int
    pref_address: int
    init_size: int
    vid_mode: int

    @property
    def setup_size(self) -> int:
        """Bytes of boot sector + real-mode setup before the protected-mode kernel."""
        return (self.setup_sects + 1) * 512

    @property
    def version_str(self) -> str:
        return f"{self.version >> 8}.{self.version & 0xFF:02d}"


def _get(data: bytes, name: str) -> int:
    off, fmt = FIELDS[name]
    return struct.unpack_from("<" + fmt, data, off)[0]


def parse_bzimage(image: bytes) -> SetupHeader:
    """Check and parse a bzImage's setup header; raise :class:`BootProtocolError` if we cannot boot it."""
    if len(image) < 0x1000:
        raise BootProtocolError("file too small for a bzImage")
    if _get(image, "boot_flag") != BOOT_FLAG:
        raise BootProtocolError("no 0xaa55 boot flag at 0x1fe: not a bzImage")
    if _get(image, "header") != HDRS:
        raise BootProtocolError("no 'HdrS' at 0x202: boot protocol older than 2.00")
    version = _get(image, "version")
    if version < MIN_VERSION:
        raise BootProtocolError(
            f"boot protocol {version >> 8}.{version & 0xff:02d} < 2.12 (no 64-bit entry information)"
        )
    if not _get(image, "loadflags") & LOADED_HIGH:
        raise BootProtocolError("zImage (not loaded high) is not supported")
    xlf = _get(image, "xloadflags")
    if not xlf & XLF_KERNEL_64:
        raise BootProtocolError("kernel has no 64-bit entry point (XLF_KERNEL_64 clear)")
    end = 0x202 + image[0x201]
    setup_sects = _get(image, "setup_sects") or 4
    if (setup_sects + 1) * 512 >= len(image):
        raise BootProtocolError("setup_sects points past the end of the file")
    return SetupHeader(
        raw=bytes(image[HEADER_OFFSET:end]),
        setup_sects=setup_sects,
        version=version,
        loadflags=_get(image, "loadflags"),
        xloadflags=xlf,
        relocatable_kernel=_get(image, "relocatable_kernel"),
        kernel_alignment=_get(image, "kernel_alignment"),
        initrd_addr_max=_get(image, "initrd_addr_max"),
        cmdline_size=_get(image, "cmdline_size"),
        pref_address=_get(image, "pref_address"),
        init_size=_get(image, "init_size"),
        vid_mode=_get(image, "vid_mode"),
    )


COMMAND_LINE_SIZE = 2048  # x86's COMMAND_LINE_SIZE, for kernels that do not say (vmlinux)


def synthetic_header() -> SetupHeader:
    """A setup header for a kernel loaded without one (an ELF ``vmlinux``): protocol 2.15, loaded
    high, 64-bit entry, 2 MiB alignment, the x86 command line size, initrds below 2 GiB."""
    raw = bytearray(0x26C - HEADER_OFFSET)

    def put(name: str, value: int) -> None:
        off, fmt = FIELDS[name]
        struct.pack_into("<" + fmt, raw, off - HEADER_OFFSET, value)

    put("boot_flag", BOOT_FLAG)
    put("jump", 0x6AEB)  # what a bzImage has there: header end = 0x202 + 0x6a
    put("header", HDRS)
    put("version", 0x020F)
    put("loadflags", LOADED_HIGH)
    put("kernel_alignment", 0x200000)
    put("xloadflags", XLF_KERNEL_64)
    put("cmdline_size", COMMAND_LINE_SIZE - 1)
    put("initrd_addr_max", 0x7FFFFFFF)
    return SetupHeader(raw=bytes(raw), setup_sects=0, version=0x020F, loadflags=LOADED_HIGH,
                       xloadflags=XLF_KERNEL_64, relocatable_kernel=0, kernel_alignment=0x200000,
                       initrd_addr_max=0x7FFFFFFF, cmdline_size=COMMAND_LINE_SIZE - 1, pref_address=0,
                       init_size=0, vid_mode=0)


class ZeroPage:
    """A ``struct boot_params`` being filled in (4096 bytes)."""

    def __init__(self, header: SetupHeader) -> None:
        self.data = bytearray(ZERO_PAGE_SIZE)
        self.data[HEADER_OFFSET : HEADER_OFFSET + len(header.raw)] = header.raw
        self.header = header
        self.set("type_of_loader", 0xFF)
        self.set("loadflags", (header.loadflags | CAN_USE_HEAP) & ~KEEP_SEGMENTS)
        self.set("vid_mode", 0xFFFF)  # "normal"

    def set(self, name: str, value: int) -> None:
        off, fmt = FIELDS[name]
        struct.pack_into("<" + fmt, self.data, off, value)

    def get(self, name: str) -> int:
        return _get(self.data, name)

    def set_cmdline(self, addr: int, cmdline: bytes) -> None:
        """Point at a NUL-terminated command line at ``addr`` (its bytes are placed by the caller)."""
        if len(cmdline) + 1 > self.header.cmdline_size + 1 and self.header.cmdline_size:
            raise BootProtocolError(f"command line longer than the kernel's {self.header.cmdline_size} bytes")
        self.set("cmd_line_ptr", addr & 0xFFFFFFFF)
        struct.pack_into("<I", self.data, ZP_EXT_CMD_LINE_PTR, addr >> 32)

    def set_ramdisk(self, addr: int, size: int) -> None:
        self.set("ramdisk_image", addr & 0xFFFFFFFF)
        self.set("ramdisk_size", size & 0xFFFFFFFF)
        struct.pack_into("<II", self.data, ZP_EXT_RAMDISK_IMAGE, addr >> 32, size >> 32)

    def set_e820(self, entries: list[e820.E820Entry]) -> None:
        table = e820.pack(entries)
        self.data[ZP_E820_TABLE : ZP_E820_TABLE + len(table)] = table
        self.data[ZP_E820_ENTRIES] = len(entries)

    def set_acpi_rsdp(self, addr: int) -> None:
        struct.pack_into("<Q", self.data, ZP_ACPI_RSDP_ADDR, addr)

    def e820(self) -> list[e820.E820Entry]:
        n = self.data[ZP_E820_ENTRIES]
        return e820.unpack(bytes(self.data[ZP_E820_TABLE:]), n)

    def __bytes__(self) -> bytes:
        return bytes(self.data)
