"""A migration's handover between two vhost-user backends on one image, in process (issue 16 item 2).

The source's frontend stops its rings (GET_VRING_BASE), the destination's starts them at that
index (SET_VRING_BASE) on the same guest RAM; the image passes from one backend to the other with
``lock=start``: the destination opens it while the source writes it and takes the write lock when
its device starts, after the source's device stopped. The real-guest version is test_migration.py.
"""

from __future__ import annotations

import logging
import struct
import subprocess

import pytest
from vdm.registry import DeviceContext
from vdm_blk.config import BlkConfig
from vdm_blk.device import S_OK, T_IN, T_OUT
from vdm_blk.plugin import create as create_blk
from vdm_vhost_user.server import VhostUserServer

from tests.vhost_user.frontend import Frontend


def hdr(rtype: int, sector: int = 0) -> bytes:
    return struct.pack("<IIQ", rtype, 0, sector)


@pytest.fixture
def pair(tmp_path, image):
    """Source and destination: two lock=start devices on one raw image, each with its server."""
    made = []
    for name in ("src", "dst"):
        dev = create_blk(BlkConfig(path=image, lock="start"), DeviceContext(vmm=None))
        made.append((VhostUserServer(str(tmp_path / f"{name}.sock"), dev).start(), dev))
    yield made
    for server, dev in made:
        server.close()
        dev.close()


def _qemu_io_write(image: str) -> subprocess.CompletedProcess:
    """QEMU opening the image for writing (it takes the write lock the way a VM would)."""
    cmd = ["qemu-io", "-f", "raw", "-c", "read 0 512", image]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60)


def test_rings_and_the_image_pass_from_source_to_destination(pair, image, caplog):
    (src_srv, src_dev), (dst_srv, dst_dev) = pair
    caplog.set_level(logging.ERROR)
    src = Frontend(src_srv.path)
    dst = None
    try:
        src.start(queues={0: 16})
        for i in range(5):
            assert src.request(0, [hdr(T_OUT, i), bytes([i + 1]) * 512], [1]).data == bytes([S_OK])
        # the source's device runs: it holds the write lock, so QEMU is kept out
        r = _qemu_io_write(image)
        assert r.returncode != 0 and 'Failed to get "write" lock' in r.stdout + r.stderr, r
        # the destination connects and is set up before the source stops (its device not started)
        dst = Frontend(dst_srv.path, ram=src.ram)
        assert dst.get_features()
        # migration completes: the source's rings stop, the destination's start where they were
        base = src.get_vring_base(0)
        assert base == 5 == src.used_idx(0)
        assert not src_dev.activated
        dst.queues = src.queues
        dst.start(queues={0: 16})
        assert dst_dev.activated and dst_dev.broken is None
        for i in range(5):
            u = dst.request(0, [hdr(T_IN, i)], [512, 1])
            assert u.data == bytes([i + 1]) * 512 + bytes([S_OK])
        assert dst.used_idx(0) == 10
        r = _qemu_io_write(image)
        assert r.returncode != 0 and "lock" in r.stdout + r.stderr, "the destination's device holds it now"
        assert not [rec for rec in caplog.records if rec.levelno >= logging.ERROR]
    finally:
        for fe in (src, dst):
            if fe is not None:
                fe.sock.close()
        src.ram.close()


def test_a_destination_that_starts_while_the_source_runs_fails_its_device_with_one_line(pair, caplog):
    (src_srv, _), (dst_srv, dst_dev) = pair
    caplog.set_level(logging.ERROR)
    src = Frontend(src_srv.path)
    dst = Frontend(dst_srv.path)
    try:
        src.start(queues={0: 16})
        assert src.request(0, [hdr(T_IN, 0)], [512, 1]).data[-1] == S_OK
        dst.start(queues={0: 16})
        dst_srv.wait_for(lambda s: dst_dev.broken is not None, 5)
        assert dst_dev.broken is not None and "in use by another process" in dst_dev.broken
        errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
        assert len(errors) == 1 and "in use by another process" in errors[0], errors
        # the source is unaffected
        assert src.request(0, [hdr(T_IN, 0)], [512, 1]).data[-1] == S_OK
    finally:
        for fe in (src, dst):
            fe.close()
            fe.ram.close()


def test_lock_start_refuses_a_qcow2_image(tmp_path):
    from vdm.cli.devices import create_device
    from vdm.errors import UserError
    from vdm.plugins import load_plugins

    img = str(tmp_path / "q.qcow2")
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", img, "1M"], check=True, timeout=60)
    dt = load_plugins().devices["blk"][0]
    with pytest.raises(UserError, match="lock=start works with raw images only"):
        create_device(dt, BlkConfig(path=img, lock="start"), DeviceContext(vmm=None))
