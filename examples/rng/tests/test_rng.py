"""virtio-rng through vdm.testing's in-process driver: what a guest's virtio-rng driver would see."""

from __future__ import annotations

import importlib.metadata

import pytest
from vdm.device import F_EVENT_IDX, F_INDIRECT_DESC, F_VERSION_1
from vdm.errors import UserError
from vdm.plugins import load_plugins
from vdm.transport.mmio import Reg
from vdm_rng.config import RngConfig
from vdm_rng.device import RngDevice

POISON = 0xEE  # what the test driver fills device-writable buffers with before posting them


def test_identity(virtio_driver):
    drv = virtio_driver(RngDevice())
    assert drv.reg_read(Reg.DEVICE_ID) == 4
    assert drv.queue_max_size(0) == 256
    assert drv.queue_max_size(1) == 0  # one queue only
    # no device-specific feature bits, no configuration space
    assert drv.device_features() == (1 << F_VERSION_1) | (1 << F_EVENT_IDX) | (1 << F_INDIRECT_DESC)
    assert drv.config_bytes(0, 8) == bytes(8)


def test_fills_the_buffer_with_random_bytes(virtio_driver):
    drv = virtio_driver(RngDevice())
    drv.init()
    a = drv.request(0, in_lens=[64])
    b = drv.request(0, in_lens=[64])
    assert a.written == b.written == 64
    assert a.data != b.data
    # 64 random bytes are all 0xee (the poison) with probability 2^-512
    assert a.data != bytes([POISON]) * 64 and len(set(a.data)) > 16
    assert drv.device.bytes_served == 128


def test_scattered_and_indirect_buffers(virtio_driver):
    drv = virtio_driver(RngDevice(source=lambda n: bytes(range(n))))
    drv.init()
    used = drv.request(0, in_lens=[3, 5, 8])
    assert (used.written, used.data) == (16, bytes(range(16)))
    used = drv.request(0, in_lens=[10, 6], indirect=True)
    assert (used.written, used.data) == (16, bytes(range(16)))


def test_max_bytes_caps_a_request(virtio_driver):
    drv = virtio_driver(RngDevice(RngConfig(max_bytes=16)))
    drv.init()
    used = drv.request(0, in_lens=[64])
    assert used.written == 16
    assert used.data[16:] == bytes([POISON]) * 48  # the rest of the buffer is untouched


def test_readable_buffers_are_ignored(virtio_driver):
    drv = virtio_driver(RngDevice())
    drv.init()
    assert drv.request(0, out=[b"not for me"]).written == 0
    used = drv.request(0, out=[b"header"], in_lens=[8])
    assert used.written == 8
    assert not drv.needs_reset


def test_many_requests_in_one_kick(virtio_driver):
    drv = virtio_driver(RngDevice(RngConfig(queue_size=16)))
    drv.init()
    heads = [drv.post(0, in_lens=[32]) for _ in range(16)]
    drv.kick(0)
    used = drv.wait(0, 16)
    assert [u.head for u in used] == heads
    assert len({u.data for u in used}) == 16
    assert drv.ack_interrupts() & 1


def test_a_broken_chain_stops_the_device(virtio_driver):
    drv = virtio_driver(RngDevice())
    drv.init()
    drv.write_desc(0, 0, drv.ram.end - 8, 64, 2, 0)  # a writable buffer running past guest RAM
    drv.publish(0, 0)
    drv.kick(0)
    assert drv.needs_reset
    assert drv.used_idx(0) == 0
    assert drv.device.bytes_served == 0


def test_options():
    from vdm.config import parse_option_string

    assert parse_option_string(RngConfig, "max_bytes=256", "--rng-example") == RngConfig(max_bytes=256)
    with pytest.raises(UserError, match=r"^--rng-example: max_bytes must be at least 1, not 0$"):
        parse_option_string(RngConfig, "max_bytes=0", "--rng-example")


def test_registered_as_a_vdm_plugin():
    try:
        importlib.metadata.distribution("vdm-rng-example")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("vdm-rng-example is not installed (pip install ./examples/rng)")
    plugins = load_plugins(only=["rng-example"])
    (info,) = [p for p in plugins.plugins if p.name == "rng-example"]
    assert (info.distribution, info.state, info.status) == ("vdm-rng-example", "loaded", "available")
    dt = plugins.device_type("rng-example")
    assert plugins.device_for_flag("--rng-example") is dt and dt.toml_key == "rng-example"
    device = dt.create(RngConfig(max_bytes=8), None)
    assert isinstance(device, RngDevice) and device.config.max_bytes == 8
