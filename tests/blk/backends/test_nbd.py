"""Disks on NBD exports through libnbd: real qemu-nbd and nbdkit servers started by each test in its
tmp directory, raw and qcow2 formats over them, servers that die, come back, or lie."""

from __future__ import annotations

import errno
import json
import os
import signal
import struct
import subprocess
import sys
import threading

import pytest
from vdm.config import config_from_mapping, parse_option_string
from vdm_blk.backends import DiskError, Qcow2Disk, RawDisk, catalog, open_disk
from vdm_blk.backends.libnbd import probe
from vdm_blk.config import BlkConfig
from vdm_blk.device import S_IOERR, S_OK, T_DISCARD, T_FLUSH, T_IN, T_OUT, T_WRITE_ZEROES, BlkDevice

from .helpers import check_image, create_qcow2, pattern, qemu_img, qemu_io
from .nbd_servers import LyingServer, nbdkit, qemu_nbd

MiB = 1 << 20

pytestmark = pytest.mark.skipif(probe() is not None, reason=f"{probe()}: the nbd protocol cannot run here")

SERVERS = {"qemu-nbd": qemu_nbd, "nbdkit": nbdkit}


def _hdr(rtype: int, sector: int = 0) -> bytes:
    return struct.pack("<IIQ", rtype, 0, sector)


@pytest.fixture
def servers():
    started = []

    def start(server):
        started.append(server)
        return server.start()

    yield start
    for s in started:
        s.stop()


def _device(virtio_driver, uri: str, **config):
    cfg = BlkConfig(path=uri, **config)
    backend = open_disk(
        uri,
        read_only=cfg.ro,
        options={"reconnect_timeout": cfg.reconnect_timeout, "request_timeout": cfg.request_timeout},
    )
    dev = BlkDevice(backend, cfg)
    drv = virtio_driver(dev)
    drv.init()
    return dev, drv


def test_nbd_uris_pass_the_option_parser_and_toml_as_given():
    for uri in (
        "nbd+unix:///?socket=/run/x.sock",
        "nbd+unix:///exp?socket=/tmp/a.sock",
        "nbd://127.0.0.1:10809/e",
    ):
        assert parse_option_string(BlkConfig, uri, "--disk", "path").path == uri
        assert parse_option_string(BlkConfig, uri + ",ro", "--disk", "path").ro
        assert config_from_mapping(BlkConfig, {"path": uri}, "[[disk]]").path == uri


@pytest.mark.parametrize("server", SERVERS)
def test_raw_export_serves_guest_requests(tmp_path, virtio_driver, servers, server):
    image = str(tmp_path / "disk.raw")
    with open(image, "wb") as f:
        f.truncate(8 * MiB)
    srv = servers(SERVERS[server](tmp_path, image))
    dev, drv = _device(virtio_driver, srv.uri)
    assert isinstance(dev.backend, RawDisk) and dev.capacity == 8 * MiB // 512
    data = bytes(pattern(3 * 4096, 5))
    assert drv.request(0, [_hdr(T_OUT, 7), data], [1]).data == bytes([S_OK])
    assert drv.request(0, [_hdr(T_IN, 7)], [len(data), 1]).data == data + bytes([S_OK])
    zero = struct.pack("<QII", 8, 2, 0)
    assert drv.request(0, [_hdr(T_WRITE_ZEROES), zero], [1]).data == bytes([S_OK])
    assert drv.request(0, [_hdr(T_DISCARD), struct.pack("<QII", 14, 8, 0)], [1]).data == bytes([S_OK])
    assert drv.request(0, [_hdr(T_FLUSH)], [1]).data == bytes([S_OK])
    dev.close()
    expect = bytearray(data)
    expect[512 : 3 * 512] = bytes(1024)
    expect[7 * 512 : 15 * 512] = bytes(8 * 512)
    with open(image, "rb") as f:
        f.seek(7 * 512)
        assert f.read(len(data)) == bytes(expect)


@pytest.mark.parametrize("server", SERVERS)
def test_qcow2_exported_raw_is_opened_as_qcow2(tmp_path, virtio_driver, servers, server):
    image = create_qcow2(str(tmp_path / "disk.qcow2"), 16 * MiB, "cluster_size=65536")
    os.truncate(image, 24 * MiB)  # room to allocate in: an NBD export cannot grow
    srv = servers(SERVERS[server](tmp_path, image))
    dev, drv = _device(virtio_driver, srv.uri)
    assert isinstance(dev.backend, Qcow2Disk) and dev.capacity == 16 * MiB // 512
    chunks = {s: bytes(pattern(64 * 1024, s)) for s in (0, 129, 4096, 20000)}
    for sector, data in chunks.items():
        assert drv.request(0, [_hdr(T_OUT, sector), data], [1]).data == bytes([S_OK])
    assert drv.request(0, [_hdr(T_FLUSH)], [1]).data == bytes([S_OK])
    for sector, data in chunks.items():
        assert drv.request(0, [_hdr(T_IN, sector)], [len(data), 1]).data == data + bytes([S_OK])
    dev.close()
    srv.stop()
    check_image(image)
    for sector, data in chunks.items():
        expect = str(tmp_path / "expect")
        with open(expect, "wb") as f:
            f.write(data)
        out = subprocess.run(
            ["qemu-io", "-f", "qcow2", "-r", "-c", f"read -v {sector * 512} 16", image],
            capture_output=True,
            text=True,
        ).stdout
        assert out.split(":", 1)[1].split()[:16] == [f"{b:02x}" for b in data[:16]], out


def test_qcow2_over_an_export_with_block_size_constraints(tmp_path, servers):
    """nbdkit refuses (EINVAL) any request not a multiple of 4 KiB or larger than 64 KiB: qcow2's
    8-byte metadata writes are read-modify-written and 1 MiB requests split."""
    image = create_qcow2(str(tmp_path / "disk.qcow2"), 16 * MiB, "cluster_size=65536")
    os.truncate(image, 24 * MiB)
    srv = servers(
        nbdkit(
            tmp_path,
            image,
            "--filter=blocksize-policy",
            "blocksize-minimum=4096",
            "blocksize-preferred=4096",
            "blocksize-maximum=65536",
            "blocksize-error-policy=error",
        )
    )
    disk = open_disk(srv.uri)
    assert isinstance(disk, Qcow2Disk) and disk.f.align == 4096 and disk.f.max_transfer == 65536
    data = b"\x03" * MiB
    disk.writev(512 * 1024, [memoryview(bytearray(data))])
    out = bytearray(MiB)
    disk.readv(512 * 1024, [memoryview(out)])
    assert out == data
    disk.write_zeroes(512 * 1024, 4096, False)
    disk.close()
    srv.stop()
    check_image(image)
    qemu_io(image, "read -P 0 512k 4k", f"read -P 3 {512 * 1024 + 4096} 4k")


@pytest.mark.parametrize("mode, most", [("emulate", 4), ("disable", 1)])
def test_several_connections_only_where_the_server_allows_multi_conn(tmp_path, servers, mode, most):
    image = str(tmp_path / "disk.raw")
    with open(image, "wb") as f:
        f.write(bytes(pattern(MiB, 9)))
    srv = servers(
        nbdkit(
            tmp_path,
            image,
            "--filter=multi-conn",
            "--filter=delay",
            f"multi-conn-mode={mode}",
            "rdelay=200ms",
        )
    )
    disk = open_disk(srv.uri, options={"connections": 4})
    proto = disk.file
    assert proto.connections == most
    outs = [bytearray(4096) for _ in range(8)]
    threads = [
        threading.Thread(target=disk.readv, args=(i * 4096, [memoryview(o)])) for i, o in enumerate(outs)
    ]
    for t in threads:
        t.start()
    seen = 0
    while any(t.is_alive() for t in threads):
        seen = max(seen, proto.connections_open)
        threads[0].join(0.01)
    for t in threads:
        t.join()
    assert seen == most
    assert b"".join(outs) == bytes(pattern(MiB, 9))[: 8 * 4096]
    disk.close()


def test_a_server_killed_and_restarted_mid_io_loses_no_write(tmp_path, virtio_driver, servers, caplog):
    image = str(tmp_path / "disk.raw")
    with open(image, "wb") as f:
        f.truncate(16 * MiB)
    srv = servers(qemu_nbd(tmp_path, image))
    dev, drv = _device(virtio_driver, srv.uri, reconnect_timeout=20)
    expect = bytearray(16 * MiB)
    restarted = threading.Event()

    def restart():
        srv.start()
        restarted.set()

    timer = None
    for i in range(128):
        data = bytes(pattern(64 * 1024, i + 1))
        sector = (i * 97 % 256) * 128
        expect[sector * 512 : sector * 512 + len(data)] = data
        if i == 40:
            srv.kill()  # mid-I/O: the next writes find no server until it comes back
            timer = threading.Timer(1.0, restart)
            timer.start()
        assert drv.request(0, [_hdr(T_OUT, sector), data], [1], timeout=30).data == bytes([S_OK]), i
    assert restarted.is_set()
    assert drv.request(0, [_hdr(T_FLUSH)], [1], timeout=30).data == bytes([S_OK])
    dev.close()
    srv.stop()
    with open(str(tmp_path / "expect.raw"), "wb") as f:
        f.write(expect)
    qemu_img("compare", "-f", "raw", "-F", "raw", image, str(tmp_path / "expect.raw"))
    lost = [r for r in caplog.records if "NBD connection lost" in r.getMessage()]
    assert len(lost) == 1, [r.getMessage() for r in caplog.records]


def test_a_server_gone_for_good_fails_requests_with_eio_and_close_ends_waits(
    tmp_path, virtio_driver, servers
):
    image = str(tmp_path / "disk.raw")
    with open(image, "wb") as f:
        f.truncate(MiB)
    srv = servers(qemu_nbd(tmp_path, image))
    dev, drv = _device(virtio_driver, srv.uri, reconnect_timeout=0.5)
    srv.kill()
    u = drv.request(0, [_hdr(T_IN, 0)], [4096, 1], timeout=30)
    assert u.data[-1] == S_IOERR
    dev.close()

    # a request waiting for a long reconnect ends when the disk is closed (vdm's exit never hangs)
    srv.start()
    disk = open_disk(srv.uri, options={"reconnect_timeout": 3600})
    srv.kill()
    result: list[BaseException | int] = []
    t = threading.Thread(target=lambda: result.append(_read(disk)))
    t.start()
    while not disk.file._outage:
        t.join(0.05)
    disk.close()
    t.join(30)
    assert not t.is_alive()
    assert isinstance(result[0], OSError) and result[0].errno == errno.EIO, result


def test_a_server_that_stops_answering_fails_requests_after_the_timeouts(tmp_path, servers):
    """SIGSTOP: the socket stays open and nothing answers, neither requests nor new handshakes."""
    image = str(tmp_path / "disk.raw")
    with open(image, "wb") as f:
        f.truncate(MiB)
    srv = servers(qemu_nbd(tmp_path, image))
    disk = open_disk(srv.uri, options={"reconnect_timeout": 1, "request_timeout": 1})
    os.kill(srv.proc.pid, signal.SIGSTOP)
    try:
        got = _read(disk)
    finally:
        os.kill(srv.proc.pid, signal.SIGCONT)
    assert isinstance(got, OSError) and got.errno == errno.EIO, got
    assert "no reply in 1 s" in str(got) or "no answer to the handshake" in str(got), got
    assert _read(disk) == 4096  # the server answers again: so does the disk
    disk.close()


def _read(disk) -> BaseException | int:
    try:
        return disk.readv(0, [memoryview(bytearray(4096))])
    except BaseException as e:
        return e


@pytest.mark.parametrize("mode", ["wrong_handle", "short", "oversized", "bad_magic"])
def test_a_lying_server_gets_a_clear_error_and_nothing_outside_the_request_is_written(tmp_path, mode, caplog):
    from vdm_blk.backends.nbd import NbdProtocol

    srv = LyingServer(tmp_path, mode)
    try:
        p = NbdProtocol(srv.uri, reconnect_timeout=0.3)
        errors = []
        for _ in range(2):  # an oversized reply is noticed at the next reply
            guest = bytearray(b"\x11" * 3 * 4096)
            try:
                p.preadv([memoryview(guest)[4096:8192]], 0)
            except OSError as e:
                errors.append(e)
            assert guest[:4096] == b"\x11" * 4096 and guest[8192:] == b"\x11" * 4096
        p.close()
    finally:
        srv.close()
    lines = [
        r.getMessage()
        for r in caplog.records
        if r.name == "vdm_blk.backends.nbd" and "lost" in r.getMessage()
    ]
    assert lines, caplog.text
    if mode == "oversized":
        # the extra bytes are not a reply: the connection is dropped at the next reply's header
        # ("invalid reply magic") and that request is served again on a fresh connection
        assert "invalid reply magic" in lines[0], lines
    else:
        assert errors and all(e.errno == errno.EIO and "NBD server unreachable" in str(e) for e in errors), (
            errors
        )
    print(mode, "->", errors[0] if errors else "served again", "|", lines[0])


def test_a_read_only_export_needs_ro(tmp_path, servers):
    image = str(tmp_path / "disk.raw")
    with open(image, "wb") as f:
        f.truncate(MiB)
    srv = servers(nbdkit(tmp_path, image, "-r"))
    with pytest.raises(DiskError, match="read-only; open it with ro"):
        open_disk(srv.uri)
    disk = open_disk(srv.uri, read_only=True)
    assert disk.read_only and not disk.supports_discard
    disk.close()


def test_without_libnbd_blk_stays_available_and_nbd_says_why(tmp_path):
    code = (
        "from vdm_blk.backends import catalog, open_disk, DiskError\n"
        "print(catalog()['protocols'])\n"
        "try:\n    open_disk('nbd+unix:///?socket=/nonexistent.sock')\n"
        "except DiskError as e:\n    print(e)\n"
        "print(open_disk(__import__('sys').argv[1]).size)\n"
    )
    image = str(tmp_path / "disk.raw")
    with open(image, "wb") as f:
        f.truncate(MiB)
    env = {**os.environ, "VDM_LIBNBD": str(tmp_path / "no-libnbd.so.0")}
    p = subprocess.run([sys.executable, "-c", code, image], capture_output=True, text=True, env=env)
    assert p.returncode == 0, p.stderr
    lines = p.stdout.splitlines()
    # other protocols (rbd) may follow
    assert lines[0].startswith("{'file': None, 'nbd': 'libnbd not found (apt install libnbd0)'")
    assert lines[1] == (
        "nbd+unix:///?socket=/nonexistent.sock: the nbd protocol is unavailable here: "
        "libnbd not found (apt install libnbd0)"
    )
    assert lines[2] == str(MiB)
    assert catalog()["protocols"]["nbd"] is None  # here libnbd is installed


def test_unknown_uri_scheme_and_direct_are_refused_with_one_line(tmp_path):
    with pytest.raises(
        DiskError, match=r"unknown protocol 'nfs' \(URI schemes vdm-blk knows: nbd, nbd\+unix"
    ):
        open_disk("nfs://server/export")
    with pytest.raises(DiskError, match="direct/cache=none is for local files"):
        open_disk("nbd+unix:///?socket=/nonexistent.sock", direct=True)
    with pytest.raises(DiskError, match="cannot connect to the NBD server"):
        open_disk(f"nbd+unix:///?socket={tmp_path}/none.sock")


def test_list_plugins_says_whether_nbd_is_usable_here(tmp_path):
    """Issue 17: without libnbd, blk is listed available with `nbd: unavailable: <why>`."""
    env = {**os.environ, "VDM_LIBNBD": str(tmp_path / "no-libnbd.so.0"), "VDM_PLUGINS": "blk"}
    vdm = [sys.executable, "-m", "vdm.cli.main", "list-plugins"]
    p = subprocess.run(vdm, capture_output=True, text=True, env=env)
    assert p.returncode == 0, p.stderr
    row = next(ln for ln in p.stdout.splitlines() if ln.startswith("blk "))
    # the first note (vdm-blk's compiled serve step may add one after it: test_list_plugins_fastpath.py)
    assert "available (nbd: unavailable: libnbd not found (apt install libnbd0)" in row
    p = subprocess.run([*vdm, "--json"], capture_output=True, text=True, env={**env, "VDM_LIBNBD": ""})
    (blk,) = [r for r in json.loads(p.stdout)["plugins"] if r["name"] == "blk"]
    assert blk["status"].split(" (")[0] == "available"  # notes of other parts may follow
    protocols = blk["parts"]["blk"]["protocols"]
    assert {k: protocols[k] for k in ("file", "nbd")} == {"file": "available", "nbd": "available"}
    assert blk["parts"]["blk"]["formats"] == {"raw": "available", "qcow2": "available"}
