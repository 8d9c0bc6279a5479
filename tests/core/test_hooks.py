"""The hooks: each documented, docs/plugins.md's reference current, and each one called for real.

The plugin hooks are called by the loader on a plugin module that implements all of them. The
VMM hooks are reached through :class:`vdm.vmm.Vmm`, the way ``vdm run`` uses a hypervisor backend:
attaching devices behind virtio-mmio and virtio-pci, kicking through an ioeventfd, interrupting
through the IRQ line and MSI-X, and serving a device from on-demand (Xen-style) guest memory.
"""

from __future__ import annotations

import inspect
import os
import re
import subprocess
import sys
import time
from importlib.metadata import EntryPoint
from pathlib import Path

import pytest
import vdm
from vdm import vmmimpl
from vdm.cli.new_plugin import all_hooks, hook_reference, update_docs
from vdm.eventfd import eventfd_write
from vdm.hookspecs import PluginSpec, VmmSpec
from vdm.memory import PAGE_SIZE, GuestMemoryError, OnDemandGuestMemory
from vdm.plugins import load_plugins
from vdm.testing import GuestRam, VirtioPciTestDriver, VirtioTestDriver
from vdm.testing.devices import EchoDevice
from vdm.transport.mmio import Reg
from vdm.vmm import Vmm
from vdm_kvm.pci_bus import PciBus

from tests.core import sample_plugin

DOCS = Path(__file__).resolve().parents[2] / "docs" / "plugins.md"
CORE_SRC = Path(vdm.__file__).resolve().parent

#: VMM hooks that vdm-core itself never calls yet (a backend may implement them; nothing uses them)
NOT_CALLED_BY_CORE = {"vmm_irqfd"}


# ---- documentation ---------------------------------------------------------------------------------


@pytest.mark.parametrize("spec", [PluginSpec, VmmSpec], ids=lambda s: s.__name__)
def test_every_hook_has_a_docstring(spec):
    names = all_hooks()[spec.__name__]
    assert names, f"no hooks found in {spec.__name__}"
    for name in names:
        doc = inspect.getdoc(getattr(spec, name)) or ""
        summary = doc.split("\n\n")[0]
        assert summary.strip().endswith("."), f"{spec.__name__}.{name} lacks a one-sentence summary"


def test_docs_hook_reference_is_up_to_date():
    assert DOCS.is_file()
    assert not update_docs(DOCS, check=True), (
        "docs/plugins.md's hook reference is out of date: "
        "python -m vdm.cli.new_plugin --update-docs docs/plugins.md"
    )


def test_hook_reference_names_every_hook():
    ref = hook_reference()
    for names in all_hooks().values():
        for name in names:
            assert f"#### `{name}`" in ref
    assert "(undocumented)" not in ref
    assert not re.search(r":(class|meth|param|returns?):", ref)  # reST roles were translated


def test_check_docs_command(tmp_path):
    stale = tmp_path / "plugins.md"
    stale.write_text(DOCS.read_text().replace("#### `vmm_irqfd`", "#### `vmm_irqfd_old`"))

    def run(*args):
        return subprocess.run([sys.executable, "-m", "vdm.cli.new_plugin", *args], capture_output=True,
                              text=True)

    assert run("--check-docs", str(DOCS)).returncode == 0
    proc = run("--check-docs", str(stale))
    assert proc.returncode == 1 and "out of date" in proc.stderr
    assert run("--update-docs", str(stale)).returncode == 0
    assert stale.read_text() == DOCS.read_text()


# ---- plugin hooks ------------------------------------------------------------------------------------


def test_every_plugin_hook_is_called(monkeypatch):
    monkeypatch.delenv("VDM_PLUGINS", raising=False)
    sample_plugin.called.clear()
    ep = EntryPoint(name="sample", value="tests.core.sample_plugin", group="vdm.plugins")
    plugins = load_plugins(eps=[ep])
    (info,) = plugins.plugins
    assert info.state == "loaded", info.error
    assert sorted(sample_plugin.called) == sorted(all_hooks()["PluginSpec"])
    assert info.hooks == sorted(all_hooks()["PluginSpec"])
    assert (info.devices, info.hypervisors, info.servers, info.commands) == (
        ["sample-dev"], ["sample-hv"], ["sample-server"], ["sample-cmd"]
    )


# ---- VMM hooks ----------------------------------------------------------------------------------------


class RecordingBackend:
    """A hypervisor backend that implements every VMM hook except the on-demand memory pair."""

    def __init__(self, ram: GuestRam) -> None:
        self.ram = ram
        self.calls: list[str] = []
        self.mmio: dict[int, tuple[int, object]] = {}
        self.pio: dict[int, tuple[int, object]] = {}
        self.levels: dict[int, list[bool]] = {}
        self.msi: list[tuple[int, int]] = []
        self.ioeventfds: dict[tuple[int, int | None], int] = {}
        self.irqfds: dict[int, int] = {}
        self._next_irq = 5
        self._next_mmio = 0xD000_0000

    def _called(self) -> None:
        self.calls.append(sys._getframe(1).f_code.co_name)

    @vmmimpl
    def vmm_guest_memory(self):
        self._called()
        return self.ram.memory

    @vmmimpl
    def vmm_allocate_irq(self, owner):
        self._called()
        self._next_irq += 1
        return self._next_irq

    @vmmimpl
    def vmm_allocate_mmio(self, size, owner):
        self._called()
        base, self._next_mmio = self._next_mmio, self._next_mmio + max(size, PAGE_SIZE)
        return base

    @vmmimpl
    def vmm_register_mmio(self, base, size, handler, owner):
        self._called()
        self.mmio[base] = (size, handler)
        return True

    @vmmimpl
    def vmm_register_pio(self, port, count, handler, owner):
        self._called()
        self.pio[port] = (count, handler)
        return True

    @vmmimpl
    def vmm_set_irq_level(self, irq, level):
        self._called()
        self.levels.setdefault(irq, []).append(level)
        return True

    @vmmimpl
    def vmm_irq_line(self, irq):
        self._called()
        return None  # no faster line here: vdm-core's default goes through vmm_set_irq_level

    @vmmimpl
    def vmm_send_msi(self, address, data):
        self._called()
        self.msi.append((address, data))
        return True

    @vmmimpl
    def vmm_ioeventfd(self, addr, size, datamatch, fd, pio):
        self._called()
        self.ioeventfds[(addr, datamatch)] = fd
        return True

    @vmmimpl
    def vmm_irqfd(self, irq, fd):
        self._called()
        self.irqfds[irq] = fd
        return True


class OnDemandBackend:
    """A Xen-like backend: no flat memory, pages mapped one request at a time."""

    def __init__(self, ram: GuestRam) -> None:
        self.ram = ram
        self.calls: list[str] = []
        self.mapped = 0

    @vmmimpl
    def vmm_map_guest(self, first_page, count, writable):
        self.calls.append("vmm_map_guest")
        start = first_page * PAGE_SIZE - self.ram.base
        if start < 0 or start + count * PAGE_SIZE > self.ram.size:
            raise GuestMemoryError(f"pages 0x{first_page:x}+{count} are not guest RAM")
        self.mapped += 1
        return self.ram.region.view[start : start + count * PAGE_SIZE]

    @vmmimpl
    def vmm_unmap_guest(self, view, count):
        self.calls.append("vmm_unmap_guest")
        self.mapped -= 1
        return True

    @vmmimpl
    def vmm_allocate_irq(self, owner):
        return 9

    @vmmimpl
    def vmm_allocate_mmio(self, size, owner):
        return 0xD000_0000

    @vmmimpl
    def vmm_register_mmio(self, base, size, handler, owner):
        return True

    @vmmimpl
    def vmm_set_irq_level(self, irq, level):
        return True


def _wait_for(cond, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


def test_every_vmm_hook_is_called():
    ram = GuestRam(4 << 20)
    rec = RecordingBackend(ram)
    vmm = Vmm(rec, name="hooks")
    try:
        # virtio-mmio: MMIO window, IRQ, memory, kick eventfd
        dev = EchoDevice()
        t = vmm.attach_mmio(dev)
        assert rec.mmio[t.base] == (0x200, t)
        drv = VirtioTestDriver(dev, ram=ram, transport=t)
        drv.init()
        # a kick through the ioeventfd (no MMIO exit): the event loop runs the device
        drv.post(0, [b"via eventfd"], [11])
        eventfd_write(rec.ioeventfds[(t.base + Reg.QUEUE_NOTIFY, 0)], 1)
        _wait_for(lambda: drv.used_idx(0) == 1)
        assert drv.collect(0)[0].data == b"via eventfd"
        assert rec.levels[t.irq_number][-1] is True  # raised through vmm_set_irq_level
        drv.ack_interrupts()
        assert rec.levels[t.irq_number][-1] is False

        # virtio-pci with MSI-X: config space through port I/O, interrupts as messages
        bus = PciBus()
        vmm.register_pio(0xCF8, 8, bus, "pci-conf1")
        assert rec.pio[0xCF8] == (8, bus)
        dev2 = EchoDevice()
        pt = vmm.attach_pci(dev2, bus)
        pdrv = VirtioPciTestDriver(dev2, ram=ram, transport=pt)
        pdrv.init()
        assert pdrv.request(0, [b"pci"], [3]).data == b"pci"
        assert rec.msi, "no MSI was sent for the used buffer"

        # nothing in vdm-core uses irqfd yet: call the hook the way a transport would
        r, w = os.pipe()
        assert vmm.hook.vmm_irqfd(irq=t.irq_number, fd=w) is True
        assert rec.irqfds == {t.irq_number: w}
        os.close(r)
        os.close(w)
        ram.check_guards()
    finally:
        vmm.close()

    # on-demand guest memory built by vdm-core over vmm_map_guest / vmm_unmap_guest
    ram2 = GuestRam(1 << 20)
    od = OnDemandBackend(ram2)
    vmm2 = Vmm(od, name="ondemand")
    try:
        assert isinstance(vmm2.memory, OnDemandGuestMemory)
        dev3 = EchoDevice()
        t3 = vmm2.attach_mmio(dev3)
        drv3 = VirtioTestDriver(dev3, ram=ram2, transport=t3)
        drv3.init()
        assert drv3.request(0, [b"mapped on demand"], [16]).data == b"mapped on demand"
        with pytest.raises(GuestMemoryError):
            vmm2.memory.read(ram2.end + 16 * PAGE_SIZE, 4)
    finally:
        vmm2.close()
        vmm2.memory.close()  # type: ignore[attr-defined]
    assert od.mapped == 0  # every mapping was given back
    ram2.check_guards()

    called = set(rec.calls) | set(od.calls)
    assert called == set(all_hooks()["VmmSpec"]), f"never called: {set(all_hooks()['VmmSpec']) - called}"


def test_hooks_not_called_by_the_core_are_known():
    """Keep NOT_CALLED_BY_CORE honest: a hook the core starts using must leave that list."""
    files = [p for p in CORE_SRC.rglob("*.py") if p.name != "hookspecs.py" and "templates" not in p.parts]
    source = "\n".join(p.read_text() for p in files)
    # called as ``.hook.name(`` or taken as ``.ops.name`` (resolved once, called per event)
    unused = {name for name in all_hooks()["VmmSpec"] if not re.search(rf"\.{name}\b", source)}
    assert unused == NOT_CALLED_BY_CORE


def test_docs_python_examples_are_valid_python():
    blocks = re.findall(r"```python\n(.*?)```", DOCS.read_text(), flags=re.S)
    assert len(blocks) >= 8
    for n, block in enumerate(blocks):
        compile(block, f"docs/plugins.md python block {n}", "exec")
