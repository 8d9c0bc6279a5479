"""ACPI tables for a vdm guest: RSDP, XSDT, FADT (hardware-reduced), MADT, DSDT.

The platform (see :mod:`vdm_kvm.layout`):

* **Hardware-reduced ACPI** (FADT flag HW_REDUCED_ACPI, ACPI 6): no PM1/GPE register blocks and no
  SCI. Power off goes through the FADT ``SLEEP_CONTROL_REG`` (an I/O port vdm watches): Linux
  writes ``SLP_EN | (SLP_TYP << 2)`` with SLP_TYP from the DSDT's ``\\_S5`` package. Reset goes
  through ``RESET_REG`` (flag RESET_REG_SUP).
* **MADT**: one enabled Local APIC per vCPU (APIC id = vCPU index), one IOAPIC (id = vCPU count) at
  0xfec00000 with GSI base 0, identity interrupt source overrides for the ISA IRQs in use, and a
  Local APIC NMI on LINT1 for all processors.
* **DSDT**: ``\\_S5``, one ``LNRO0005`` (virtio-mmio) device per window with Memory32Fixed + an
  Extended Interrupt (level, active high), optionally COM1 (``PNP0501``) with its ports and IRQ, and
  a PCI root bridge ``PCI0`` (``PNP0A03``: bus 0, the conf1 ports, the device MMIO window).

Every table's checksum makes its bytes sum to 0 mod 256; the RSDP has two checksums (first 20 bytes,
whole 36 bytes). :func:`parse_tables` reads a set back (for tests, and as documentation of the
layout).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

from .. import layout
from . import aml

__all__ = [
    "AcpiConfig", "MmioDevice", "build_tables", "checksum", "parse_tables", "table_header",
]

OEM_ID = b"VDM   "
OEM_TABLE_ID = b"VDMKVM  "
CREATOR_ID = b"VDM "
HEADER = struct.Struct("<4sIBB6s8sI4sI")  # 36 bytes

FADT_REVISION, FADT_MINOR = 6, 3
FADT_LENGTH = 276
FADT_FLAG_RESET_REG_SUP = 1 << 10
FADT_FLAG_HW_REDUCED_ACPI = 1 << 20
IAPC_VGA_NOT_PRESENT = 1 << 2
IAPC_CMOS_RTC_NOT_PRESENT = 1 << 5
GAS_SYSTEM_IO = 1

# Linux's ACPICA writes (SLP_TYP << 2) & 0x1c | SLP_EN (0x20) to the sleep control register
SLP_EN = 0x20
S5_SLP_TYP = 5


def checksum(data: bytes) -> int:
    """The byte that makes ``data`` (with its checksum field 0) sum to 0 mod 256."""
    return (-sum(data)) & 0xFF


def table_header(signature: bytes, length: int, revision: int) -> bytes:
    return HEADER.pack(signature, length, revision, 0, OEM_ID, OEM_TABLE_ID, 1, CREATOR_ID, 1)


def finish(signature: bytes, revision: int, body: bytes) -> bytes:
    """Header + body with the length and checksum filled in."""
    t = bytearray(table_header(signature, HEADER.size + len(body), revision) + body)
    t[9] = checksum(bytes(t))
    return bytes(t)


def gas(space: int, bit_width: int, address: int, access_size: int = 1) -> bytes:
    """A Generic Address Structure (12 bytes)."""
    return struct.pack("<BBBBQ", space, bit_width, 0, access_size, address)


@dataclass(frozen=True)
class MmioDevice:
    """A virtio-mmio window as described in the DSDT."""

    base: int
    size: int
    gsi: int


@dataclass
class AcpiConfig:
    nr_vcpus: int
    sleep_port: int  # sleep control (write) and status (read) register, one byte
    reset_port: int
    reset_value: int = 1
    ioapic_addr: int = 0xFEC00000
    lapic_addr: int = 0xFEE00000
    isa_irqs: tuple[int, ...] = (4,)  # identity overrides so Linux maps these ISA IRQs to IOAPIC pins
    virtio_mmio: list[MmioDevice] = field(default_factory=list)
    com1: bool = True
    #: the PCI host bridge's memory window (first, last); None: no PCI root bridge in the DSDT
    pci_window: tuple[int, int] | None = (layout.MMIO_BASE, layout.MMIO_END - 1)


def fadt(cfg: AcpiConfig, dsdt_addr: int) -> bytes:
    body = bytearray(FADT_LENGTH - HEADER.size)

    def put(off: int, fmt: str, *v: int) -> None:
        struct.pack_into("<" + fmt, body, off - HEADER.size, *v)

    def put_bytes(off: int, b: bytes) -> None:
        body[off - HEADER.size : off - HEADER.size + len(b)] = b

    put(40, "I", dsdt_addr if dsdt_addr < 1 << 32 else 0)
    put(45, "B", 0)  # preferred PM profile: unspecified
    put(109, "H", IAPC_VGA_NOT_PRESENT | IAPC_CMOS_RTC_NOT_PRESENT)
    put(112, "I", FADT_FLAG_HW_REDUCED_ACPI | FADT_FLAG_RESET_REG_SUP)
    put_bytes(116, gas(GAS_SYSTEM_IO, 8, cfg.reset_port))
    put(128, "B", cfg.reset_value)
    put(131, "B", FADT_MINOR)
    put(140, "Q", dsdt_addr)
    put_bytes(244, gas(GAS_SYSTEM_IO, 8, cfg.sleep_port))  # SLEEP_CONTROL_REG
    put_bytes(256, gas(GAS_SYSTEM_IO, 8, cfg.sleep_port))  # SLEEP_STATUS_REG
    put_bytes(268, b"VDMKVM\0\0")  # hypervisor vendor identity
    return finish(b"FACP", FADT_REVISION, bytes(body))


def madt(cfg: AcpiConfig) -> bytes:
    body = bytearray(struct.pack("<II", cfg.lapic_addr, 0))  # flags: no dual 8259 (PCAT_COMPAT clear)
    for i in range(cfg.nr_vcpus):
        body += struct.pack("<BBBBI", 0, 8, i, i, 1)  # Processor Local APIC: uid, APIC id, enabled
    body += struct.pack("<BBBBII", 1, 12, cfg.nr_vcpus, 0, cfg.ioapic_addr, 0)  # IOAPIC, GSI base 0
    for irq in cfg.isa_irqs:
        body += struct.pack("<BBBBIH", 2, 10, 0, irq, irq, 0)  # ISA irq -> same GSI, bus default flags
    body += struct.pack("<BBBHB", 4, 6, 0xFF, 0, 1)  # Local APIC NMI: all processors, LINT1
    return finish(b"APIC", 5, bytes(body))


def dsdt(cfg: AcpiConfig) -> bytes:
    sb: list[aml.Node] = []
    if cfg.com1:
        sb.append(aml.Device("COM1", [
            aml.Name("_HID", aml.EisaId("PNP0501")),
            aml.Name("_UID", 0),
            aml.Name("_CRS", aml.ResourceTemplate([aml.IoPort(0x3F8, 8), aml.IrqNoFlags([4])])),
        ]))
    if cfg.pci_window is not None:
        # PCI root bridge (bus 0 through conf1 ports 0xcf8-0xcff): with ACPI, Linux scans only
        # the root bridges the DSDT names. Devices use MSI-X, so no _PRT is given.
        sb.append(aml.Device("PCI0", [
            aml.Name("_HID", aml.EisaId("PNP0A03")),
            aml.Name("_UID", 0),
            aml.Name("_BBN", 0),
            aml.Name("_CRS", aml.ResourceTemplate([
                aml.AddressSpace(aml.AddressSpace.BUS, 0, 0xFF),
                aml.IoPort(0xCF8, 8),
                aml.AddressSpace(aml.AddressSpace.IO, 0, 0xCF7),
                aml.AddressSpace(aml.AddressSpace.IO, 0xD00, 0xFFFF),
                aml.AddressSpace(aml.AddressSpace.MEMORY, *cfg.pci_window, dword=True),
            ])),
        ]))
    for i, dev in enumerate(cfg.virtio_mmio):
        sb.append(aml.Device(f"VR{i:02X}", [
            aml.Name("_HID", "LNRO0005"),
            aml.Name("_UID", i),
            aml.Name("_CCA", 1),  # cache coherent DMA
            aml.Name("_CRS", aml.ResourceTemplate([
                aml.Memory32Fixed(dev.base, dev.size),
                aml.ExtendedInterrupt([dev.gsi], edge=False, active_low=False),
            ])),
        ]))
    body = aml.Name("_S5_", [S5_SLP_TYP, 0]).encode() + aml.Scope("\\_SB_", sb).encode()
    return finish(b"DSDT", 2, body)


def rsdp(xsdt_addr: int) -> bytes:
    r = bytearray(struct.pack("<8sB6sBIIQB3s", b"RSD PTR ", 0, OEM_ID, 2, 0, 36, xsdt_addr, 0, b"\0\0\0"))
    r[8] = checksum(bytes(r[:20]))
    r[32] = checksum(bytes(r))
    return bytes(r)


def build_tables(cfg: AcpiConfig, base: int) -> tuple[bytes, int]:
    """All tables laid out from guest address ``base``; returns ``(blob, rsdp_address)``.

    Order: RSDP (16-byte aligned, at ``base``), XSDT, FADT, MADT, DSDT, each 16-byte aligned.
    """
    if base % 16:
        raise ValueError("ACPI tables need 16-byte alignment")

    def align(n: int) -> int:
        return (n + 15) & ~15

    rsdp_addr = base
    xsdt_addr = align(rsdp_addr + 36)
    xsdt_len = HEADER.size + 8 * 2
    fadt_addr = align(xsdt_addr + xsdt_len)
    madt_blob = madt(cfg)
    madt_addr = align(fadt_addr + FADT_LENGTH)
    dsdt_addr = align(madt_addr + len(madt_blob))
    dsdt_blob = dsdt(cfg)
    fadt_blob = fadt(cfg, dsdt_addr)
    xsdt_blob = finish(b"XSDT", 1, struct.pack("<QQ", fadt_addr, madt_addr))
    assert len(xsdt_blob) == xsdt_len
    out = bytearray(dsdt_addr + len(dsdt_blob) - base)
    for addr, blob in ((rsdp_addr, rsdp(xsdt_addr)), (xsdt_addr, xsdt_blob), (fadt_addr, fadt_blob),
                       (madt_addr, madt_blob), (dsdt_addr, dsdt_blob)):
        out[addr - base : addr - base + len(blob)] = blob
    return bytes(out), rsdp_addr


# ---- reading tables back -------------------------------------------------------------------------


class AcpiParseError(ValueError):
    pass


def _table_at(mem: bytes, base: int, addr: int) -> tuple[bytes, bytes]:
    off = addr - base
    if off < 0 or off + HEADER.size > len(mem):
        raise AcpiParseError(f"table at 0x{addr:x} outside the blob")
    sig, length = struct.unpack_from("<4sI", mem, off)
    if length < HEADER.size or off + length > len(mem):
        raise AcpiParseError(f"{sig!r}: bad length {length}")
    t = mem[off : off + length]
    if sum(t) & 0xFF:
        raise AcpiParseError(f"{sig!r}: bad checksum")
    return sig, t


def parse_tables(mem: bytes, base: int, rsdp_addr: int) -> dict[str, object]:
    """Read tables from ``mem`` (guest bytes starting at guest address ``base``), checking checksums.

    Returns ``{"xsdt": [addrs], "FACP": bytes, "APIC": bytes, "DSDT": bytes, "madt": {...},
    "fadt": {...}}``.
    """
    off = rsdp_addr - base
    r = mem[off : off + 36]
    if r[:8] != b"RSD PTR " or sum(r[:20]) & 0xFF or sum(r) & 0xFF:
        raise AcpiParseError("bad RSDP signature or checksum")
    xsdt_addr = struct.unpack_from("<Q", r, 24)[0]
    sig, xsdt = _table_at(mem, base, xsdt_addr)
    if sig != b"XSDT":
        raise AcpiParseError("RSDP does not point at an XSDT")
    addrs = list(struct.unpack_from(f"<{(len(xsdt) - HEADER.size) // 8}Q", xsdt, HEADER.size))
    out: dict[str, object] = {"xsdt": addrs}
    for a in addrs:
        sig, t = _table_at(mem, base, a)
        out[sig.decode()] = t
    fadt_t = out.get("FACP")
    if isinstance(fadt_t, bytes):
        dsdt_addr = struct.unpack_from("<Q", fadt_t, 140)[0]
        sig, t = _table_at(mem, base, dsdt_addr)
        if sig != b"DSDT":
            raise AcpiParseError("FADT.X_DSDT does not point at a DSDT")
        out["DSDT"] = t
        out["fadt"] = {
            "flags": struct.unpack_from("<I", fadt_t, 112)[0],
            "reset_reg": struct.unpack_from("<BBBBQ", fadt_t, 116),
            "reset_value": fadt_t[128],
            "sleep_control": struct.unpack_from("<BBBBQ", fadt_t, 244),
            "sleep_status": struct.unpack_from("<BBBBQ", fadt_t, 256),
            "x_dsdt": dsdt_addr,
        }
    madt_t = out.get("APIC")
    if isinstance(madt_t, bytes):
        lapics, ioapics, isos, nmis = [], [], [], []
        p = HEADER.size + 8
        while p < len(madt_t):
            typ, length = madt_t[p], madt_t[p + 1]
            if length < 2 or p + length > len(madt_t):
                raise AcpiParseError("bad MADT entry length")
            if typ == 0:
                lapics.append(struct.unpack_from("<BBI", madt_t, p + 2))
            elif typ == 1:
                ioapics.append(struct.unpack_from("<BxII", madt_t, p + 2))
            elif typ == 2:
                isos.append(struct.unpack_from("<BBIH", madt_t, p + 2))
            elif typ == 4:
                nmis.append(struct.unpack_from("<BHB", madt_t, p + 2))
            p += length
        out["madt"] = {"lapic_addr": struct.unpack_from("<I", madt_t, HEADER.size)[0], "lapics": lapics,
                       "ioapics": ioapics, "isos": isos, "nmis": nmis}
    return out
