"""Tests for the hello device, through vdm.testing's in-process virtio driver (no VM needed).

``virtio_driver`` is a pytest fixture that vdm-core provides: it attaches a driver to a device
over virtio-mmio in fake guest RAM, and checks afterwards that nothing outside that RAM changed.
"""

from __future__ import annotations

from vdm.plugins import load_plugins
from vdm.transport.mmio import Reg

from vdm_hello.config import HelloConfig
from vdm_hello.device import HelloDevice


def test_request_is_served(virtio_driver):
    drv = virtio_driver(HelloDevice())
    drv.init()
    used = drv.request(0, out=[b"hello, ", b"device"], in_lens=[13])
    assert used.written == 13
    assert used.data == b"hello, device"


def test_many_requests_in_one_kick(virtio_driver):
    drv = virtio_driver(HelloDevice(HelloConfig(queue_size=16)))
    drv.init()
    heads = [drv.post(0, [bytes([i]) * 4], [4]) for i in range(8)]
    drv.kick(0)
    assert [u.head for u in drv.wait(0, 8)] == heads


def test_identity_and_queue_size(virtio_driver):
    drv = virtio_driver(HelloDevice(HelloConfig(queue_size=64)))
    assert drv.reg_read(Reg.DEVICE_ID) == 0
    assert drv.queue_max_size(0) == 64


def test_a_broken_request_resets_the_device(virtio_driver):
    drv = virtio_driver(HelloDevice())
    drv.init()
    drv.publish(0, 0xFFFF)  # a head index far outside the queue
    drv.kick(0)
    assert drv.needs_reset
    drv.init()  # a reset brings it back
    assert drv.request(0, [b"ok"], [2]).data == b"ok"


def test_the_plugin_is_installed():
    """vdm finds the plugin through its entry point (after ``pip install``)."""
    plugins = load_plugins(only=["hello"])
    (info,) = [p for p in plugins.plugins if p.name == "hello"]
    assert info.state == "loaded", info.error
    assert info.distribution == "vdm-hello"
    device_type = plugins.device_type("hello")
    assert plugins.device_for_flag("--hello") is device_type
    assert isinstance(device_type.create(HelloConfig(), None), HelloDevice)
