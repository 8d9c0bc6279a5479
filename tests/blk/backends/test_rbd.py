"""Disks on Ceph RBD images through librbd: a real single-node Ceph (one mon, one memstore OSD,
cephx on, pool size 1) started by the tests in their tmp directory (:mod:`.cephcluster`); what vdm
wrote is checked with the ``rbd`` CLI (``rbd export``), raw and qcow2 over it, a cluster that dies."""

from __future__ import annotations

import errno
import json
import logging
import os
import struct
import subprocess
import sys
import threading
import time

import pytest
from vdm.config import config_from_mapping, parse_option_string
from vdm_blk.backends import DiskError, Qcow2Disk, RawDisk, catalog, open_disk, open_protocol
from vdm_blk.backends.librbd import probe
from vdm_blk.backends.rbd import parse_name
from vdm_blk.config import BlkConfig
from vdm_blk.device import S_IOERR, S_OK, T_DISCARD, T_FLUSH, T_IN, T_OUT, T_WRITE_ZEROES, BlkDevice

from .cephcluster import CephCluster, missing
from .helpers import check_image, create_qcow2, pattern

MiB = 1 << 20

needs_ceph = pytest.mark.skipif(
    probe() is not None or missing() is not None,
    reason=f"{probe() or missing()}: no Ceph cluster can run here",
)


@pytest.fixture(scope="module")
def ceph(tmp_path_factory):
    cluster = CephCluster(tmp_path_factory.mktemp("ceph"))
    cluster.start()
    print(f"Ceph cluster (mon + memstore OSD) up in {cluster.startup_seconds:.1f} s")
    yield cluster
    cluster.stop()


def _export(ceph: CephCluster, image: str, dest) -> bytes:
    """The image's bytes as the rbd CLI reads them (not through vdm)."""
    ceph.rbd("export", f"rbd/{image}", str(dest))
    with open(dest, "rb") as f:
        return f.read()


def _hdr(rtype: int, sector: int = 0) -> bytes:
    return struct.pack("<IIQ", rtype, 0, sector)


def test_rbd_names_parse_like_qemus_and_pass_the_option_parser():
    n = parse_name(r"rbd:pool/ns/img@snap:conf=/etc/c\:x.conf:id=client.bob:mon_host=127.0.0.1\:6789")
    assert (n.pool, n.namespace, n.image, n.snap) == ("pool", "ns", "img", "snap")
    assert (n.conf, n.user, n.options) == ("/etc/c:x.conf", "bob", {"mon_host": "127.0.0.1:6789"})
    n = parse_name("rbd:p/i")
    assert (n.pool, n.namespace, n.image, n.snap, n.conf, n.user) == ("p", "", "i", None, None, "admin")
    for bad, why in (
        ("rbd:image", "expected POOL/IMAGE"),
        ("rbd:p//i", "expected POOL/IMAGE"),
        ("rbd:p/i@", "empty snapshot"),
        ("rbd:p/i:conf", "is not KEY=VALUE"),
        ("rbd:p/i:Bad-Key=1", "is not KEY=VALUE"),
    ):
        with pytest.raises(DiskError, match=why):
            parse_name(bad)
    name = "rbd:rbd/img:conf=/tmp/c/ceph.conf:id=admin"
    assert parse_option_string(BlkConfig, name, "--disk", "path").path == name
    assert parse_option_string(BlkConfig, name + ",ro,format=qcow2", "--disk", "path").ro
    assert config_from_mapping(BlkConfig, {"path": name}, "[[disk]]").path == name


@needs_ceph
def test_raw_image_serves_guest_requests(ceph, tmp_path, virtio_driver):
    name = ceph.create_image("raw1", 8 * MiB)
    backend = open_disk(name)
    assert isinstance(backend, RawDisk) and backend.size == 8 * MiB
    dev = BlkDevice(backend, BlkConfig(path=name))
    drv = virtio_driver(dev)
    drv.init()
    data = bytes(pattern(3 * 4096, 5))
    assert drv.request(0, [_hdr(T_OUT, 7), data], [1]).data == bytes([S_OK])
    assert drv.request(0, [_hdr(T_IN, 7)], [len(data), 1]).data == data + bytes([S_OK])
    zero = struct.pack("<QII", 8, 2, 0)
    assert drv.request(0, [_hdr(T_WRITE_ZEROES), zero], [1]).data == bytes([S_OK])
    assert drv.request(0, [_hdr(T_DISCARD), struct.pack("<QII", 14, 8, 0)], [1]).data == bytes([S_OK])
    assert drv.request(0, [_hdr(T_FLUSH)], [1]).data == bytes([S_OK])
    # past the end: IOERR, nothing written
    end = 8 * MiB // 512 - 1
    assert drv.request(0, [_hdr(T_OUT, end), bytes(1024)], [1]).data == bytes([S_IOERR])
    dev.close()
    expect = bytearray(data)
    expect[512 : 3 * 512] = bytes(1024)
    img = _export(ceph, "raw1", tmp_path / "raw1.out")
    assert len(img) == 8 * MiB
    got = bytearray(img[7 * 512 : 7 * 512 + len(data)])
    # a discard under librbd's granularity (rbd_discard_granularity_bytes, 64 KiB) may keep the
    # data, which a discard allows: that range reads as before or as zeros
    assert got[7 * 512 : 15 * 512] in (expect[7 * 512 : 15 * 512], bytes(8 * 512))
    got[7 * 512 : 15 * 512] = expect[7 * 512 : 15 * 512]
    assert got == expect


@needs_ceph
def test_protocol_reads_writes_discards_and_checks_ranges(ceph, tmp_path):
    name = ceph.create_image("p1", 4 * MiB)
    p = open_protocol(name)
    assert p.size() == 4 * MiB and p.supports_discard and p.supports_write_zeroes
    data = bytes(pattern(2 * MiB, 9))
    views = [memoryview(data)[: MiB - 512], memoryview(data)[MiB - 512 :]]
    assert p.pwritev(views, MiB) == 2 * MiB
    p.sync()
    out = [bytearray(4096), bytearray(MiB)]
    assert p.preadv([memoryview(b) for b in out], MiB) == 4096 + MiB
    assert bytes(out[0] + out[1]) == data[: 4096 + MiB]
    # a read across the end: the missing part reads as zeros
    tail = bytearray(b"\xff" * 8192)
    assert p.preadv([memoryview(tail)], 4 * MiB - 4096) == 8192
    assert tail == bytes(8192)
    with pytest.raises(OSError) as e:
        p.pread(512, -512)
    assert e.value.errno == errno.EINVAL
    p.discard(MiB, 64 * 1024)
    p.write_zeroes(MiB + MiB // 2, 4096, unmap=False)
    p.close()
    img = _export(ceph, "p1", tmp_path / "p1.out")
    expect = bytearray(data)
    expect[: 64 * 1024] = bytes(64 * 1024)
    expect[MiB // 2 : MiB // 2 + 4096] = bytes(4096)
    assert img[MiB : 3 * MiB] == bytes(expect)
    assert len(img) == 4 * MiB
    with pytest.raises(OSError, match="closed"):
        p.pread(512, 0)
    # a write past the end grows the image, as a file grows (qcow2 allocates there)
    p = open_protocol(ceph.disk_name("p1"))
    p.pwrite(b"y" * 4096, 4 * MiB - 512)
    assert p.size() == 4 * MiB + 3584
    p.close()
    img = _export(ceph, "p1", tmp_path / "p1.grown")
    assert len(img) == 4 * MiB + 3584 and img[4 * MiB - 512 :] == b"y" * 4096


@needs_ceph
def test_qcow2_stored_in_rbd_is_opened_as_qcow2_and_grows_the_image(ceph, tmp_path):
    local = create_qcow2(str(tmp_path / "q.qcow2"), 16 * MiB, "cluster_size=65536")
    ceph.rbd("import", local, "rbd/q1")
    name = ceph.disk_name("q1")
    imported = json.loads(ceph.rbd("info", "--format", "json", "rbd/q1"))["size"]
    disk = open_disk(name)
    assert isinstance(disk, Qcow2Disk) and disk.size == 16 * MiB
    chunks = {s: bytes(pattern(64 * 1024, s)) for s in (0, 129, 4096, 20000)}
    for sector, data in chunks.items():
        disk.writev(sector * 512, [memoryview(data)])
    disk.flush()
    for sector, data in chunks.items():
        buf = bytearray(len(data))
        disk.readv(sector * 512, [memoryview(buf)])
        assert buf == data
    disk.close()
    # the qcow2 layer allocated clusters past the imported file: the RBD image grew
    assert json.loads(ceph.rbd("info", "--format", "json", "rbd/q1"))["size"] > imported
    back = str(tmp_path / "back.qcow2")
    _export(ceph, "q1", back)
    check_image(back)
    for sector, data in chunks.items():
        out = subprocess.run(
            ["qemu-io", "-f", "qcow2", "-r", "-c", f"read -v {sector * 512} 16", back],
            capture_output=True,
            text=True,
        ).stdout
        assert out.split(":", 1)[1].split()[:16] == [f"{b:02x}" for b in data[:16]], out


@needs_ceph
def test_a_resize_by_another_client_is_seen_by_the_disk(ceph):
    """`rbd resize` elsewhere: librbd learns it through the header's watch; the disk's resize(None)
    (what `vdm ctl resize blk0` without a size calls) takes the new size."""
    disk = open_disk(ceph.create_image("r1", 4 * MiB))
    assert disk.size == 4 * MiB
    ceph.rbd("resize", "--size", "8M", "rbd/r1")
    deadline = time.monotonic() + 30
    while disk.resize(None) != 8 * MiB and time.monotonic() < deadline:
        time.sleep(0.1)
    assert disk.size == 8 * MiB
    data = bytes(pattern(4096, 3))
    disk.writev(8 * MiB - 4096, [memoryview(data)])
    buf = bytearray(4096)
    disk.readv(8 * MiB - 4096, [memoryview(buf)])
    assert buf == data
    disk.close()


@needs_ceph
def test_two_writers_share_the_exclusive_lock_through_librbd(ceph, tmp_path):
    """An image with exclusive-lock: two clients (two vdm disks) write in turn; librbd hands the
    lock over each time, no write fails and every write lands."""
    name = ceph.create_image("x1", MiB, "layering", "exclusive-lock")
    a, b = open_protocol(name), open_protocol(name)
    for i in range(4):
        (a if i % 2 == 0 else b).pwrite(bytes([i + 1]) * 4096, i * 4096)
    a.sync()
    b.sync()
    a.close()
    b.close()
    img = _export(ceph, "x1", tmp_path / "x1.out")
    assert [img[i * 4096] for i in range(4)] == [1, 2, 3, 4]


@needs_ceph
def test_a_snapshot_is_read_only_and_keeps_its_content(ceph):
    name = ceph.create_image("s1", MiB)
    p = open_protocol(name)
    p.pwrite(b"before" * 100, 0)
    p.sync()
    ceph.rbd("snap", "create", "rbd/s1@one")
    p.pwrite(b"after!" * 100, 0)
    p.close()
    snap = open_disk(ceph.disk_name("s1", "one"))
    assert snap.read_only
    buf = bytearray(1024)
    snap.readv(0, [memoryview(buf)])
    assert buf[:600] == b"before" * 100
    with pytest.raises((OSError, DiskError), match="read-only"):
        snap.writev(0, [memoryview(b"x" * 512)])
    snap.close()


@needs_ceph
def test_bad_names_get_one_clear_line(ceph, tmp_path):
    conf = ceph.conf
    cases = [
        (f"rbd:rbd/nonexistent:conf={conf}:id=admin", "image 'nonexistent' not found in pool 'rbd'"),
        (f"rbd:nopool/img:conf={conf}:id=admin", "pool 'nopool': no such pool"),
        (f"rbd:rbd/img:conf={tmp_path}/none.conf", "cannot read the Ceph configuration"),
        (f"rbd:rbd/img:conf={conf}:id=nobody", "cannot connect to the Ceph cluster as client.nobody"),
        (f"rbd:rbd/img:conf={conf}:no_such_option=1", "Ceph option no_such_option=1"),
    ]
    ceph.create_image("s2", MiB)
    cases.append((ceph.disk_name("s2", "nosnap"), "snapshot 'nosnap' of image 's2' not found"))
    for name, why in cases:
        with pytest.raises(DiskError) as e:
            open_disk(name, options={"request_timeout": 5})
        assert why in str(e.value) and "\n" not in str(e.value), str(e.value)
    with pytest.raises(DiskError, match="direct/cache=none is for local files"):
        open_disk(ceph.disk_name("s2"), direct=True)


@needs_ceph
def test_a_dead_cluster_fails_requests_with_eio_one_line_and_close_ends_waits(tmp_path, caplog):
    """The OSD dies: requests end in an error after the timeouts (one log line), never hang;
    with the monitor gone too a new open fails with one line, and close returns at once."""
    cluster = CephCluster(tmp_path / "ceph")
    try:
        cluster.start()
        name = cluster.create_image("d1", 4 * MiB)
        p = open_protocol(name, options={"request_timeout": 2})
        p.pwrite(b"x" * 4096, 0)
        cluster.kill("osd.0")
        caplog.set_level(logging.WARNING)
        for n in range(2):
            with pytest.raises(OSError):
                p.pwrite(bytes(pattern(4096, n)), MiB * (n + 1))
        lines = [r for r in caplog.records if "Ceph request failed" in r.getMessage()]
        assert len(lines) == 1, [r.getMessage() for r in caplog.records]
        # a request in flight when the disk closes ends within the poll interval
        errors: list[BaseException] = []

        def read() -> None:
            try:
                p.pread(4096, 2 * MiB)
            except BaseException as e:
                errors.append(e)

        t = threading.Thread(target=read)
        t.start()
        t.join(0.5)
        p.close()
        t.join(10)
        assert not t.is_alive() and isinstance(errors[0], OSError)
        cluster.kill("mon.a")
        with pytest.raises(DiskError, match="cannot connect to the Ceph cluster"):
            open_disk(name, options={"request_timeout": 2})
    finally:
        cluster.stop()


def test_without_librbd_blk_stays_available_and_rbd_says_why(tmp_path):
    code = (
        "from vdm_blk.backends import catalog, open_disk, DiskError\n"
        "print(catalog()['protocols']['rbd'])\n"
        "try:\n    open_disk('rbd:pool/image')\n"
        "except DiskError as e:\n    print(e)\n"
    )
    env = {**os.environ, "VDM_LIBRBD": str(tmp_path / "no-librbd.so.1")}
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert p.returncode == 0, p.stderr
    assert p.stdout.splitlines() == [
        "librbd not found (apt install librbd1)",
        "rbd:pool/image: the rbd protocol is unavailable here: librbd not found (apt install librbd1)",
    ]


def test_list_plugins_says_whether_rbd_is_usable_here(tmp_path):
    env = {**os.environ, "VDM_LIBRBD": str(tmp_path / "no-librbd.so.1"), "VDM_PLUGINS": "blk"}
    vdm = [sys.executable, "-m", "vdm.cli.main", "list-plugins"]
    p = subprocess.run(vdm, capture_output=True, text=True, env=env)
    assert p.returncode == 0, p.stderr
    row = next(ln for ln in p.stdout.splitlines() if ln.startswith("blk "))
    assert "rbd: unavailable: librbd not found (apt install librbd1)" in row
    p = subprocess.run([*vdm, "--json"], capture_output=True, text=True, env={**env, "VDM_LIBRBD": ""})
    (blk,) = [r for r in json.loads(p.stdout)["plugins"] if r["name"] == "blk"]
    want = "available" if probe() is None else "unavailable: librbd not found (apt install librbd1)"
    assert blk["parts"]["blk"]["protocols"]["rbd"] == want
    assert catalog()["protocols"]["rbd"] == (None if want == "available" else want[len("unavailable: ") :])


@needs_ceph
def test_vdm_exits_cleanly_when_the_cluster_is_gone(tmp_path):
    """vdm vhost-user on an RBD disk whose mon and OSD died: SIGTERM still ends vdm with status 0
    (librbd's close finishes in the background: one line), well within the stop's 20 s."""
    from tests.vhost_user.vdmproc import VdmProcess

    cluster = CephCluster(tmp_path / "ceph")
    vdm = None
    try:
        cluster.start()
        name = cluster.create_image("e1", 8 * MiB)
        vdm = VdmProcess(str(tmp_path / "v.sock"), "--disk", f"{name},request_timeout=3")
        cluster.kill("osd.0")
        cluster.kill("mon.a")
        rc = vdm.stop(20)
        assert rc == 0, vdm.output
        assert vdm.count("Traceback") == 0, vdm.output
    finally:
        if vdm is not None and vdm.alive:
            vdm.kill()
        cluster.stop()
