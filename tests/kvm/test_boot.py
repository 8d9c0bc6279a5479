"""The Linux boot protocol pieces: setup header, zero page, e820, page tables, GDT, CPUID, ACPI, AML."""

from __future__ import annotations

import shutil
import struct
import subprocess
from pathlib import Path

import pytest
from vdm_kvm import bootparams, e820, layout, pagetables
from vdm_kvm.acpi import aml
from vdm_kvm.acpi import tables as acpi
from vdm_kvm.cpuid import vcpu_cpuid
from vdm_kvm.kvm import CpuidEntry

from tests.kvm.realmode import kvm_or_skip


def fake_bzimage(version: int = 0x020F, xloadflags: int = 3, setup_sects: int = 4,
                 payload: bytes = b"K" * 8192, init_size: int = 0x800000) -> bytes:
    img = bytearray((setup_sects + 1) * 512)
    img[0x1F1] = setup_sects
    struct.pack_into("<H", img, 0x1FE, 0xAA55)
    img[0x200] = 0xEB
    img[0x201] = 0x6A  # header ends at 0x26c
    struct.pack_into("<I", img, 0x202, 0x53726448)
    struct.pack_into("<H", img, 0x206, version)
    img[0x211] = bootparams.LOADED_HIGH
    struct.pack_into("<I", img, 0x22C, 0x7FFFFFFF)
    img[0x234] = 1
    struct.pack_into("<H", img, 0x236, xloadflags)
    struct.pack_into("<I", img, 0x238, 2047)
    struct.pack_into("<I", img, 0x260, init_size)
    return bytes(img) + payload


def kit_kernel() -> Path | None:
    for d in (Path.home() / ".cache/vdm/guestkit", Path("/tmp/lab/kit")):
        if (d / "vmlinuz").exists():
            return d / "vmlinuz"
    return None


# ---- setup header --------------------------------------------------------------------------------


def test_parse_fake_bzimage() -> None:
    h = bootparams.parse_bzimage(fake_bzimage())
    assert h.version_str == "2.15"
    assert h.setup_size == 5 * 512
    assert h.xloadflags & bootparams.XLF_KERNEL_64
    assert h.initrd_addr_max == 0x7FFFFFFF and h.cmdline_size == 2047 and h.init_size == 0x800000
    assert len(h.raw) == 0x26C - 0x1F1


@pytest.mark.parametrize(
    ("image", "message"),
    [
        (b"\0" * 100, "too small"),
        (fake_bzimage()[:0x1FE] + b"\0\0" + fake_bzimage()[0x200:], "boot flag"),
        (fake_bzimage(version=0x020A), "2.12"),
        (fake_bzimage(xloadflags=0), "64-bit"),
        (fake_bzimage(setup_sects=60, payload=b""), "past the end"),
    ],
)
def test_parse_rejects(image: bytes, message: str) -> None:
    with pytest.raises(bootparams.BootProtocolError, match=message):
        bootparams.parse_bzimage(image)


def test_parse_real_kernel() -> None:
    path = kit_kernel()
    if path is None:
        pytest.skip("guest kit not built (python3 -m vdm_lab kit)")
    h = bootparams.parse_bzimage(path.read_bytes())
    assert h.version >= 0x020F  # Debian 6.1: protocol 2.15
    assert h.xloadflags & bootparams.XLF_KERNEL_64
    assert h.relocatable_kernel
    assert h.init_size > path.stat().st_size  # it decompresses in place


def test_zero_page_fields() -> None:
    h = bootparams.parse_bzimage(fake_bzimage())
    zp = bootparams.ZeroPage(h)
    zp.set_cmdline(0x20000, b"console=ttyS0")
    zp.set_ramdisk(0x7F00000, 0x123456)
    zp.set_acpi_rsdp(0xE0000)
    m = e820.build([(0, 0x9FC00), (0x100000, 0x7F00000)], [(0x9FC00, 0x60400)])
    zp.set_e820(m)
    data = bytes(zp)
    assert len(data) == 4096
    assert struct.unpack_from("<H", data, 0x1FE)[0] == 0xAA55
    assert struct.unpack_from("<I", data, 0x202)[0] == 0x53726448
    assert data[0x210] == 0xFF  # type_of_loader
    assert data[0x211] & bootparams.CAN_USE_HEAP and data[0x211] & bootparams.LOADED_HIGH
    assert data[0x1EF] == 0  # sentinel
    assert struct.unpack_from("<I", data, 0x228)[0] == 0x20000
    assert struct.unpack_from("<II", data, 0x218) == (0x7F00000, 0x123456)
    assert struct.unpack_from("<Q", data, 0x70)[0] == 0xE0000
    assert data[0x1E8] == 3
    assert zp.e820() == m
    assert e820.unpack(data[0x2D0:], 3)[1] == e820.E820Entry(0x9FC00, 0x60400, e820.E820_RESERVED)


def test_e820_rejects_overlap() -> None:
    with pytest.raises(ValueError, match="overlap"):
        e820.build([(0, 0x100000)], [(0x9FC00, 0x400)])


# ---- page tables and GDT -------------------------------------------------------------------------


def walk(tables: bytes, base: int, va: int) -> int | None:
    """Translate ``va`` through 4-level tables stored at ``base`` (as the CPU does)."""

    def entry(table: int, index: int) -> int:
        return struct.unpack_from("<Q", tables, table - base + 8 * index)[0]

    pml4e = entry(base, (va >> 39) & 511)
    if not pml4e & 1:
        return None
    pdpte = entry(pml4e & 0x000FFFFFFFFFF000, (va >> 30) & 511)
    if not pdpte & 1:
        return None
    pde = entry(pdpte & 0x000FFFFFFFFFF000, (va >> 21) & 511)
    if not pde & 1:
        return None
    assert pde & 0x80, "expected 2 MiB pages"
    return (pde & 0x000FFFFFFFE00000) | (va & 0x1FFFFF)


@pytest.mark.parametrize("va", [0, 0x7000, 0x100200, 0x3FFFFFFF, 0x40000000, 0xBFFFF123, 0xFFFFFFFF])
def test_identity_map(va: int) -> None:
    t = pagetables.identity_map(layout.PAGE_TABLES, 4)
    assert len(t) == pagetables.page_tables_size(4) == 6 * 4096
    assert walk(t, layout.PAGE_TABLES, va) == va


def test_identity_map_ends_at_4gib() -> None:
    t = pagetables.identity_map(layout.PAGE_TABLES, 4)
    assert walk(t, layout.PAGE_TABLES, 0x100000000) is None


def test_gdt_boot_descriptors() -> None:
    g = pagetables.gdt()
    cs = struct.unpack_from("<Q", g, pagetables.BOOT_CS)[0]
    ds = struct.unpack_from("<Q", g, pagetables.BOOT_DS)[0]

    def field(d: int, lo: int, bits: int) -> int:
        return (d >> lo) & ((1 << bits) - 1)

    for d in (cs, ds):
        assert field(d, 47, 1) == 1  # present
        assert field(d, 0, 16) | field(d, 48, 4) << 16 == 0xFFFFF and field(d, 55, 1) == 1  # 4 GiB
        assert field(d, 16, 24) | field(d, 56, 8) << 24 == 0  # base 0
    assert field(cs, 43, 1) == 1 and field(cs, 41, 1) == 1  # code, readable
    assert field(cs, 53, 1) == 1 and field(cs, 54, 1) == 0  # L=1, D=0: 64-bit code
    assert field(ds, 43, 1) == 0 and field(ds, 41, 1) == 1  # data, writable


# ---- CPUID ----------------------------------------------------------------------------------------


def test_cpuid_apic_ids() -> None:
    sup = [CpuidEntry(1, 0, 0, 0x806F8, 0x00FF0800, 0, 0), CpuidEntry(0xB, 0, 1, 0, 0, 0, 0),
           CpuidEntry(0xB, 1, 1, 0, 0, 0, 0), CpuidEntry(0x80000000, 0, 0, 0x80000008, 0, 0, 0)]
    for apic in range(3):
        out = {(e.function, e.index): e for e in vcpu_cpuid(sup, apic, 3)}
        assert out[(1, 0)].ebx >> 24 == apic
        assert (out[(1, 0)].ebx >> 16) & 0xFF == 3
        assert out[(1, 0)].ebx & 0xFFFF == 0x0800  # CLFLUSH size etc. kept
        assert out[(1, 0)].ecx & (1 << 31)  # hypervisor present
        assert out[(0xB, 0)].edx == apic and out[(0xB, 1)].edx == apic
        assert out[(0xB, 1)].ebx == 3
        assert out[(0x80000000, 0)] == sup[3]


# ---- AML -----------------------------------------------------------------------------------------


def decode_pkg_length(data: bytes) -> tuple[int, int]:
    """(PkgLength value, bytes used) per ACPI 20.2.4."""
    lead = data[0]
    n = lead >> 6
    if n == 0:
        return lead & 0x3F, 1
    value = lead & 0x0F
    for i in range(n):
        value |= data[1 + i] << (4 + 8 * i)
    return value, 1 + n


@pytest.mark.parametrize("body", [0, 1, 0x3E, 0x3F, 0x40, 0xFFC, 0xFFD, 0xFFFFD, 0xFFFFE, 0x0FFFFFFB])
def test_pkg_length_round_trip(body: int) -> None:
    enc = aml.pkg_length(body)
    value, used = decode_pkg_length(enc)
    assert used == len(enc)
    assert value == body + len(enc)  # PkgLength counts itself


def test_pkg_length_sizes() -> None:
    assert aml.pkg_length(0x3E) == bytes([0x3F])
    assert len(aml.pkg_length(0x3F)) == 2
    with pytest.raises(ValueError):
        aml.pkg_length(1 << 28)


def test_name_strings_and_integers() -> None:
    assert aml.name_string("_HID") == b"_HID"
    assert aml.name_string("\\_SB_") == b"\\_SB_"
    assert aml.name_string("\\_SB_.COM1") == b"\\\x2e_SB_COM1"
    assert aml.name_string("A.B.C") == b"\x2f\x03A___B___C___"
    assert aml.encode(0) == b"\x00" and aml.encode(1) == b"\x01"
    assert aml.encode(0x12) == b"\x0a\x12"
    assert aml.encode(0x1234) == b"\x0b\x34\x12"
    assert aml.encode(0xD0000000) == b"\x0c\x00\x00\x00\xd0"
    assert aml.encode(1 << 40) == b"\x0e" + (1 << 40).to_bytes(8, "little")
    assert aml.encode("LNRO0005") == b"\x0dLNRO0005\x00"
    assert int(aml.EisaId("PNP0501")) == 0x0105D041
    with pytest.raises(ValueError):
        aml.name_string("lower")
    with pytest.raises(ValueError):
        aml.encode("bad\0string")


def test_resource_template_bytes() -> None:
    rt = aml.ResourceTemplate([aml.Memory32Fixed(0xD0000000, 0x200), aml.ExtendedInterrupt([5])]).encode()
    assert rt[0] == 0x11  # BufferOp
    length, used = decode_pkg_length(rt[1:])
    assert length == len(rt) - 1
    body = rt[1 + used :]
    assert body[:2] == b"\x0a\x17"  # buffer size 23 = 12 + 9 + 2
    desc = body[2:]
    assert desc[:12] == struct.pack("<BHBII", 0x86, 9, 1, 0xD0000000, 0x200)
    assert desc[12:21] == struct.pack("<BHBBI", 0x89, 6, 0x01, 1, 5)  # consumer, level, active high
    assert desc[21:] == b"\x79\x00"


# ---- ACPI tables ----------------------------------------------------------------------------------


def make_cfg(cpus: int = 2) -> acpi.AcpiConfig:
    return acpi.AcpiConfig(nr_vcpus=cpus, sleep_port=layout.SLEEP_PORT, reset_port=layout.RESET_PORT,
                           virtio_mmio=[acpi.MmioDevice(0xD0000000, 0x200, 5),
                                        acpi.MmioDevice(0xD0001000, 0x200, 6)])


@pytest.mark.parametrize("cpus", [1, 2, 8])
def test_tables_parse_back(cpus: int) -> None:
    blob, rsdp = acpi.build_tables(make_cfg(cpus), layout.ACPI_TABLES)
    assert rsdp == layout.ACPI_TABLES
    t = acpi.parse_tables(blob, layout.ACPI_TABLES, rsdp)
    assert sorted(k for k in t if k.isupper()) == ["APIC", "DSDT", "FACP"]
    madt = t["madt"]
    assert madt["lapic_addr"] == layout.LAPIC
    assert madt["lapics"] == [(i, i, 1) for i in range(cpus)]
    assert madt["ioapics"] == [(cpus, layout.IOAPIC, 0)]
    assert (0, 4, 4, 0) in madt["isos"]
    assert madt["nmis"] == [(0xFF, 0, 1)]
    fadt = t["fadt"]
    assert fadt["flags"] & acpi.FADT_FLAG_HW_REDUCED_ACPI
    assert fadt["sleep_control"] == (1, 8, 0, 1, layout.SLEEP_PORT)
    assert fadt["reset_reg"][4] == layout.RESET_PORT
    assert len(t["FACP"]) == 276 and t["FACP"][8] == 6  # ACPI 6 FADT
    dsdt = t["DSDT"]
    assert dsdt.count(b"LNRO0005") == 2 and b"_S5_" in dsdt


def test_tables_checksums_detect_corruption() -> None:
    blob, rsdp = acpi.build_tables(make_cfg(), layout.ACPI_TABLES)
    for off in range(0, len(blob), 3):
        bad = bytearray(blob)
        bad[off] ^= 0x40
        try:
            acpi.parse_tables(bytes(bad), layout.ACPI_TABLES, rsdp)
        except acpi.AcpiParseError:
            continue
        # a flipped byte inside padding between tables is not part of any table
        assert not any(b for b in blob[off : off + 1]), f"corruption at {off:#x} not detected"


def test_dsdt_decompiles_with_iasl(tmp_path: Path) -> None:
    iasl = shutil.which("iasl")
    if iasl is None:
        pytest.skip("iasl not installed (apt install acpica-tools)")
    blob, rsdp = acpi.build_tables(make_cfg(), layout.ACPI_TABLES)
    t = acpi.parse_tables(blob, layout.ACPI_TABLES, rsdp)
    for sig in ("DSDT", "FACP", "APIC"):
        (tmp_path / f"{sig.lower()}.dat").write_bytes(t[sig])
    r = subprocess.run([iasl, "-d", "dsdt.dat", "facp.dat", "apic.dat"], cwd=tmp_path, capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    dsl = (tmp_path / "dsdt.dsl").read_text()
    assert 'Name (_HID, "LNRO0005")' in dsl
    assert "0xD0001000,         // Address Base" in dsl
    assert "Interrupt (ResourceConsumer, Level, ActiveHigh, Exclusive, ,, )" in dsl
    assert "0x00000006," in dsl
    assert 'EisaId ("PNP0501")' in dsl
    assert "Name (_S5, Package (0x02)" in dsl
    facp = (tmp_path / "facp.dsl").read_text()
    assert "Hardware Reduced (V5) : 1" in facp
    apic = (tmp_path / "apic.dsl").read_text()
    assert apic.count("[Processor Local APIC]") == 2
    for text in (dsl, facp, apic):
        assert "Invalid" not in text and "**** " not in text


# ---- a whole load (no run) -----------------------------------------------------------------------


def test_machine_load_linux_lays_out_memory() -> None:
    from vdm_kvm.machine import Machine, MachineConfig

    kernel = kit_kernel()
    if kernel is None:
        pytest.skip("guest kit not built (python3 -m vdm_lab kit)")
    kvm_or_skip()
    initrd = b"\x07" * 300000
    m = Machine(MachineConfig(mem_mib=128, cpus=2))
    try:
        base = m.allocate_mmio(0x200, "virtio-test")
        gsi = m.allocate_irq("virtio-test")
        assert (base, gsi) == (layout.MMIO_BASE, layout.FIRST_DEVICE_GSI)
        assert m.allocate_mmio(0x200, "other") == layout.MMIO_BASE + 0x1000
        m.add_virtio_mmio(base, 0x200, gsi, "virtio-test")
        m.load_linux(kernel, initrd, "console=ttyS0")
        mem = m.vm.guest_memory
        zp = mem.read(layout.ZERO_PAGE, 4096)
        assert struct.unpack_from("<I", zp, 0x202)[0] == 0x53726448
        cmd_ptr = struct.unpack_from("<I", zp, 0x228)[0]
        cmd = mem.read(cmd_ptr, 200).split(b"\0")[0].decode()
        assert cmd.endswith("console=ttyS0") and "pci=off" in cmd
        rd_addr, rd_size = struct.unpack_from("<II", zp, 0x218)
        assert rd_size == len(initrd) and mem.read(rd_addr, rd_size) == initrd
        assert rd_addr % 4096 == 0 and rd_addr + rd_size <= 128 << 20
        image = kernel.read_bytes()
        h = bootparams.parse_bzimage(image)
        assert mem.read(layout.KERNEL, 4096) == image[h.setup_size : h.setup_size + 4096]
        assert rd_addr >= layout.KERNEL + h.init_size
        entries = e820.unpack(zp[0x2D0:], zp[0x1E8])
        ram = [(e.addr, e.end) for e in entries if e.type == e820.E820_RAM]
        assert ram == [(0, layout.EBDA_START), (layout.KERNEL, 128 << 20)]
        rsdp = struct.unpack_from("<Q", zp, 0x70)[0]
        t = acpi.parse_tables(mem.read(layout.ACPI_TABLES, 0x1000), layout.ACPI_TABLES, rsdp)
        assert len(t["madt"]["lapics"]) == 2 and b"LNRO0005" in t["DSDT"]
        regs = m.vm.vcpus[0].get_regs()
        assert regs.rip == layout.KERNEL + 0x200 and regs.rsi == layout.ZERO_PAGE
        s = m.vm.vcpus[0].get_sregs()
        assert s.efer & 0x500 == 0x500 and s.cr0 & 0x80000001 == 0x80000001 and s.cr4 & 0x20
        assert s.cs.l == 1 and s.cs.selector == 0x10 and s.ds.selector == 0x18
        assert s.cr3 == layout.PAGE_TABLES
        assert mem.read(layout.PAGE_TABLES, 8) != b"\0" * 8
    finally:
        m.close()


# ---- ELF vmlinux ---------------------------------------------------------------------------------


def fake_elf(segments: list[tuple[int, bytes, int]], entry: int, machine: int = 62) -> bytes:
    """An ELF64 executable with PT_LOAD segments (paddr, data, memsz)."""
    phoff = 64
    data_off = phoff + 56 * len(segments)
    out = bytearray(struct.pack("<16sHHIQQQIHHHHHH", b"\x7fELF\x02\x01\x01" + bytes(9), 2, machine, 1, entry,
                                phoff, 0, 0, 64, 56, len(segments), 64, 0, 0))
    blobs = b""
    for paddr, data, memsz in segments:
        out += struct.pack("<IIQQQQQQ", 1, 5, data_off + len(blobs), 0xFFFFFFFF80000000 + paddr, paddr,
                           len(data), memsz, 0x200000)
        blobs += data
    return bytes(out) + blobs


def test_parse_vmlinux_segments() -> None:
    from vdm_kvm import elf

    img = fake_elf([(0x1000000, b"T" * 100, 100), (0x1200000, b"D" * 10, 0x5000)], 0x1000000)
    k = elf.parse_vmlinux(img)
    assert k.entry == 0x1000000 and (k.start, k.end) == (0x1000000, 0x1205000)
    assert [s.memsz for s in k.segments] == [100, 0x5000]


@pytest.mark.parametrize(
    ("image", "message"),
    [
        (b"\x7fELF" + bytes(10), "not an ELF"),
        (fake_elf([(0x1000000, b"x", 1)], 0x1000000, machine=3), "x86-64"),
        (fake_elf([(0x1000000, b"x", 1)], 0xFFFFFFFF81000000), "entry point"),
        (fake_elf([(0x1000000, b"x" * 64, 64), (0x1000020, b"y", 1)], 0x1000000), "overlap"),
        (fake_elf([(0x1000000, b"x" * 64, 64)], 0x1000000)[:-10], "past the end"),
    ],
)
def test_parse_vmlinux_rejects(image: bytes, message: str) -> None:
    from vdm_kvm import elf

    with pytest.raises(elf.ElfError, match=message):
        elf.parse_vmlinux(image)


def test_machine_loads_an_elf_kernel_at_its_physical_address() -> None:
    from vdm_kvm.machine import Machine, MachineConfig, MachineError

    kvm_or_skip()
    img = fake_elf([(0x1000000, b"\x90" * 4096, 4096), (0x1400000, b"\x11" * 16, 0x3000)], 0x1000010)
    m = Machine(MachineConfig(mem_mib=64))
    try:
        m.vm.guest_memory.write(0x1400010, b"\xee" * 64)  # the .bss part must be cleared
        m.load_linux(img, b"RD" * 100, "quiet")
        mem = m.vm.guest_memory
        assert mem.read(0x1000000, 4096) == b"\x90" * 4096
        assert mem.read(0x1400000, 0x3000) == b"\x11" * 16 + bytes(0x3000 - 16)
        assert m.vm.vcpus[0].get_regs().rip == 0x1000010
        zp = mem.read(layout.ZERO_PAGE, 4096)
        assert struct.unpack_from("<I", zp, 0x202)[0] == 0x53726448
        assert struct.unpack_from("<H", zp, 0x206)[0] == 0x020F
        rd_addr, rd_size = struct.unpack_from("<II", zp, 0x218)
        assert mem.read(rd_addr, rd_size) == b"RD" * 100 and rd_addr >= 0x1403000
        with pytest.raises(MachineError, match="does not fit"):
            m.load_linux(fake_elf([(0x8000000, b"x", 1)], 0x8000000), None, "")  # above 64 MiB
    finally:
        m.close()


def test_machine_loads_the_kit_vmlinux(tmp_path: Path) -> None:
    from vdm_kvm import elf
    from vdm_kvm.machine import Machine, MachineConfig

    kernel = kit_kernel()
    if kernel is None or not (kernel.parent / "vmlinux").exists():
        pytest.skip("guest kit not built (python3 -m vdm_lab kit)")
    kvm_or_skip()
    vmlinux = kernel.parent / "vmlinux"
    with open(vmlinux, "rb") as f:
        head = f.read(1 << 16)
    k = elf.parse_vmlinux(head, vmlinux.stat().st_size)
    assert k.entry == k.segments[0].paddr == 0x1000000  # startup_64 at LOAD_PHYSICAL_ADDR
    m = Machine(MachineConfig(mem_mib=256))
    try:
        m.load_linux(vmlinux, None, "")
        seg = k.segments[0]
        with open(vmlinux, "rb") as f:
            f.seek(seg.offset)
            assert m.vm.guest_memory.read(seg.paddr, 65536) == f.read(65536)
        assert m.vm.vcpus[0].get_regs().rip == k.entry
    finally:
        m.close()


def test_ram_above_the_32bit_gap_goes_above_4gib() -> None:
    assert layout.ram_ranges(256 << 20) == [(0, 256 << 20)]
    high = (4 << 30) - layout.RAM_32BIT_END
    assert layout.ram_ranges(4 << 30) == [(0, layout.RAM_32BIT_END), (1 << 32, high)]


def test_machine_with_4gib_has_high_ram_in_e820() -> None:
    from vdm_kvm.machine import Machine, MachineConfig

    kvm_or_skip()
    m = Machine(MachineConfig(mem_mib=4096))
    try:
        m.load_linux(fake_bzimage(), None, "")
        zp = m.vm.guest_memory.read(layout.ZERO_PAGE, 4096)
        ram = [(e.addr, e.end) for e in e820.unpack(zp[0x2D0:], zp[0x1E8]) if e.type == e820.E820_RAM]
        assert ram == [(0, layout.EBDA_START), (layout.KERNEL, layout.RAM_32BIT_END),
                       (1 << 32, (1 << 32) + (4 << 30) - layout.RAM_32BIT_END)]
        # both slots are guest RAM the devices can use; the gap is not
        mem = m.vm.guest_memory
        mem.write(0x100000000, b"hi")
        assert mem.read(0x100000000, 2) == b"hi"
        assert not mem.contains(layout.RAM_32BIT_END, 1)
    finally:
        m.close()


# ---- power and reset ports -----------------------------------------------------------------------


def test_power_control_decodes_acpi_sleep_and_reset() -> None:
    from vdm_kvm.power import KeyboardControllerReset, PowerControl

    events: list[str] = []
    p = PowerControl(events.append, reset_value=1, reset_offset=1)
    p.write(0, 1, (acpi.S5_SLP_TYP << 2))  # SLP_TYP without SLP_EN: nothing
    p.write(0, 1, (3 << 2) | acpi.SLP_EN)  # S3: not implemented, ignored
    assert events == []
    p.write(0, 1, (acpi.S5_SLP_TYP << 2) | acpi.SLP_EN)  # what ACPICA writes for S5
    p.write(1, 1, 2)  # wrong reset value
    p.write(1, 1, 1)
    assert events == ["poweroff", "reset"]
    assert p.read(0, 1) == 0
    k = KeyboardControllerReset(events.append)
    assert k.read(0, 1) & 0x02 == 0  # input buffer empty: Linux's kb_wait returns at once
    k.write(0, 1, 0xD1)
    k.write(0, 1, 0xFE)
    assert events == ["poweroff", "reset", "reset"]


def test_machine_routes_power_ports() -> None:
    from vdm_kvm.machine import Machine, MachineConfig

    kvm_or_skip()
    m = Machine(MachineConfig(mem_mib=64))
    try:
        bus = m.vm.pio_bus
        bus.write(layout.SLEEP_PORT, 1, (acpi.S5_SLP_TYP << 2) | acpi.SLP_EN)
        assert m.vm.exit is not None and m.vm.exit.reason == "poweroff"
        assert bus.read(0x64, 1) & 0x02 == 0
    finally:
        m.close()


def test_reset_vector_stub_resets_the_vm() -> None:
    """Linux's last-resort reboot jumps to F000:FFF0 in real mode; the stub there must reset."""
    from vdm_kvm import kvm_abi as abi
    from vdm_kvm.machine import Machine, MachineConfig

    kvm_or_skip()
    m = Machine(MachineConfig(mem_mib=64))
    try:
        m.load_linux(fake_bzimage(), None, "")
        v = m.vm.vcpus[0]
        s = v.get_sregs()
        s.cr0, s.cr4, s.efer = 0x10, 0, 0
        for seg in (s.cs, s.ds, s.es, s.fs, s.gs, s.ss):
            seg.base, seg.limit, seg.selector, seg.type = 0, 0xFFFF, 0, 3
            seg.l, seg.db, seg.g, seg.s, seg.present = 0, 0, 0, 1, 1
        s.cs.type, s.cs.base, s.cs.selector = 0xB, 0xF0000, 0xF000
        v.set_sregs(s)
        v.set_regs(rip=0xFFF0, rflags=2)
        assert v.run_once() == abi.KVM_EXIT_IO
        assert m.vm.exit is not None and m.vm.exit.reason == "reset"
    finally:
        m.close()


def test_default_cmdline_follows_the_port_bus() -> None:
    from vdm_kvm.machine import Machine, MachineConfig

    from tests.kvm.realmode import Recorder

    kvm_or_skip()
    m = Machine(MachineConfig(mem_mib=64))
    try:
        assert m.default_cmdline().split() == ["8250.nr_uarts=1", "pci=off"]
        m.vm.pio_bus.register(0x2F8, 8, Recorder(), "com2")
        m.vm.pio_bus.register(0xCF8, 8, Recorder(), "pci")
        assert m.default_cmdline().split() == ["8250.nr_uarts=2", "pci=noearly"]
    finally:
        m.close()
