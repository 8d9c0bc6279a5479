"""Several devices from one ``vdm vhost-user`` process (issue 16 item 1).

Each device has its own socket and connection on the one event loop (or, with
``--loop-per-device``, on an event loop thread of its own); a frontend that breaks the protocol,
disconnects or dies in the middle of its I/O loses only its own connection.
"""

from __future__ import annotations

import logging
import os
import socket
import struct
import subprocess
import sys
import time

import pytest
from vdm.eventloop import EventLoop
from vdm.registry import DeviceContext
from vdm_blk.config import BlkConfig
from vdm_blk.device import S_OK, T_IN, T_OUT
from vdm_blk.plugin import create as create_blk
from vdm_vhost_user import server as vu_server
from vdm_vhost_user.protocol import HEADER, VERSION, Req
from vdm_vhost_user.server import VhostUserServer

from tests.realguest.conftest import kit, qemu, qemu_frontend  # noqa: F401 - the session fixtures
from tests.vhost_user.frontend import Frontend
from tests.vhost_user.vdmproc import VdmProcess

VDM = [sys.executable, "-m", "vdm.cli.main"]


def hdr(rtype: int, sector: int = 0) -> bytes:
    return struct.pack("<IIQ", rtype, 0, sector)


def make_image(path, fill: int, size: int = 1 << 20) -> str:
    with open(path, "wb") as f:
        f.write(bytes([fill]) * 4096)
        f.truncate(size)
    return str(path)


def read0(fe: Frontend) -> bytes:
    u = fe.request(0, [hdr(T_IN, 0)], [512, 1])
    assert u.data[-1] == S_OK
    return u.data[:512]


@pytest.fixture(params=["one loop", "loop per device"])
def two_servers(request, tmp_path):
    """Two blk devices served from one event loop, as ``vdm vhost-user`` with two -s does, or each
    from its own (``--loop-per-device``: the server makes and stops its loop)."""
    loop = EventLoop("test-two").start() if request.param == "one loop" else None
    devices, servers = [], []
    for i, fill in enumerate((0xA1, 0xB2)):
        dev = create_blk(BlkConfig(path=make_image(tmp_path / f"{i}.img", fill)), DeviceContext(vmm=None))
        devices.append(dev)
        servers.append(VhostUserServer(str(tmp_path / f"{i}.sock"), dev, loop).start())
    yield servers
    for s in servers:
        s.close()
    if loop is not None:
        loop.stop()
    for d in devices:
        d.close()


def _frontend(path: str) -> Frontend:
    fe = Frontend(path)
    fe.start(queues={0: 64})
    return fe


def _close(*fes: Frontend) -> None:
    for fe in fes:
        fe.close()
        fe.ram.close()


@pytest.mark.parametrize("misbehave", ["bad message", "disconnect in the middle of I/O", "bad ring address"])
def test_one_frontend_misbehaving_leaves_the_other_device_serving(two_servers, misbehave):
    a_srv, b_srv = two_servers
    a, b = _frontend(a_srv.path), _frontend(b_srv.path)
    try:
        assert read0(a) == b"\xa1" * 512 and read0(b) == b"\xb2" * 512
        # b has requests of its own waiting while a misbehaves
        for i in range(8):
            b.post(0, [hdr(T_OUT, 8 + i), bytes([i]) * 512], [1], kick=False)
        if misbehave == "bad message":
            a.send(Req.SET_VRING_NUM, b"\x00" * 3)  # wrong payload size
            assert a.closed_by_backend()
        elif misbehave == "disconnect in the middle of I/O":
            for i in range(8):
                a.post(0, [hdr(T_IN, i)], [4096, 1])
            a.sock.close()
        else:
            a.send(Req.SET_VRING_ADDR, struct.pack("<IIQQQQ", 0, 0, 1 << 60, 1 << 60, 1 << 60, 0))
            assert a.closed_by_backend()
        assert a_srv.wait_for(lambda s: s.conn is None)
        b.kick(0)
        used = b.wait_used(0, 8)
        assert all(u.data == bytes([S_OK]) for u in used)
        assert read0(b) == b"\xb2" * 512
        assert b_srv.rejected == 0 and b_srv.connections == 1
        # and a's device takes its next frontend
        a2 = _frontend(a_srv.path)
        assert read0(a2) == b"\xa1" * 512
        _close(a2)
    finally:
        _close(a, b)


@pytest.mark.parametrize("withheld", ["payload", "half the header"])
def test_a_frontend_stalled_mid_message_holds_up_only_its_own_device(two_servers, withheld, caplog,
                                                                     monkeypatch):
    """Frontend a sends part of a message and withholds the rest; b's requests are served
    meanwhile, while a is still connected, on one shared loop as with --loop-per-device. a's
    message timeout then ends a alone, with one log line. The timeout is 4 s here instead of vdm's
    10: the same timer ends the connection, and the four cases waited 10 s each on it."""
    monkeypatch.setattr(vu_server, "MESSAGE_TIMEOUT", 4.0)
    a_srv, b_srv = two_servers
    a, b = _frontend(a_srv.path), _frontend(b_srv.path)
    caplog.set_level(logging.INFO)
    try:
        header = HEADER.pack(Req.SET_FEATURES, VERSION, 8)
        a.send_raw(header if withheld == "payload" else header[:5])  # the rest never comes
        time.sleep(0.3)  # a's message is open by now
        for i in range(8):
            b.post(0, [hdr(T_OUT, 8 + i), bytes([i]) * 512], [1])
        used = b.wait_used(0, 8, timeout=5)
        assert all(u.data == bytes([S_OK]) for u in used)
        assert read0(b) == b"\xb2" * 512
        assert a_srv.conn is not None and a_srv.rejected == 0, "a was cut off before b was served"
        assert a_srv.wait_for(lambda s: s.rejected == 1, 15)  # and then a's timeout ends a alone
        assert a.closed_by_backend() and a_srv.wait_for(lambda s: s.conn is None)
        assert b_srv.rejected == 0 and read0(b) == b"\xb2" * 512
        what = "SET_FEATURES" if withheld == "payload" else "a message header"
        errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
        assert errors == [f"vhost-user: timed out waiting for the rest of {what}; closing the connection"]
    finally:
        _close(a, b)


def test_a_frontend_that_never_reads_its_replies_holds_up_only_its_own_device(two_servers, caplog):
    """Frontend a sends request after request and reads none of the replies, until its socket's
    buffers are full; b's requests are served meanwhile and a's connection is closed with one log
    line as soon as a reply cannot be sent (a frontend reads each reply before it needs the next)."""
    a_srv, b_srv = two_servers
    a, b = _frontend(a_srv.path), _frontend(b_srv.path)
    caplog.set_level(logging.INFO)
    try:
        a.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        a.sock.settimeout(0.5)
        request = HEADER.pack(Req.GET_FEATURES, VERSION, 0)
        sent = 0
        try:
            while sent < 20000:  # far more replies than a's and vdm's buffers hold
                a.send_raw(request)
                sent += 1
        except (socket.timeout, BrokenPipeError, ConnectionResetError):
            pass  # vdm stopped reading a (blocked on a reply) or closed it
        for i in range(8):
            b.post(0, [hdr(T_OUT, 8 + i), bytes([i]) * 512], [1])
        used = b.wait_used(0, 8, timeout=5)
        assert all(u.data == bytes([S_OK]) for u in used)
        assert a_srv.wait_for(lambda s: s.conn is None, 5), f"a still connected after {sent} unread replies"
        assert b_srv.rejected == 0 and read0(b) == b"\xb2" * 512
        errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
        assert len(errors) == 1 and "does not read its replies" in errors[0], errors
    finally:
        _close(a, b)


@pytest.mark.parametrize("loops", [[], ["--loop-per-device"]], ids=["one loop", "loop per device"])
def test_the_command_serves_two_disks_each_on_its_socket(tmp_path, loops):
    a_img, b_img = make_image(tmp_path / "a.img", 0x11), make_image(tmp_path / "b.img", 0x22)
    a_sock, b_sock = str(tmp_path / "a.sock"), str(tmp_path / "b.sock")
    vdm = VdmProcess(a_sock, "--disk", a_img, "-s", b_sock, "--disk", f"{b_img},ro", *loops)
    try:
        deadline = time.monotonic() + 10  # VdmProcess returns at the first "serving" line
        while vdm.count("vdm: serving") < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert os.path.exists(b_sock) and vdm.count("vdm: serving") == 2, vdm.output
        a, b = _frontend(a_sock), _frontend(b_sock)
        assert read0(a) == b"\x11" * 512 and read0(b) == b"\x22" * 512
        # b is read-only, a is not: each device has its own options
        assert b.request(0, [hdr(T_OUT, 0), bytes(512)], [1]).data != bytes([S_OK])
        assert a.request(0, [hdr(T_OUT, 0), b"\x33" * 512], [1]).data == bytes([S_OK])
        a.send(Req.SET_VRING_NUM, b"\x00")  # a breaks the protocol
        assert a.closed_by_backend()
        assert read0(b) == b"\x22" * 512
        _close(a, b)
    finally:
        assert vdm.stop() == 0, vdm.output
    assert not os.path.exists(a_sock) and not os.path.exists(b_sock)
    with open(a_img, "rb") as f:
        assert f.read(512) == b"\x33" * 512


def test_loop_per_device_gives_each_device_a_thread_of_its_own(tmp_path):
    """Three disks: --loop-per-device runs two threads more than one loop for all (the same
    process otherwise, before any frontend connects; Python names no OS thread, so they are counted)."""
    counts = []
    for loops in ([], ["--loop-per-device"]):
        args, first = [], ""
        for i in range(3):
            sock = str(tmp_path / f"{len(counts)}-{i}.sock")
            img = make_image(tmp_path / f"{len(counts)}-{i}.img", i)
            args += ([] if i == 0 else ["-s", sock]) + ["--disk", img]
            first = first or sock
        vdm = VdmProcess(first, *args, *loops)
        try:
            deadline = time.monotonic() + 10
            while vdm.count("vdm: serving") < 3 and time.monotonic() < deadline:
                time.sleep(0.05)
            assert vdm.count("vdm: serving") == 3, vdm.output
            counts.append(len(os.listdir(f"/proc/{vdm.proc.pid}/task")))
        finally:
            assert vdm.stop() == 0, vdm.output
    assert counts[1] - counts[0] == 2, counts


def test_a_toml_file_names_each_devices_socket(tmp_path):
    a_img, b_img = make_image(tmp_path / "a.img", 0x44), make_image(tmp_path / "b.img", 0x55)
    conf = tmp_path / "devices.toml"
    conf.write_text(
        '[[device]]\ntype = "disk"\nsocket = "a.sock"\npath = "a.img"\n\n'
        '[[disk]]\nsocket = "b.sock"\npath = "b.img"\nro = true\n'
    )
    a_sock, b_sock = str(tmp_path / "a.sock"), str(tmp_path / "b.sock")
    proc = subprocess.Popen([*VDM, "vhost-user", str(conf)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        a, b = Frontend(a_sock), Frontend(b_sock)  # (waits for the sockets)
        a.start(queues={0: 16})
        b.start(queues={0: 16})
        assert read0(a) == b"\x44" * 512 and read0(b) == b"\x55" * 512
        _close(a, b)
    finally:
        proc.terminate()
        out = proc.communicate(timeout=20)[0].decode()
    assert proc.returncode == 0, out
    assert a_img and b_img


@pytest.mark.parametrize(
    "args, message",
    [
        (["-s", "{a}", "--disk", "{img}", "-s", "{a}", "--disk", "{img2}"], "given twice"),
        (["-s", "{a}", "--disk", "{img}", "--disk", "{img2}", "-s", "{b}"], "2 devices given"),
        (["-s", "{a}", "--disk", "{img}", "-s", "{b}"], "0 devices given"),
        (["{toml}"], "give its socket"),
    ],
)
def test_wrong_groups_are_one_clear_line(tmp_path, args, message):
    img, img2 = make_image(tmp_path / "x.img", 0), make_image(tmp_path / "y.img", 0)
    toml = tmp_path / "d.toml"
    toml.write_text('[[device]]\ntype = "disk"\npath = "x.img"\n')
    names = {"a": str(tmp_path / "a.sock"), "b": str(tmp_path / "b.sock"), "img": img, "img2": img2,
             "toml": str(toml)}
    r = subprocess.run([*VDM, "vhost-user", *(a.format(**names) for a in args)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and message in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not os.path.exists(names["a"]) and not os.path.exists(names["b"])


@pytest.mark.realguest
@pytest.mark.slow
def test_guest_on_two_disks_served_by_one_vdm(kit, qemu_frontend, tmp_path):  # noqa: F811
    """A real guest (QEMU 7.2 and 10.0) writes one disk and builds ext2 on the other, both served
    by one ``vdm vhost-user`` process; the host then checks what landed in each image."""
    import hashlib

    import vdm_lab

    fe = qemu_frontend
    vda, vdb = tmp_path / "vda.img", tmp_path / "vdb.img"
    for img in (vda, vdb):
        with open(img, "wb") as f:
            f.truncate(32 << 20)
    a_sock, b_sock = tmp_path / "vda.sock", tmp_path / "vdb.sock"
    vdm = VdmProcess(str(a_sock), "--disk", str(vda), "-s", str(b_sock), "--disk", str(vdb))
    try:
        r = vdm_lab.run_qemu(
            vdm_lab.vhost_user_blk_args(a_sock, 0) + vdm_lab.vhost_user_blk_args(b_sock, 1),
            ["blk", "fs"],
            {"mib": 8, "dev": "/dev/vda", "fsdev": "/dev/vdb", "fsmib": 4, "fsfiles": 16},
            timeout=150, kit=kit, qemu=fe, visible=[tmp_path],
        )
    finally:
        rc = vdm.stop()
    r.assert_ok("blk", "fs")
    assert rc == 0 and vdm.count("frontend connected") == 2, f"{fe}\n{vdm.output}"
    assert vdm.count("closing the connection") == 0, f"{fe}\n{vdm.output}"
    assert r["blk"]["readback"] == "match"
    with open(vda, "rb") as f:
        assert hashlib.md5(f.read(8 << 20)).hexdigest() == r["blk"]["md5"], f"{fe}: vda lacks the data"
    fs = r["fs"]
    assert fs["fsck_rc"] == "0" and fs["verify_rc"] == "0" and fs["files"] == "17"
    with open(vdb, "rb") as f:
        f.seek(1024 + 56)
        assert f.read(2) == b"\x53\xef", f"{fe}: vdb holds no ext2 file system"
