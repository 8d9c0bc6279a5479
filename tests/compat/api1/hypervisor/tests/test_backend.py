"""Tests for the hyper backend: a device attached through vdm's Vmm, driven by vdm.testing.

The test driver (:class:`vdm.testing.VirtioTestDriver`, what the ``virtio_driver`` fixture makes)
sends its register accesses through :meth:`HyperBackend.mmio_access`, the way guest MMIO exits
would, so the MMIO routing and the interrupt line are exercised for real.
"""

from __future__ import annotations

import pytest
from vdm.device import VirtioDevice
from vdm.plugins import load_plugins
from vdm.testing import GuestRam, VirtioTestDriver
from vdm.vmm import Vmm

from vdm_hyper.backend import HyperBackend


class Echo(VirtioDevice):
    """A one-queue device for the test: copies what it reads into what it may write."""

    device_id = 0x7F
    name = "echo"
    queue_max_sizes = (16,)

    def process_queue(self, queue):
        while True:
            chain = queue.pop()
            if chain is None:
                break
            queue.push(chain, chain.write(chain.read()))
        self.signal_used(queue)


class Routed:
    """The driver's view of an MMIO window that lives behind the backend."""

    def __init__(self, backend: HyperBackend, base: int) -> None:
        self.backend, self.base = backend, base

    def read(self, offset: int, size: int) -> int:
        return self.backend.mmio_access(self.base + offset, size, write=False)

    def write(self, offset: int, size: int, value: int) -> None:
        self.backend.mmio_access(self.base + offset, size, write=True, value=value)


@pytest.fixture
def vm():
    ram = GuestRam(4 << 20)
    backend = HyperBackend(ram.memory)
    vmm = Vmm(backend, name="test")
    yield ram, backend, vmm
    vmm.close()


def test_device_served_through_the_backend(vm):
    ram, backend, vmm = vm
    device = Echo()
    transport = vmm.attach_mmio(device)
    drv = VirtioTestDriver(device, ram=ram, transport=Routed(backend, transport.base))
    assert drv.reg_read(0) == 0x74726976  # "virt": the window answers at the allocated base
    drv.init()
    used = drv.request(0, [b"through hyper"], [32])
    assert used.data.startswith(b"through hyper")
    # the interrupt went out on the line the backend allocated, and the ack lowered it
    assert backend.irq_levels[transport.irq_number] is True
    drv.ack_interrupts()
    assert backend.irq_levels[transport.irq_number] is False
    ram.check_guards()  # nothing outside guest RAM was written


def test_two_devices_get_their_own_windows_and_lines(vm):
    _, backend, vmm = vm
    a, b = vmm.attach_mmio(Echo()), vmm.attach_mmio(Echo())
    assert a.base != b.base and a.irq_number != b.irq_number
    with pytest.raises(ValueError):
        backend.vmm_register_mmio(base=a.base, size=16, handler=a, owner="again")
    assert backend.mmio_access(0x10, 4, write=False) == 0xFFFFFFFF  # nothing there


def test_the_plugin_is_installed():
    """vdm finds the plugin through its entry point (after ``pip install``)."""
    plugins = load_plugins(only=["hyper"])
    (info,) = [p for p in plugins.plugins if p.name == "hyper"]
    assert info.state == "loaded", info.error
    assert info.distribution == "vdm-hyper"
    assert info.status == "available"
    assert "hyper" in plugins.hypervisors
