"""The control socket (vdm.control) and `vdm ctl`: counters that match what the driver did, the
Prometheus text, and clients that misbehave (garbage, unknown commands, never reading) closed with
one log line while the others are still served. A real server on a socket in tmp, a real device
driven through vdm.testing."""

from __future__ import annotations

import json
import logging
import os
import socket
import stat
import subprocess
import sys
import time
from dataclasses import dataclass

import pytest
from vdm.cli.ctl import parse_size, request
from vdm.control import MAX_PENDING
from vdm.errors import UserError
from vdm.registry import DeviceContext, DeviceType
from vdm.session import DeviceSet
from vdm.testing import EchoDevice, VirtioTestDriver


@dataclass
class _Cfg:
    hold: bool = False


ECHO = DeviceType(name="echo", config=_Cfg, create=lambda cfg, ctx: EchoDevice(hold=cfg.hold))


@pytest.fixture
def served(tmp_path):
    """Two echo devices in a DeviceSet with its control socket."""
    path = str(tmp_path / "vdm.ctl")
    with DeviceSet() as devices:
        a = devices.create(ECHO, _Cfg(), DeviceContext())
        b = devices.create(ECHO, _Cfg(hold=True), DeviceContext())
        server = devices.serve_control(path)
        yield path, devices, server, a, b
    assert not os.path.exists(path), "the socket file is removed when the set closes"


def _lines(sock: socket.socket, n: int, timeout: float = 5) -> list[dict]:
    sock.settimeout(timeout)
    data = b""
    while data.count(b"\n") < n:
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    return [json.loads(x) for x in data.splitlines()]


def test_counters_match_what_the_driver_did(served):
    path, _devices, _server, a, b = served
    drv = VirtioTestDriver(a)
    drv.init()
    sent = [os.urandom(n) for n in (1, 100, 4096, 513, 7)]
    for data in sent:
        drv.request(0, [data], [len(data) + 10])
    held = VirtioTestDriver(b)
    held.init()
    held.submit(0, [b"x" * 30], [64])
    held.submit(0, [b"y" * 20], [64])
    b.wait_seen(2)

    listing = request(path, "list")["devices"]
    assert [(d["id"], d["type"]) for d in listing] == [("echo0", "echo"), ("echo1", "echo")]
    assert "DRIVER_OK" in listing[0]["status_names"] and listing[0]["running"] is True
    assert listing[0]["queues"] == [{"index": 0, "size": 16, "ready": True, "active": True}]

    stats = {d["id"]: d["queues"][0] for d in request(path, "stats")["devices"]}
    q = stats["echo0"]
    assert q["requests"] == q["completed"] == len(sent)
    assert q["bytes_read"] == q["bytes_written"] == sum(map(len, sent))
    assert q["errors"] == 0 and q["in_flight"] == 0
    assert sum(n for _, n in q["latency_ns"]) == len(sent)
    h = stats["echo1"]
    assert (h["requests"], h["completed"], h["in_flight"], h["bytes_read"]) == (2, 0, 2, 50)

    b.complete_all()
    held.wait(0, 2)
    h = request(path, "stats")["devices"][1]["queues"][0]
    assert (h["completed"], h["in_flight"], h["bytes_written"]) == (2, 0, 50)


def test_guest_errors_are_counted(served):
    path, _devices, _server, a, _b = served
    drv = VirtioTestDriver(a)
    drv.init()
    drv.write_desc(0, 0, 0x7FFF_FFFF_0000, 16, 0, 0)  # a buffer outside guest RAM
    drv.publish(0, 0)
    drv.kick(0)
    assert drv.needs_reset
    q = request(path, "stats")["devices"][0]["queues"][0]
    assert q["errors"] == 1 and q["requests"] == 0


def test_metrics_is_prometheus_text(served):
    path, _devices, _server, a, _b = served
    drv = VirtioTestDriver(a)
    drv.init()
    for _ in range(3):
        drv.request(0, [b"abcd"], [4])
    text = request(path, "metrics")["text"]
    assert "# TYPE vdm_queue_requests_total counter" in text
    assert 'vdm_queue_requests_total{device="echo0",type="echo",queue="0"} 3' in text
    assert 'vdm_queue_read_bytes_total{device="echo0",type="echo",queue="0"} 12' in text
    assert 'vdm_queue_latency_seconds_bucket{device="echo0",type="echo",queue="0",le="+Inf"} 3' in text
    assert 'vdm_queue_latency_seconds_count{device="echo0",type="echo",queue="0"} 3' in text
    # buckets are cumulative and end at the count
    buckets = [
        int(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith('vdm_queue_latency_seconds_bucket{device="echo0"')
    ]
    assert buckets == sorted(buckets) and buckets[-1] == 3


def test_socket_is_private(served):
    path = served[0]
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600


@pytest.mark.parametrize(
    "line, said",
    [
        (b"this is not json\n", "not a request"),
        (b'["execute", "list"]\n', "not a request"),
        (b'{"execute": "reboot"}\n', "unknown command 'reboot'"),
        (b"\xff\xfe\x00garbage\n", "not a request"),
    ],
)
def test_bad_request_closes_that_client_only(served, caplog, line, said):
    path, _devices, server, _a, _b = served
    good = socket.socket(socket.AF_UNIX)
    good.connect(path)
    bad = socket.socket(socket.AF_UNIX)
    bad.connect(path)
    with caplog.at_level(logging.WARNING, logger="vdm.control"):
        bad.sendall(line)
        (reply,) = _lines(bad, 1)
        assert said in reply["error"]["desc"]
        assert bad.recv(100) == b"", "the bad client is closed"
    assert [r.getMessage() for r in caplog.records if r.name == "vdm.control"] == [
        f"control: client closed: {reply['error']['desc']}"
    ]
    good.sendall(b'{"execute": "list", "id": 7}\n')
    (ok,) = _lines(good, 1)
    assert ok["id"] == 7 and len(ok["return"]["devices"]) == 2
    good.close()
    bad.close()
    assert server.dropped == 1


def test_a_command_error_keeps_the_client(served):
    path = served[0]
    s = socket.socket(socket.AF_UNIX)
    s.connect(path)
    s.sendall(b'{"execute": "resize", "arguments": {"device": "nope", "size": 1}}\n')
    s.sendall(b'{"execute": "resize", "arguments": {"device": "echo0", "size": 4096}}\n')
    s.sendall(b'{"execute": "list"}\n')
    r1, r2, r3 = _lines(s, 3)
    assert "no device 'nope' (devices: echo0, echo1)" in r1["error"]["desc"]
    assert r2["error"]["desc"] == "echo0: this device cannot be resized"
    assert "return" in r3
    s.close()


def test_long_line_and_client_that_never_reads_are_closed(served, caplog):
    path, _devices, server, _a, _b = served
    long_line = socket.socket(socket.AF_UNIX)
    long_line.connect(path)
    long_line.sendall(b"x" * (70 * 1024))
    # a client that sends requests and never reads its replies: closed once MAX_PENDING is queued
    hog = socket.socket(socket.AF_UNIX)
    hog.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    hog.connect(path)
    hog.setblocking(False)
    req = b'{"execute": "metrics"}\n' * 64
    sent_until_closed = 0
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            sent_until_closed += hog.send(req)
        except BlockingIOError:
            time.sleep(0.01)
        except (BrokenPipeError, ConnectionResetError):
            break
        if server.dropped >= 2:
            break
    assert server.dropped == 2, "the long line and the client that never reads are closed"
    assert sent_until_closed > 0
    msgs = [r.getMessage() for r in caplog.records if r.name == "vdm.control"]
    assert any("longer than 65536 bytes" in m for m in msgs)
    assert any("does not read its replies" in m for m in msgs)
    assert request(path, "stats")["devices"][0]["id"] == "echo0", "still serving"
    hog.close()
    long_line.close()
    assert MAX_PENDING >= 1 << 20


def test_control_path_checks(tmp_path):
    from vdm.control import check_control_path

    with pytest.raises(UserError, match="no such folder"):
        check_control_path(str(tmp_path / "nope" / "x.ctl"))
    (tmp_path / "file").write_text("")
    with pytest.raises(UserError, match="exists and is not a socket"):
        check_control_path(str(tmp_path / "file"))
    with pytest.raises(UserError, match="longer than 107 bytes"):
        check_control_path(str(tmp_path / ("x" * 120)))


def test_parse_size():
    assert parse_size("2G") == 2 << 30
    assert parse_size("512MiB") == 512 << 20
    assert parse_size("4096") == 4096
    for bad in ("0", "-1G", "lots", "1.3"):
        with pytest.raises(UserError, match="a whole number of bytes"):
            parse_size(bad)


def test_vdm_ctl_command(served):
    path, _devices, _server, a, _b = served
    drv = VirtioTestDriver(a)
    drv.init()
    drv.request(0, [b"hello"], [5])
    env = {**os.environ, "VDM_CONTROL": path}

    def ctl(*argv: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "vdm.cli.main", "ctl", *argv], env=env, capture_output=True, text=True
        )

    out = ctl("list")
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines()[0].split()[:3] == ["echo0", "echo", "running"]
    out = ctl("stats")
    row = next(line.split() for line in out.stdout.splitlines() if line.startswith("echo0"))
    assert row[1:7] == ["0", "1", "5", "5", "0", "0"]
    out = ctl("--json", "stats")
    assert json.loads(out.stdout)["devices"][0]["queues"][0]["requests"] == 1
    out = ctl("resize", "echo1", "1G")
    assert (
        out.returncode == 1 and out.stderr.strip() == "vdm: ctl: resize: echo1: this device cannot be resized"
    )
    out = ctl("--control", path + ".nope", "list")
    assert out.returncode == 1 and "cannot connect to" in out.stderr


# ---- commands a device offers (vdm.control.Controllable) --------------------------------------


class _PokeDevice(EchoDevice):
    """An echo device with its own control command ``poke`` (and one that tries to shadow ``list``)."""

    def __init__(self) -> None:
        super().__init__()
        self.poked: list[int] = []

    def control_commands(self):
        return {"poke": self._poke, "list": lambda args: "shadowed"}

    def _poke(self, args):
        n = args.get("n")
        if not isinstance(n, int) or n < 0:
            raise ValueError(f"n {n!r}: a number >= 0")
        self.poked.append(n)
        return {"n": n, "args": sorted(args)}


class _BrokenCommands(EchoDevice):
    def control_commands(self):
        raise RuntimeError("a plugin bug")


POKE = DeviceType(name="poke", config=_Cfg, create=lambda cfg, ctx: _PokeDevice())
BROKEN = DeviceType(name="broken", config=_Cfg, create=lambda cfg, ctx: _BrokenCommands())


def test_a_device_offers_its_own_command(tmp_path, caplog):
    path = str(tmp_path / "vdm.ctl")
    with DeviceSet() as devices:
        devices.create(ECHO, _Cfg(), DeviceContext())
        poke = devices.create(POKE, _Cfg(), DeviceContext())
        devices.create(BROKEN, _Cfg(), DeviceContext())
        devices.serve_control(path)
        # the device gets its arguments without "device"; the reply names the device
        reply = request(path, "poke", {"device": "poke0", "n": 3})
        assert reply == {"device": "poke0", "n": 3, "args": ["n"]}
        assert poke.poked == [3]
        listing = {d["id"]: d for d in request(path, "list")["devices"]}  # "list" is still the core's
        assert listing["poke0"]["commands"] == ["poke"] and "commands" not in listing["echo0"]
        assert "commands" not in listing["broken0"]
        assert any("control_commands() failed" in r.getMessage() for r in caplog.records)
        s = socket.socket(socket.AF_UNIX)
        s.connect(path)
        s.sendall(b'{"execute": "poke", "arguments": {"device": "poke0", "n": -1}}\n')
        s.sendall(b'{"execute": "poke", "arguments": {"device": "echo0", "n": 1}}\n')
        s.sendall(b'{"execute": "poke", "arguments": {"device": "nope"}}\n')
        s.sendall(b'{"execute": "stats"}\n')
        r1, r2, r3, r4 = _lines(s, 4)
        assert r1["error"]["desc"] == "poke0: n -1: a number >= 0"  # the client stays
        assert r2["error"]["desc"] == "echo0: this device has no command 'poke'"
        assert "no device 'nope'" in r3["error"]["desc"]
        assert "return" in r4 and poke.poked == [3]
        s.sendall(b'{"execute": "jump", "arguments": {"device": "poke0"}}\n')
        (r5,) = _lines(s, 1)  # a command no device offers is unknown, as before: that client closes
        assert r5["error"]["class"] == "CommandNotFound"
        assert s.recv(10) == b""
        s.close()
