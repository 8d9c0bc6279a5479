"""A KVM VM set up as a small PC for Linux, and the 64-bit Linux boot.

:class:`Machine` builds, on a :class:`vdm_kvm.kvm.Vm`: guest RAM (:func:`vdm_kvm.layout.ram_ranges`),
the in-kernel irqchip (PIC, IOAPIC, LAPICs) and PIT, the vCPUs with their CPUID and LAPIC LINT
setup, the ACPI power/reset ports, and allocators for device MMIO windows and GSIs.
:meth:`Machine.load_linux` then loads a bzImage with the 64-bit boot protocol
(:mod:`vdm_kvm.bootparams`): kernel at 1 MiB, initrd high, zero page with the e820 map and the
ACPI RSDP, identity page tables and a flat GDT, and the boot vCPU in long mode at the kernel's
64-bit entry (load address + 0x200) with ``rsi`` = zero page. The ACPI tables (MADT for SMP, DSDT
with one ``LNRO0005`` device per virtio-mmio window) are written at that point, so devices must be
attached first. Application processors wait in the kernel for INIT/SIPI from Linux.
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass, field
from typing import Callable, Union

from . import bootparams, e820, elf, layout, pagetables
from .acpi import tables as acpi
from .cpuid import vcpu_cpuid
from .kvm import Kvm, Vcpu, Vm, VmExit
from .kvm_abi import ffi
from .power import KeyboardControllerReset, PowerControl

__all__ = ["Machine", "MachineConfig", "MachineError"]

log = logging.getLogger(__name__)

CR0_PE, CR0_MP, CR0_ET, CR0_NE, CR0_WP, CR0_PG = 1, 2, 0x10, 0x20, 1 << 16, 1 << 31
CR4_PAE = 1 << 5
EFER_LME, EFER_LMA = 1 << 8, 1 << 10
APIC_LVT_LINT0, APIC_LVT_LINT1 = 0x350, 0x360
APIC_MODE_NMI, APIC_MODE_EXTINT = 0x4, 0x7


_Source = Union[bytes, str, "os.PathLike[str]"]


class MachineError(RuntimeError):
    """The machine cannot be built or the kernel cannot be loaded as asked."""


@dataclass
class MachineConfig:
    mem_mib: int = 256
    cpus: int = 1
    memfd: bool = False  # back RAM with a memfd (shareable with another process)
    com1_in_dsdt: bool = True
    #: ISA IRQs given identity interrupt source overrides in the MADT (COM2/4: 3, COM1/3: 4): with
    #: hardware-reduced ACPI Linux has no legacy PIC and maps only these ISA IRQs to IOAPIC pins
    isa_irqs: tuple[int, ...] = (3, layout.COM1_IRQ)
    kvm_path: str = "/dev/kvm"


@dataclass
class VirtioMmioWindow:
    base: int
    size: int
    gsi: int
    owner: str


@dataclass
class _Allocations:
    next_mmio: int = layout.MMIO_BASE
    next_gsi: int = layout.FIRST_DEVICE_GSI
    by_owner_irq: dict[str, int] = field(default_factory=dict)
    mmio_windows: list[VirtioMmioWindow] = field(default_factory=list)


class Machine:
    """A VM with RAM, irqchip, PIT, vCPUs and power control, ready for devices and a kernel."""

    def __init__(self, config: MachineConfig | None = None, kvm: Kvm | None = None) -> None:
        self.config = cfg = config or MachineConfig()
        if not 1 <= cfg.cpus <= 254:
            raise MachineError("1 to 254 vCPUs")
        mem = cfg.mem_mib << 20
        if mem < 64 << 20:
            raise MachineError("at least 64 MiB of guest memory")
        self._own_kvm = kvm is None
        self.kvm = kvm or Kvm(cfg.kvm_path)
        self.vm: Vm = self.kvm.create_vm()
        self._alloc = _Allocations()
        self._lock = threading.Lock()
        self.mem_size = mem
        try:
            self.vm.set_tss_addr(layout.TSS)
            self.vm.set_identity_map_addr(layout.IDENTITY_MAP_PAGE)
            self.vm.create_irqchip()
            self.vm.create_pit2()
            for addr, size in layout.ram_ranges(mem):
                self.vm.add_memory(addr, size, memfd=cfg.memfd)
            self.power = PowerControl(lambda what: self._power_event(what, "ACPI"), layout.RESET_VALUE,
                                      layout.RESET_PORT - layout.SLEEP_PORT)
            self.vm.pio_bus.register(layout.SLEEP_PORT, layout.RESET_PORT - layout.SLEEP_PORT + 1, self.power,
                                     "acpi-power")
            kbd = KeyboardControllerReset(lambda what: self._power_event(what, "i8042"))
            self.vm.pio_bus.register(layout.I8042_COMMAND_PORT, 1, kbd, "i8042-reset")
            supported = self.kvm.supported_cpuid()
            for i in range(cfg.cpus):
                v = self.vm.create_vcpu(i)
                v.set_cpuid(vcpu_cpuid(supported, i, cfg.cpus))
                self._setup_lapic(v)
                self._setup_fpu(v)
        except BaseException:
            self.close()
            raise
        self.loaded = False

    # ---- resources for devices -----------------------------------------------------------------

    def allocate_irq(self, owner: str) -> int:
        """A free GSI (IOAPIC pin) for ``owner``."""
        with self._lock:
            a = self._alloc
            if owner in a.by_owner_irq:
                return a.by_owner_irq[owner]
            if a.next_gsi > layout.LAST_GSI:
                raise MachineError("no free interrupt lines (IOAPIC has 24 pins)")
            gsi = a.next_gsi
            a.next_gsi += 1
            a.by_owner_irq[owner] = gsi
            return gsi

    def allocate_mmio(self, size: int, owner: str) -> int:
        """A free MMIO window of ``size`` bytes (aligned to 4 KiB) between RAM and the IOAPIC."""
        if size <= 0:
            raise ValueError("MMIO size must be positive")
        with self._lock:
            a = self._alloc
            base = a.next_mmio
            end = base + ((size + layout.MMIO_ALIGN - 1) & ~(layout.MMIO_ALIGN - 1))
            if end > layout.MMIO_END:
                raise MachineError("MMIO space exhausted")
            a.next_mmio = end
            return base

    def add_virtio_mmio(self, base: int, size: int, gsi: int, owner: str) -> None:
        """Describe a virtio-mmio window in the DSDT (``LNRO0005``); before :meth:`load_linux`."""
        if self.loaded:
            raise MachineError("virtio-mmio devices must be added before the kernel is loaded")
        if base + size > 1 << 32:
            raise MachineError("virtio-mmio windows must lie below 4 GiB (Memory32Fixed)")
        with self._lock:
            self._alloc.mmio_windows.append(VirtioMmioWindow(base, size, gsi, owner))

    def irq_for_owner(self, owner: str) -> int | None:
        return self._alloc.by_owner_irq.get(owner)

    @property
    def virtio_mmio_windows(self) -> list[VirtioMmioWindow]:
        return list(self._alloc.mmio_windows)

    # ---- vCPU setup ----------------------------------------------------------------------------

    @staticmethod
    def _setup_lapic(v: Vcpu) -> None:
        setup_lapic_lint(v)

    @staticmethod
    def _setup_fpu(v: Vcpu) -> None:
        # the x87 control word after FNINIT; KVM_SET_FPU ignores MXCSR (its reset value is 0x1f80)
        fpu = v.get_fpu()
        fpu.fcw = 0x37F
        v.set_fpu(fpu)

    def _setup_boot_cpu(self, v: Vcpu, entry: int) -> None:
        s = v.get_sregs()
        code = {"base": 0, "limit": 0xFFFFFFFF, "selector": pagetables.BOOT_CS, "type": 0xB, "present": 1,
                "dpl": 0, "db": 0, "s": 1, "l": 1, "g": 1, "avl": 0, "unusable": 0}
        data = {"base": 0, "limit": 0xFFFFFFFF, "selector": pagetables.BOOT_DS, "type": 0x3, "present": 1,
                "dpl": 0, "db": 1, "s": 1, "l": 0, "g": 1, "avl": 0, "unusable": 0}
        for k, val in code.items():
            setattr(s.cs, k, val)
        for seg in (s.ds, s.es, s.fs, s.gs, s.ss):
            for k, val in data.items():
                setattr(seg, k, val)
        tr = {"base": 0, "limit": 0x67, "selector": pagetables.BOOT_TSS, "type": 0xB, "present": 1, "dpl": 0,
              "db": 0, "s": 0, "l": 0, "g": 0, "avl": 0, "unusable": 0}
        for k, val in tr.items():
            setattr(s.tr, k, val)
        s.gdt.base = layout.BOOT_GDT
        s.gdt.limit = len(pagetables.gdt()) - 1
        s.idt.base = 0
        s.idt.limit = 0
        s.cr0 = CR0_PE | CR0_MP | CR0_ET | CR0_NE | CR0_WP | CR0_PG
        s.cr3 = layout.PAGE_TABLES
        s.cr4 = CR4_PAE
        s.efer = EFER_LME | EFER_LMA
        v.set_sregs(s)
        v.set_regs(rip=entry, rsi=layout.ZERO_PAGE, rsp=layout.BOOT_STACK, rflags=0x2)

    # ---- Linux ---------------------------------------------------------------------------------

    def write(self, addr: int, data: bytes) -> None:
        self.vm.guest_memory.write(addr, data)

    def _copy_in(self, src: _Source, offset: int, length: int, addr: int) -> None:
        """Copy ``length`` bytes of a file (or bytes) from ``offset`` straight into guest RAM."""
        view = self.vm.guest_memory.map(addr, length, writable=True)
        if isinstance(src, (bytes, bytearray)):
            if offset + length > len(src):
                raise MachineError("image shorter than its headers say")
            view[:] = src[offset : offset + length]
            return
        with open(src, "rb") as f:
            f.seek(offset)
            done = 0
            while done < length:
                n = f.readinto(view[done:])
                if not n:
                    raise MachineError(f"{src}: file shorter than its headers say")
                done += n

    def default_cmdline(self) -> str:
        """Kernel parameters this machine needs, put before the user's (which can override them).

        Each early PCI config access is an exit to Python; with no PCI host bridge on the port
        bus Linux would still scan 256 buses for an AGP bridge (~33,000 exits), so ``pci=off``;
        with one, ``pci=noearly`` skips that scan. ``8250.nr_uarts``: as many legacy UARTs as are
        registered (COM1..COM4 at 0x3f8, 0x2f8, 0x3e8, 0x2e8; at least 1), so the 8250 driver does
        not probe absent ones port by port.
        """
        bus = self.vm.pio_bus
        present = [i for i, port in enumerate(layout.LEGACY_UART_PORTS) if bus.find(port) is not None]
        params = [f"8250.nr_uarts={max(present, default=0) + 1}"]
        params.append("pci=noearly" if self.vm.pio_bus.find(0xCF8) is not None else "pci=off")
        return " ".join(params)

    def load_linux(self, kernel: _Source, initrd: _Source | None, cmdline: str,
                   defaults: bool = True) -> bootparams.ZeroPage:
        """Load a kernel (+ initrd) and set up the boot vCPU for the 64-bit entry.

        ``kernel``: a bzImage (64-bit boot protocol, entry at 1 MiB + 0x200), or an uncompressed
        ELF ``vmlinux`` (:mod:`vdm_kvm.elf`: no decompression in the guest; entry ``startup_64``).

        ``defaults``: prepend :meth:`default_cmdline` to ``cmdline``.
        """
        if defaults:
            cmdline = f"{self.default_cmdline()} {cmdline}".strip()
        low_end = min(self.mem_size, layout.RAM_32BIT_END)
        head, size = _head(kernel, 1 << 16)
        if elf.is_elf(head):
            # an uncompressed vmlinux: segments at their physical addresses, entry = startup_64
            try:
                k = elf.parse_vmlinux(head, size)
            except elf.ElfError as e:
                raise MachineError(f"cannot load the ELF kernel: {e}") from None
            if k.start < layout.KERNEL or k.end > low_end:
                raise MachineError(f"ELF kernel at 0x{k.start:x}-0x{k.end:x} does not fit in guest RAM")
            hdr = bootparams.synthetic_header()
            for seg in k.segments:
                self._copy_in(kernel, seg.offset, seg.filesz, seg.paddr)
                if seg.memsz > seg.filesz:
                    self.write(seg.paddr + seg.filesz, bytes(seg.memsz - seg.filesz))
            entry, kernel_end = k.entry, k.end
        else:
            image = _read(kernel)
            hdr = bootparams.parse_bzimage(image)
            if hdr.relocatable_kernel == 0 and hdr.pref_address not in (0, layout.KERNEL):
                raise MachineError(f"kernel is not relocatable and wants 0x{hdr.pref_address:x}")
            payload = image[hdr.setup_size :]
            kernel_end = layout.KERNEL + max(len(payload), hdr.init_size)
            if kernel_end > low_end:
                raise MachineError("guest memory too small for the kernel")
            self.write(layout.KERNEL, payload)
            entry = layout.KERNEL + layout.KERNEL_64_ENTRY_OFFSET
        zp = bootparams.ZeroPage(hdr)

        # initrd: as high as allowed, page aligned, above the kernel's init_size
        if initrd is not None:
            rd_size = _head(initrd, 0)[1]
            limit = min(low_end, hdr.initrd_addr_max + 1 if hdr.initrd_addr_max else 0x37FFFFFF + 1)
            addr = (limit - rd_size) & ~0xFFF
            if addr < kernel_end:
                raise MachineError(f"initrd of {rd_size} bytes does not fit above the kernel")
            self._copy_in(initrd, 0, rd_size, addr)
            zp.set_ramdisk(addr, rd_size)

        cmd = cmdline.encode()
        if len(cmd) >= layout.CMDLINE_MAX or (hdr.cmdline_size and len(cmd) > hdr.cmdline_size):
            raise MachineError("kernel command line too long")
        self.write(layout.CMDLINE, cmd + b"\0")
        zp.set_cmdline(layout.CMDLINE, cmd)
        zp.set("heap_end_ptr", 0xFE00)  # boot.rst: setup heap end, relative to the real-mode code

        # ACPI
        acfg = acpi.AcpiConfig(
            nr_vcpus=self.config.cpus, sleep_port=layout.SLEEP_PORT, reset_port=layout.RESET_PORT,
            reset_value=layout.RESET_VALUE, ioapic_addr=layout.IOAPIC, lapic_addr=layout.LAPIC,
            isa_irqs=self.config.isa_irqs, com1=self.config.com1_in_dsdt,
            virtio_mmio=[acpi.MmioDevice(w.base, w.size, w.gsi) for w in self._alloc.mmio_windows],
        )
        blob, rsdp = acpi.build_tables(acfg, layout.ACPI_TABLES)
        if layout.ACPI_TABLES + len(blob) > layout.ACPI_TABLES_END:
            raise MachineError("ACPI tables do not fit below 1 MiB")
        self.write(layout.ACPI_TABLES, blob)
        zp.set_acpi_rsdp(rsdp)

        # e820
        ram = []
        for addr, size in layout.ram_ranges(self.mem_size):
            if addr == 0:
                ram.append((0, layout.EBDA_START))
                ram.append((layout.KERNEL, size - layout.KERNEL))
            else:
                ram.append((addr, size))
        zp.set_e820(e820.build(ram, [(layout.EBDA_START, layout.KERNEL - layout.EBDA_START)]))
        self.write(layout.ZERO_PAGE, bytes(zp))
        self.write(layout.RESET_VECTOR, reset_vector_stub())
        self.write(layout.BOOT_GDT, pagetables.gdt())
        self.write(layout.PAGE_TABLES, pagetables.identity_map(layout.PAGE_TABLES, 4))
        self._setup_boot_cpu(self.vm.vcpus[0], entry)
        self.loaded = True
        self.zero_page = zp
        return zp

    # ---- running -------------------------------------------------------------------------------

    def _power_event(self, what: str, source: str) -> None:
        if source == "i8042":
            detail = "i8042 reset (0xfe to port 0x64)"
        else:
            detail = "ACPI sleep control S5" if what == "poweroff" else "ACPI reset register"
        self.vm.request_exit(VmExit(what, detail))

    def start(self) -> None:
        if not self.loaded:
            raise MachineError("load a kernel first")
        self.vm.start()

    def wait(self, timeout: float | None = None) -> VmExit | None:
        return self.vm.wait(timeout)

    def stop(self) -> VmExit:
        return self.vm.stop()

    @property
    def on_exit(self) -> list[Callable[[VmExit], None]]:
        return self.vm.on_exit

    def close(self) -> None:
        vm = getattr(self, "vm", None)
        if vm is not None:
            vm.close()
        if self._own_kvm:
            self.kvm.close()


def reset_vector_stub() -> bytes:
    """Real-mode code for the reset vector (F000:FFF0): write the ACPI reset register, halt.

    Linux falls back to jumping there (``machine_real_restart``) when other reboot methods fail;
    on hardware-reduced ACPI without EFI it even starts with that (reboot type EFI, then BIOS).
    """
    port = layout.RESET_PORT
    code = bytes([0xB0, layout.RESET_VALUE, 0xBA, port & 0xFF, port >> 8, 0xEE, 0xF4, 0xEB, 0xFD])
    # mov al, RESET_VALUE; mov dx, RESET_PORT; out dx, al; 1: hlt; jmp 1b
    return code.ljust(16, b"\xf4")


def setup_lapic_lint(v: Vcpu) -> None:
    """LINT0 as ExtINT (the PIC's output reaches the CPU), LINT1 as NMI, as a BIOS leaves them."""
    lapic = v.get_lapic()
    buf = bytearray(ffi.buffer(lapic.regs))
    for reg, mode in ((APIC_LVT_LINT0, APIC_MODE_EXTINT), (APIC_LVT_LINT1, APIC_MODE_NMI)):
        val = int.from_bytes(buf[reg : reg + 4], "little")
        val = (val & ~0x700 & ~(1 << 16)) | (mode << 8)
        buf[reg : reg + 4] = val.to_bytes(4, "little")
    ffi.memmove(lapic.regs, bytes(buf), len(buf))
    v.set_lapic(lapic)


def _head(src: _Source, n: int) -> tuple[bytes, int]:
    """The first ``n`` bytes of a file (or bytes) and its whole size."""
    if isinstance(src, (bytes, bytearray)):
        return bytes(src[:n]), len(src)
    with open(src, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        return f.read(n), size


def _read(src: _Source) -> bytes:
    if isinstance(src, (bytes, bytearray)):
        return bytes(src)
    with open(src, "rb") as f:
        return f.read()
