"""``vdm vhost-user --connect PATH`` (issue 16 item 6): vdm connects to a frontend that listens,
waits for it to appear, and connects again whenever the connection ends.

Guest-free: a listening socket in tmp plays the frontend (GET_FEATURES, then it hangs up, a
second time after it went away and came back). Real guest (QEMU 7.2 TCG): QEMU's
``-chardev socket,server=on,wait=off`` with vhost-user-blk; vdm started before QEMU exists, two
QEMUs one after the other on the same path, each guest's blk workload checked; the second vdm
connects to the second QEMU without being restarted. The test's name keeps it with the ctl tests
(it also checks ``vdm ctl list`` across the reconnect).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import vdm_lab
from vdm.cli.ctl import request
from vdm.testing import EchoDevice
from vdm_vhost_user import protocol as p
from vdm_vhost_user.protocol import Req
from vdm_vhost_user.server import VhostUserServer

from tests.realguest.conftest import kit, qemu  # noqa: F401 - the session fixtures

MIB = 1 << 20


def _listen(path: str) -> socket.socket:
    s = socket.socket(socket.AF_UNIX)
    s.bind(path)
    s.listen(1)
    s.settimeout(10)
    return s


def _get_features(conn: socket.socket) -> int:
    conn.settimeout(10)
    conn.sendall(p.HEADER.pack(Req.GET_FEATURES, p.VERSION, 0))
    data = b""
    while len(data) < p.HEADER.size + 8:
        chunk = conn.recv(64)
        assert chunk, "the backend hung up"
        data += chunk
    req, flags, size = p.HEADER.unpack_from(data)
    assert (req, size) == (Req.GET_FEATURES, 8) and flags & p.FLAG_REPLY
    return p.U64.unpack_from(data, p.HEADER.size)[0]


def test_connects_waits_and_reconnects(tmp_path: Path) -> None:
    path = str(tmp_path / "fe.sock")
    server = VhostUserServer(path, EchoDevice(), connect=True).start()
    try:
        time.sleep(0.3)  # vdm is trying meanwhile: nobody listens yet
        assert server.connections == 0
        listener = _listen(path)
        conn, _ = listener.accept()
        assert _get_features(conn) >> p.F_PROTOCOL_FEATURES & 1
        conn.close()  # the frontend hangs up: vdm connects again
        conn2, _ = listener.accept()
        assert _get_features(conn2)
        conn2.close()
        listener.close()
        os.unlink(path)  # the frontend is gone; a new one comes later on the same path
        assert server.wait_for(lambda s: s.conn is None)
        time.sleep(0.3)
        listener = _listen(path)
        conn3, _ = listener.accept()
        assert _get_features(conn3)
        assert server.wait_for(lambda s: s.connections == 3)
    finally:
        server.close()
    assert os.path.exists(path), "the frontend's socket is left alone"
    conn3.close()
    listener.close()


class _Vdm:
    def __init__(self, *argv: str) -> None:
        cmd = [sys.executable, "-m", "vdm.cli.main", "-v", "vhost-user", *argv]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.lines: list[str] = []
        self.serving = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))
            if line.startswith("vdm: serving"):
                self.serving.set()

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return -9


@pytest.mark.realguest
@pytest.mark.slow
def test_qemu_listens_and_vdm_connects_to_two_qemus(kit: vdm_lab.GuestKit, tmp_path: Path) -> None:  # noqa: F811
    image = tmp_path / "vda.img"
    with open(image, "wb") as f:
        f.truncate(32 * MIB)
    sock, ctl = tmp_path / "vda.sock", str(tmp_path / "vdm.ctl")
    vdm = _Vdm("--connect", str(sock), "--disk", str(image), "--control", ctl)
    try:
        assert vdm.serving.wait(20), "\n".join(vdm.lines)
        args = [
            "-chardev",
            f"socket,id=c0,path={sock},server=on,wait=off",
            "-device",
            "vhost-user-blk-pci,chardev=c0",
        ]
        for _ in range(2):
            r = vdm_lab.run_qemu(args, ["blk"], {"mib": 4, "dev": "/dev/vda"}, timeout=150, kit=kit)
            r.assert_ok("blk")
            assert r["blk"]["readback"] == "match", r.describe()
            assert request(ctl, "list")["devices"][0]["id"] == "blk0"
        requests = request(ctl, "stats")["devices"][0]["queues"][0]["requests"]
        assert requests > 0
    finally:
        rc = vdm.stop()
    out = "\n".join(vdm.lines)
    assert rc == 0, out
    assert out.count("frontend connected") >= 2, out
    assert "waiting for a frontend to listen on" in out, out
    assert "closing the connection" not in out, out
