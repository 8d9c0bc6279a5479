"""A hypervisor plugin: a VMM-hooks object (as vdm_kvm.vmm, vdm_xen.vmm), its availability check, tests."""

FILES = {
    "src/$pkg/plugin.py": '''\
"""$dist's plugin module: registers the ``$name`` hypervisor."""

from __future__ import annotations

from typing import Callable

from vdm import hookimpl
from vdm.registry import HypervisorType

#: The vdm-core plugin API this plugin was written for; vdm skips the plugin (and says why) if
#: the installed vdm-core provides another one.
VDM_API = $api


def check() -> str | None:
    """None when the $name hypervisor can be used on this machine, else a one-line reason.

    Called by ``vdm list-plugins`` and before a command uses the hypervisor: keep it fast and
    quiet, e.g. ``if not os.path.exists("/dev/$name"): return "/dev/$name not found"``.
    """
    return None


@hookimpl
def vdm_register_hypervisors(register: Callable[[HypervisorType], None]) -> None:
    register(HypervisorType(name="$name", check=check, help="$name: a hypervisor made by vdm new-plugin"))
''',
    "src/$pkg/vmm.py": '''\
"""The $name hypervisor's VMM hooks: what vdm-core calls to attach devices to one VM.

One :class:`${cls}Vmm` per running VM. ``vdm.vmm.Vmm(backend)`` uses it to allocate MMIO
space and interrupt lines, register MMIO handlers and raise interrupts; devices only ever see the
guest memory and the transport. This skeleton keeps everything in the process -- MMIO accesses are
routed by :meth:`${cls}Vmm.mmio_access` (what a vCPU exit loop or an I/O request handler
calls) and interrupt levels are recorded. Replace each hook's body with the real hypervisor call.
Hooks not implemented here (ioeventfd, irqfd, MSI, port I/O) answer None: vdm falls back.
"""

from __future__ import annotations

import threading

from vdm import vmmimpl
from vdm.iorange import IoHandler
from vdm.memory import FlatGuestMemory, GuestMemory, MemoryRegion

PAGE = 4096


class ${cls}Vmm:
    def __init__(
        self,
        memory: GuestMemory | None = None,
        *,
        ram_size: int = 64 << 20,
        ram_base: int = 0x4000_0000,
        mmio_base: int = 0xD000_0000,
        first_irq: int = 5,
    ) -> None:
        #: guest RAM as devices see it (a real backend maps the VM's RAM here)
        self.memory = memory if memory is not None else FlatGuestMemory(
            [MemoryRegion(ram_base, bytearray(ram_size))]
        )
        self._next_mmio = mmio_base
        self._next_irq = first_irq
        self._lock = threading.Lock()
        self.mmio: list[tuple[int, int, IoHandler, str]] = []
        #: the last level set on each interrupt line
        self.irq_levels: dict[int, bool] = {}

    # ---- the VMM hooks ---------------------------------------------------------------------------

    @vmmimpl
    def vmm_guest_memory(self) -> GuestMemory:
        return self.memory

    @vmmimpl
    def vmm_allocate_irq(self, owner: str) -> int:
        with self._lock:
            irq, self._next_irq = self._next_irq, self._next_irq + 1
        return irq

    @vmmimpl
    def vmm_allocate_mmio(self, size: int, owner: str) -> int:
        with self._lock:
            base = self._next_mmio
            self._next_mmio += -(-size // PAGE) * PAGE
        return base

    @vmmimpl
    def vmm_register_mmio(self, base: int, size: int, handler: IoHandler, owner: str) -> bool:
        with self._lock:
            for b, s, _, other in self.mmio:
                if base < b + s and b < base + size:
                    raise ValueError(f"{owner}: MMIO 0x{base:x}+0x{size:x} overlaps {other}")
            self.mmio.append((base, size, handler, owner))
        return True

    @vmmimpl
    def vmm_set_irq_level(self, irq: int, level: bool) -> bool:
        self.irq_levels[irq] = level
        return True

    # ---- what the hypervisor side calls ----------------------------------------------------------

    def mmio_access(self, addr: int, size: int, write: bool, value: int = 0) -> int:
        """A guest MMIO access at ``addr``: route it to its handler (unclaimed: reads all ones)."""
        for base, length, handler, _ in self.mmio:
            if base <= addr < base + length:
                if write:
                    handler.write(addr - base, size, value)
                    return 0
                return handler.read(addr - base, size)
        return 0 if write else (1 << (8 * size)) - 1
''',
    "tests/test_vmm.py": '''\
"""Tests for the $name backend: a device attached through vdm's Vmm, driven by vdm.testing.

The test driver (:class:`vdm.testing.VirtioTestDriver`, what the ``virtio_driver`` fixture makes)
sends its register accesses through :meth:`${cls}Vmm.mmio_access`, the way guest MMIO exits
would, so the MMIO routing and the interrupt line are exercised for real.
"""

from __future__ import annotations

import pytest
from vdm.plugins import load_plugins
from vdm.testing import EchoDevice, GuestRam, VirtioTestDriver
from vdm.vmm import Vmm

from $pkg.vmm import ${cls}Vmm

# EchoDevice: vdm.testing's one-queue test device, which copies what it reads into what it may write


class Routed:
    """The driver's view of an MMIO window that lives behind the backend."""

    def __init__(self, backend: ${cls}Vmm, base: int) -> None:
        self.backend, self.base = backend, base

    def read(self, offset: int, size: int) -> int:
        return self.backend.mmio_access(self.base + offset, size, write=False)

    def write(self, offset: int, size: int, value: int) -> None:
        self.backend.mmio_access(self.base + offset, size, write=True, value=value)


@pytest.fixture
def vm():
    ram = GuestRam(4 << 20)
    backend = ${cls}Vmm(ram.memory)
    vmm = Vmm(backend, name="test")
    yield ram, backend, vmm
    vmm.close()


def test_device_served_through_the_backend(vm):
    ram, backend, vmm = vm
    device = EchoDevice()
    transport = vmm.attach_mmio(device)
    drv = VirtioTestDriver(device, ram=ram, transport=Routed(backend, transport.base))
    assert drv.reg_read(0) == 0x74726976  # "virt": the window answers at the allocated base
    drv.init()
    used = drv.request(0, [b"through $name"], [32])
    assert used.data.startswith(b"through $name")
    # the interrupt went out on the line the backend allocated, and the ack lowered it
    assert backend.irq_levels[transport.irq_number] is True
    drv.ack_interrupts()
    assert backend.irq_levels[transport.irq_number] is False
    ram.check_guards()  # nothing outside guest RAM was written


def test_two_devices_get_their_own_windows_and_lines(vm):
    _, backend, vmm = vm
    a, b = vmm.attach_mmio(EchoDevice()), vmm.attach_mmio(EchoDevice())
    assert a.base != b.base and a.irq_number != b.irq_number
    with pytest.raises(ValueError):
        backend.vmm_register_mmio(base=a.base, size=16, handler=a, owner="again")
    assert backend.mmio_access(0x10, 4, write=False) == 0xFFFFFFFF  # nothing there


def test_the_plugin_is_installed():
    """vdm finds the plugin through its entry point (after ``pip install``)."""
    plugins = load_plugins(only=["$name"])
    (info,) = [p for p in plugins.plugins if p.name == "$name"]
    assert info.state == "loaded", info.error
    assert info.distribution == "$dist"
    assert info.status == "available"
    assert "$name" in plugins.hypervisors
''',
}
