"""`vdm ctl balloon` (issue 21 item 2): the host sets a balloon's size through the control socket and
reads back the target, what the driver gave and its statistics. A real control server on a socket in
tmp, the balloon driven by vdm.testing's driver on mmap-backed guest RAM, the real `vdm ctl` CLI."""

from __future__ import annotations

import os
import struct
import subprocess
import sys

import pytest
from vdm.cli.ctl import request
from vdm.errors import UserError
from vdm.registry import DeviceContext, DeviceType
from vdm.session import DeviceSet
from vdm_balloon.config import BalloonConfig
from vdm_balloon.plugin import create

from .test_balloon_device import PAGE, MmapGuestRam

BALLOON = DeviceType(name="balloon", config=BalloonConfig, create=create)


@pytest.fixture
def served(tmp_path, virtio_driver):
    path = str(tmp_path / "vdm.ctl")
    with DeviceSet() as devices:
        dev = devices.create(BALLOON, BalloonConfig(), DeviceContext())
        drv = virtio_driver(dev, ram=MmapGuestRam())
        drv.init()
        devices.serve_control(path)
        yield path, dev, drv


def _ctl(path: str, *argv: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "VDM_CONTROL": path}
    return subprocess.run([sys.executable, "-m", "vdm.cli.main", "ctl", *argv], env=env, capture_output=True,
                          text=True, timeout=60)


def test_vdm_ctl_balloon_sets_the_target_the_driver_sees(served):
    path, _dev, drv = served
    drv.ack_interrupts()
    out = _ctl(path, "balloon", "balloon0", "64M")
    assert out.returncode == 0, out.stderr
    assert "target_bytes: 67108864" in out.stdout.splitlines()
    assert drv.config_read(0, 4) == 64 * 256  # num_pages, in 4 KiB pages
    assert drv.ack_interrupts() & 2, "the driver is told through the configuration-change interrupt"
    assert "balloon" in next(d for d in request(path, "list")["devices"] if d["id"] == "balloon0")["commands"]


def test_the_show_form_has_actual_and_the_guests_stats(served):
    path, dev, drv = served
    request(path, "balloon", {"device": "balloon0", "size": 8 * PAGE})
    drv.config_write(4, 8, 4)  # the driver says it gave 8 pages
    drv.submit(2, [struct.pack("<HQHQ", 4, 1000 * PAGE, 5, 4000 * PAGE)], [])
    ret = request(path, "balloon", {"device": "balloon0"})
    assert (ret["target_bytes"], ret["actual_bytes"]) == (8 * PAGE, 8 * PAGE)
    assert ret["stats"] == {"free_memory": 1000 * PAGE, "total_memory": 4000 * PAGE}
    assert ret["stats_requested"] and [u.written for u in drv.collect(2)] == [0]  # asked for fresh ones
    out = _ctl(path, "balloon", "balloon0")
    assert out.returncode == 0, out.stderr
    assert "actual_bytes: 32768" in out.stdout and "  free_memory: 4096000" in out.stdout
    assert dev.target_pages == 8, "showing changes nothing"


def test_zero_empties_the_balloon_and_bad_sizes_say_why(served):
    path, dev, drv = served
    request(path, "balloon", {"device": "balloon0", "size": 4 * PAGE})
    out = _ctl(path, "balloon", "balloon0", "0")
    assert out.returncode == 0 and dev.target_pages == 0 and drv.config_read(0, 4) == 0
    for bad in (-1, "64M", True, 1 << 44):
        with pytest.raises(UserError, match=r"ctl: balloon: balloon0: size .*: the balloon's size in bytes"):
            request(path, "balloon", {"device": "balloon0", "size": bad})
    out = _ctl(path, "balloon", "balloon0", "lots")
    assert out.returncode == 1 and "a whole number of bytes" in out.stderr
    out = _ctl(path, "balloon", "balloon1", "1M")
    assert out.returncode == 1 and "no device 'balloon1' (devices: balloon0)" in out.stderr
    assert dev.target_pages == 0
