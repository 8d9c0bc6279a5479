"""The TCP peer the real-guest net tests and benchmarks use, driven from loopback like the guest's nc."""

from __future__ import annotations

import hashlib
import os
import re
import socket
import subprocess
import sys

from tests.net.tcp_peer import TcpPeer, listen

TCP_PEER = os.path.join(os.path.dirname(__file__), "tcp_peer.py")


def guest_side(port: int, upload: bytes) -> bytes:
    """What the guest kit's ``nettcp both`` does: read one file until EOF, then send one."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as c:
        got = b""
        while chunk := c.recv(65536):
            got += chunk
    with socket.create_connection(("127.0.0.1", port), timeout=10) as c:
        c.sendall(upload)
    return got


def test_peer_sends_its_file_and_records_the_guests() -> None:
    payload, upload = os.urandom(300_000), os.urandom(123_457)
    srv = listen("127.0.0.1", 0, 10)
    peer = TcpPeer(payload, 10, srv)
    got = guest_side(srv.getsockname()[1], upload)
    peer.close(10)
    assert got == payload
    assert peer.result["tx_peer_bytes"] == len(upload)
    assert peer.result["tx_peer_md5"] == hashlib.md5(upload).hexdigest()
    assert peer.result["rx_peer_s"] >= 0 and "peer_error" not in peer.result


def test_peer_gives_up_when_no_guest_comes() -> None:
    peer = TcpPeer(b"x", 0.2, listen("127.0.0.1", 0, 0.2))
    peer.close(5)
    assert not peer.thread.is_alive()
    assert peer.result["peer_error"].startswith("TimeoutError") or "timed out" in peer.result["peer_error"]


def test_script_prints_what_it_sent_and_what_it_received() -> None:
    with socket.socket() as probe:  # a free port
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    p = subprocess.Popen([sys.executable, TCP_PEER, "127.0.0.1", str(port), "65536", "--tag", "t1"],
                         stdout=subprocess.PIPE, text=True)
    assert p.stdout is not None
    first = p.stdout.readline()
    m = re.fullmatch(r"PEER t1 listening sent_md5=([0-9a-f]{32})\n", first)
    assert m, first
    upload = os.urandom(5000)
    got = guest_side(port, upload)
    out, _ = p.communicate(timeout=10)
    assert p.returncode == 0
    assert hashlib.md5(got).hexdigest() == m.group(1) and len(got) == 65536
    assert out == f"PEER t1 recv_bytes=5000 recv_md5={hashlib.md5(upload).hexdigest()}\n"
