"""A migration's handover between two vhost-user backends on one image, in process (issue 16 item 2).

The source's frontend stops its rings (GET_VRING_BASE), the destination's starts them at that
index (SET_VRING_BASE) on the same guest RAM; the image passes from one backend to the other with
``lock=start``: the destination opens it while the source writes it and takes the write lock when
its device starts, after the source's device stopped. A qcow2 image's metadata passes too: the
source writes back everything it caches when its device stops, the destination reads all of it
again when its device starts (vdm_blk.backends.qcow2_handover). The real-guest version is
test_migration.py.
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


CLUSTER = 64 << 10


def qemu_img_check(path: str) -> subprocess.CompletedProcess:
    return subprocess.run(["qemu-img", "check", path], capture_output=True, text=True, timeout=60)


@pytest.fixture(params=["raw", "qcow2"])
def disk(request, tmp_path, image) -> tuple[str, str]:
    """(path, format): the raw image, or an empty qcow2 image of 64 KiB clusters (writes allocate)."""
    if request.param == "raw":
        return image, "raw"
    path = str(tmp_path / "disk.qcow2")
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", f"cluster_size={CLUSTER}", path, "4M"],
                   check=True, timeout=60)
    return path, "qcow2"


@pytest.fixture
def pair(tmp_path, disk):
    """Source and destination: two lock=start devices on one image, each with its server."""
    made = []
    for name in ("src", "dst"):
        dev = create_blk(BlkConfig(path=disk[0], lock="start"), DeviceContext(vmm=None))
        made.append((VhostUserServer(str(tmp_path / f"{name}.sock"), dev).start(), dev))
    yield made
    for server, dev in made:
        server.close()
        dev.close()


def _qemu_io_write(image: str, fmt: str = "raw") -> subprocess.CompletedProcess:
    """QEMU opening the image for writing (it takes the write lock the way a VM would)."""
    cmd = ["qemu-io", "-f", fmt, "-c", "read 0 512", image]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60)


def test_rings_and_the_image_pass_from_source_to_destination(pair, disk, caplog):
    """Each request writes a sector in a cluster of its own: on qcow2 every one allocates (L2
    entries, refcounts the source caches), the destination (opened before any of it) must read
    them all, and its own allocations must not land on the source's clusters."""
    image, fmt = disk
    spread = CLUSTER // 512  # sectors per cluster
    (src_srv, src_dev), (dst_srv, dst_dev) = pair
    caplog.set_level(logging.ERROR)
    src = Frontend(src_srv.path)
    dst = None
    try:
        src.start(queues={0: 16})
        for i in range(5):
            assert src.request(0, [hdr(T_OUT, i * spread), bytes([i + 1]) * 512], [1]).data == bytes([S_OK])
        # the source's device runs: it holds the write lock, so QEMU is kept out
        r = _qemu_io_write(image, fmt)
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
            u = dst.request(0, [hdr(T_IN, i * spread)], [512, 1])
            assert u.data == bytes([i + 1]) * 512 + bytes([S_OK])
        for i in range(5, 10):  # new clusters, allocated by the destination
            assert dst.request(0, [hdr(T_OUT, i * spread), bytes([i + 1]) * 512], [1]).data == bytes([S_OK])
        assert dst.used_idx(0) == 15
        r = _qemu_io_write(image, fmt)
        assert r.returncode != 0 and "lock" in r.stdout + r.stderr, "the destination's device holds it now"
        assert not [rec for rec in caplog.records if rec.levelno >= logging.ERROR]
    finally:
        for fe in (src, dst):
            if fe is not None:
                fe.sock.close()
        src.ram.close()
    for server, dev in pair:
        server.close()
        dev.close()
    # the image as QEMU reads it: every sector written on either side, and nothing leaked or shared
    r = qemu_img_check(image) if fmt == "qcow2" else None
    assert r is None or r.returncode == 0, f"{r.stdout}{r.stderr}"
    reads = [f"read -P {i + 1} {i * CLUSTER} 512" for i in range(10)]
    r = subprocess.run(["qemu-io", "-f", fmt, *[a for c in reads for a in ("-c", c)], image],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "Pattern verification failed" not in r.stdout, r.stdout + r.stderr


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


def test_a_qcow2_image_passes_there_and_back_with_metadata_changes_on_each_side(tmp_path):
    """Two lock=start opens of one qcow2 image take turns (a migration and its way back): each
    side's allocations, L2 tables and refcounts reach the other, and the file is clean after each
    stop -- the discipline itself, without rings (vdm_blk.backends.locking / qcow2_handover)."""
    from vdm_blk.backends import open_disk
    from vdm_blk.backends.base import DiskError
    from vdm_blk.backends.locking import locks_deferred

    path = str(tmp_path / "q.qcow2")
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=4096", path, "64M"],
                   check=True, timeout=60)
    sides = []
    for _ in range(2):
        with locks_deferred() as locks:
            sides.append((open_disk(path), locks))
    (a, _), (b, _) = sides
    try:
        with pytest.raises(DiskError, match="not started"):  # nothing served before the start
            b.readv(0, [memoryview(bytearray(512))])
        written: dict[int, int] = {}
        for turn in range(4):
            disk, locks = sides[turn % 2]
            locks.take()
            for off, val in written.items():  # everything the other side wrote, read back
                buf = bytearray(512)
                disk.readv(off, [memoryview(buf)])
                assert buf == bytes([val]) * 512, f"turn {turn}: offset {off}"
            # 300 new clusters (an L2 table's worth crosses 512 entries at 2 MiB) and overwrites
            for i in range(300):
                off = (turn * 300 + i) * 4096 * 3
                written[off] = (turn * 7 + i) % 251 + 1
                disk.writev(off, [memoryview(bytes([written[off]]) * 512)])
            locks.release()
            r = qemu_img_check(path)
            assert r.returncode == 0, f"turn {turn}: {r.stdout}{r.stderr}"
    finally:
        a.close()
        b.close()
    r = qemu_img_check(path)
    assert r.returncode == 0 and "No errors" in r.stdout, r.stdout + r.stderr
