"""A device plugin: a VirtioDevice subclass with one queue, its options, and tests (one in a real guest)."""

FILES = {
    "src/$pkg/plugin.py": '''\
"""$dist's plugin module: registers the ``$name`` device type (``--$name``, ``[[$toml]]``)."""

from __future__ import annotations

from typing import Callable

from vdm import hookimpl
from vdm.registry import DeviceContext, DeviceType

from .config import ${cls}Config

#: The vdm-core plugin API this plugin was written for; vdm skips the plugin (and says why) if
#: the installed vdm-core provides another one.
VDM_API = $api


def create(config: ${cls}Config, ctx: DeviceContext):
    """Build one device from its options (called by ``vdm run --$name ...`` and friends)."""
    from .device import ${cls}Device  # imported here, not at the top: ``vdm list-plugins`` stays fast

    return ${cls}Device(config)


@hookimpl
def vdm_register_devices(register: Callable[[DeviceType], None]) -> None:
    register(
        DeviceType(
            name="$name",
            config=${cls}Config,
            create=create,
            cli_flag="--$name",
            toml_key="$toml",
            help="$name: a virtio device made by vdm new-plugin",
            # the virtio device id (as in device.py), so that a toolstack's generic virtio device
            # (vdm dm-only, Xen's "virtio,device<ID>") finds this plugin; None: not a virtio device yet
            virtio_id=$virtio_id,
        )
    )
''',
    "src/$pkg/config.py": '''\
"""The options of a $name device: ``--$name queue_size=128`` or a ``[[$toml]]`` table."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class ${cls}Config:
    queue_size: int = field(
        default=256, metadata={"choices": (16, 32, 64, 128, 256), "help": "entries in the request queue"}
    )
''',
    "src/$pkg/device.py": '''\
"""The $name virtio device.

The skeleton has one queue and copies each request's device-readable bytes into its
device-writable buffers. Replace :meth:`${cls}Device.process_queue` with what your device does;
the guest is untrusted, and the core already checked every descriptor, address and length of
each chain it hands you (a bad chain marks the device DEVICE_NEEDS_RESET before you see it).
"""

from __future__ import annotations

from vdm.device import VirtioDevice
from vdm.virtqueue import Virtqueue

from .config import ${cls}Config


class ${cls}Device(VirtioDevice):
    #: Your device's id from the virtio specification (section 5):
    #: $device_id_comment
    device_id = $device_id
    name = "$name"

    def __init__(self, config: ${cls}Config | None = None) -> None:
        self.config = config if config is not None else ${cls}Config()
        self.queue_max_sizes = (self.config.queue_size,)
        super().__init__()

    def device_features(self) -> int:
        """Device-specific feature bits (the core adds VERSION_1, EVENT_IDX, INDIRECT_DESC)."""
        return 0

    def config_space(self) -> bytes:
        """The device-specific configuration space the driver reads (none yet)."""
        return b""

    def process_queue(self, queue: Virtqueue) -> None:
        """The driver kicked the queue: serve every available request, then interrupt once."""
        while True:
            chain = queue.pop()
            if chain is None:
                break
            written = chain.write(chain.read())
            queue.push(chain, written)
        self.signal_used(queue)
''',
    "tests/test_device.py": '''\
"""Tests for the $name device, through vdm.testing's in-process virtio driver (no VM needed).

``virtio_driver`` is a pytest fixture that vdm-core provides: it attaches a driver to a device
over virtio-mmio in fake guest RAM, and checks afterwards that nothing outside that RAM changed.
"""

from __future__ import annotations

from vdm.plugins import load_plugins
from vdm.transport.mmio import Reg

from $pkg.config import ${cls}Config
from $pkg.device import ${cls}Device


def test_request_is_served(virtio_driver):
    drv = virtio_driver(${cls}Device())
    drv.init()
    used = drv.request(0, out=[b"hello, ", b"device"], in_lens=[13])
    assert used.written == 13
    assert used.data == b"hello, device"


def test_many_requests_in_one_kick(virtio_driver):
    drv = virtio_driver(${cls}Device(${cls}Config(queue_size=16)))
    drv.init()
    heads = [drv.post(0, [bytes([i]) * 4], [4]) for i in range(8)]
    drv.kick(0)
    assert [u.head for u in drv.wait(0, 8)] == heads


def test_identity_and_queue_size(virtio_driver):
    drv = virtio_driver(${cls}Device(${cls}Config(queue_size=64)))
    assert drv.reg_read(Reg.DEVICE_ID) == $device_id
    assert drv.queue_max_size(0) == 64


def test_a_broken_request_resets_the_device(virtio_driver):
    drv = virtio_driver(${cls}Device())
    drv.init()
    drv.publish(0, 0xFFFF)  # a head index far outside the queue
    drv.kick(0)
    assert drv.needs_reset
    drv.init()  # a reset brings it back
    assert drv.request(0, [b"ok"], [2]).data == b"ok"


def test_the_plugin_is_installed():
    """vdm finds the plugin through its entry point (after ``pip install``)."""
    plugins = load_plugins(only=["$name"])
    (info,) = [p for p in plugins.plugins if p.name == "$name"]
    assert info.state == "loaded", info.error
    assert info.distribution == "$dist"
    device_type = plugins.device_type("$name")
    assert plugins.device_for_flag("--$name") is device_type
    assert device_type.virtio_id == $virtio_id  # how vdm dm-only finds it for Xen's "virtio,device<ID>"
    assert isinstance(device_type.create(${cls}Config(), None), ${cls}Device)
''',
    "tests/test_realguest.py": '''\
\"\"\"The $name device in a real Linux guest: ``vdm vhost-user`` serves it to QEMU (TCG).

The guest kit is a Debian kernel and a busybox initramfs (built from Debian packages on first use,
cached in ~/.cache/vdm/guestkit). The workload below runs in the guest and reports one
``VDMTEST RESULT`` line; vdm_lab parses it. The test skips, saying why, where QEMU or the guest
kit is missing (in CI, with ``CI`` set, it fails instead), and where QEMU has no vhost-user
device type for virtio id $device_id or needs KVM for it (then see vdm_lab.run_qemu_in_kvm_lab).
\"\"\"

from __future__ import annotations

import pytest

vdm_lab = pytest.importorskip("vdm_lab", reason="vdm-lab is not installed (pip install -e '.[test]')")
from vdm_lab.pytest_support import require_kit  # noqa: E402

DEVICE_ID = $device_id
#: Kernel modules the guest needs for your device's driver (e.g. "virtio_input"), from the kit's
#: kernel; the kit already loads virtio_pci, blk, net, console, rng and 9p.
MODULES: list[str] = []

#: The guest's side (busybox sh): find the virtio device with our id, report the driver that bound
#: it and the status it reached. Parameters arrive as $$P_<key>; ``result ok|fail key=value ...``
#: reports (values without spaces). Extend it to exercise what your device does.
WORKLOAD = r\"\"\"
want=$$(printf '0x%04x' "$$P_devid")
for d in /sys/bus/virtio/devices/*; do
  [ "$$(cat $$d/device)" = "$$want" ] || continue
  drv=none; [ -e $$d/driver ] && drv=$$(basename $$(readlink $$d/driver))
  st=$$(cat $$d/status)
  [ $$((st & 4)) -ne 0 ] && ok=ok || ok=fail  # DRIVER_OK: the driver finished setting the device up
  result $$ok dev=$$(basename $$d) driver=$$drv status=$$st features=$$(cat $$d/features)
  exit 0
done
result fail reason=no_device want=$$want
\"\"\"


@pytest.fixture
def qemu_device() -> str:
    kit = require_kit()  # skips (with the reason) without QEMU or the guest kit
    device = vdm_lab.vhost_user_device_for(DEVICE_ID)
    if device is None:
        pytest.skip(f"QEMU has no vhost-user device type for virtio id {DEVICE_ID} "
                    "(vdm new-plugin --device-id sets it; see vdm_lab.VHOST_USER_DEVICES)")
    if device in vdm_lab.NEEDS_KVM:
        pytest.skip(f"QEMU's {device} refuses TCG: boot it with KVM, or in the KVM lab with "
                    "vdm_lab.run_qemu_in_kvm_lab (see vdm's docs/plugins.md)")
    assert kit.vmlinux.exists()
    return device


@pytest.fixture
def backend(tmp_path, qemu_device):
    \"\"\"``vdm vhost-user --$name ""`` serving on a socket in tmp_path, stopped after the test.\"\"\"
    with vdm_lab.VhostUserBackend(tmp_path / "$name.sock", "--$name", "", start_timeout=60) as vdm:
        yield vdm


def test_the_guest_driver_sets_the_device_up(qemu_device, backend):
    guest = vdm_lab.GuestSpec(modules=MODULES, workloads={"$toml": WORKLOAD})
    device_args = vdm_lab.vhost_user_device_args(qemu_device, backend.socket_path)
    r = vdm_lab.run_qemu(device_args, ["$toml"], {"devid": DEVICE_ID}, guest=guest, timeout=300)
    r.assert_ok("$toml")  # on failure: the result line and the end of the guest's serial log
    assert r["$toml"]["driver"] != "none", r.describe()
    assert backend.alive, backend.output  # vdm still serves
''',
}
