"""vdm-vsock's device through vdm.testing's driver: a guest's packets against real host Unix sockets.

The host side is real: the tests listen on ``PATH_P`` themselves and connect to ``PATH`` as a
host program does (``CONNECT P``), in their own tmp directory.
"""

from __future__ import annotations

import hashlib
import logging
import os
import socket
import threading
import time

import pytest
from vdm.transport.mmio import Reg
from vdm_vsock.config import VsockConfig
from vdm_vsock.device import VsockDevice, listen_on
from vdm_vsock.packet import HOST_CID, SHUTDOWN_RCV, SHUTDOWN_SEND, Hdr, Op

from .guest import Guest

CID = 3


@pytest.fixture
def vsock(tmp_path, virtio_driver):
    made = []

    def make(**kw):
        path = str(tmp_path / "v.sock")
        cfg = VsockConfig(cid=CID, path=path, **kw)
        dev = VsockDevice(cfg, listener=listen_on(path))
        made.append(dev)
        drv = virtio_driver(dev, ram_size=8 << 20)
        return dev, Guest(drv, CID), path

    yield make
    for dev in made:
        dev.close()


def serve(path: str, port: int) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(f"{path}_{port}")
    s.listen(16)
    s.settimeout(5)
    return s


def warnings_of(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING and "vsock" in r.name]


def open_guest_conn(guest: Guest, path: str, port: int = 1234, gport: int = 5000):
    srv = serve(path, port)
    guest.send(Op.REQUEST, gport, port)
    resp = guest.expect(Op.RESPONSE, port=gport)
    host, _ = srv.accept()
    host.settimeout(5)
    srv.close()
    return resp, host


def test_identity_three_queues_cid_in_config(vsock):
    _dev, guest, _ = vsock()
    drv = guest.drv
    assert drv.reg_read(Reg.DEVICE_ID) == 19
    assert drv.device_features() & 0xFFFFFF == 0
    assert [drv.queue_max_size(i) for i in range(4)] == [256, 256, 256, 0]
    assert drv.config_bytes(0, 8) == CID.to_bytes(8, "little")


def test_guest_connects_to_host_port_and_data_flows_both_ways(vsock):
    dev, guest, path = vsock()
    resp, host = open_guest_conn(guest, path)
    h = resp.hdr
    assert (h.src_cid, h.dst_cid, h.src_port, h.dst_port) == (HOST_CID, CID, 1234, 5000)
    assert resp.hdr.buf_alloc == 256 * 1024
    guest.send(Op.RW, 5000, 1234, b"hello host")
    assert host.recv(100) == b"hello host"
    host.sendall(b"hello guest")
    got = b""
    deadline = time.monotonic() + 5
    while got != b"hello guest" and time.monotonic() < deadline:
        got += guest.take_data(5000)
    assert got == b"hello guest"
    # the host closes: the guest hears SHUTDOWN(SEND); the guest closes: RST and the socket is gone
    host.close()
    assert guest.expect(Op.SHUTDOWN, port=5000).hdr.flags & SHUTDOWN_SEND
    guest.send(Op.SHUTDOWN, 5000, 1234, flags=SHUTDOWN_RCV | SHUTDOWN_SEND)
    guest.expect(Op.RST, port=5000)
    assert dev.connection_count() == 0


def test_guest_connect_to_a_port_nobody_serves_gets_rst(vsock):
    dev, guest, _ = vsock()
    guest.send(Op.REQUEST, 5000, 4444)
    rst = guest.expect(Op.RST, port=5000)
    assert rst.hdr.src_port == 4444 and dev.connection_count() == 0


def test_host_connects_to_guest_port(vsock):
    _dev, guest, path = vsock()
    host = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    host.settimeout(5)
    host.connect(path)
    host.sendall(b"CONNECT 52\n")
    req = guest.expect(Op.REQUEST, port=52)
    hport = req.hdr.src_port
    guest.send(Op.RESPONSE, 52, hport)
    assert host.recv(100) == f"OK {hport}\n".encode()
    host.sendall(b"to the guest")
    got = b""
    deadline = time.monotonic() + 5
    while got != b"to the guest" and time.monotonic() < deadline:
        got += guest.take_data(52)
    assert got == b"to the guest"
    guest.send(Op.RW, 52, hport, b"to the host")
    assert host.recv(100) == b"to the host"
    guest.send(Op.RST, 52, hport)
    assert host.recv(100) == b""  # the guest's RST closes the host program's socket
    host.close()


def test_host_connect_refused_by_the_guest_closes_the_socket(vsock):
    dev, guest, path = vsock()
    host = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    host.settimeout(5)
    host.connect(path)
    host.sendall(b"CONNECT 99\n")
    req = guest.expect(Op.REQUEST, port=99)
    guest.send(Op.RST, 99, req.hdr.src_port)
    assert host.recv(100) == b""
    assert dev.connection_count() == 0


def test_bad_connect_line_is_one_warning_and_closed(vsock, caplog):
    _dev, _guest, path = vsock()
    host = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    host.settimeout(5)
    host.connect(path)
    host.sendall(b"HELLO there\n")
    assert host.recv(100) == b""
    assert len([w for w in warnings_of(caplog) if "CONNECT" in w]) == 1


def test_slow_host_reader_blocks_the_guest_loses_nothing_and_memory_stays_bounded(vsock):
    """The guest writes 4 MiB keeping to its credit; the host reads 4 KiB at a time with pauses.

    What the device buffers never exceeds buf_size; the host gets every byte in order."""
    buf = 16 * 1024
    dev, guest, path = vsock(buf_size=buf)
    resp, host = open_guest_conn(guest, path)
    total = 4 << 20
    payload = os.urandom(total)
    received = bytearray()

    def reader():
        while len(received) < total:
            chunk = host.recv(4096)
            if not chunk:
                return
            received.extend(chunk)
            time.sleep(0.0005)

    t = threading.Thread(target=reader)
    t.start()
    peer_alloc, peer_fwd = resp.hdr.buf_alloc, resp.hdr.fwd_cnt
    sent = most = waits = 0
    deadline = time.monotonic() + 120
    while sent < total:
        assert time.monotonic() < deadline, f"stuck at {sent} bytes"
        for p in guest.poll():
            if p.hdr.dst_port == 5000:
                peer_alloc, peer_fwd = p.hdr.buf_alloc, p.hdr.fwd_cnt
        guest.inbox.clear()
        credit = peer_alloc - (sent - peer_fwd)
        if credit <= 0:
            waits += 1
            time.sleep(0.001)
            continue
        n = min(credit, 4096, total - sent)
        guest.send(Op.RW, 5000, 1234, payload[sent : sent + n])
        sent += n
        most = max(most, dev.buffered_bytes())
    t.join(60)
    assert hashlib.sha256(bytes(received)).digest() == hashlib.sha256(payload).digest()
    assert most <= buf
    assert waits > 0  # the guest did run out of credit: the reader was the slow side
    host.close()


def test_host_to_guest_keeps_to_the_guests_credit(vsock):
    _dev, guest, path = vsock()
    _resp, host = open_guest_conn(guest, path)
    small = 8192
    guest.buf_alloc = small
    guest.send(Op.CREDIT_UPDATE, 5000, 1234)  # the guest now offers only 8 KiB
    host.sendall(os.urandom(64 * 1024))
    time.sleep(0.3)  # let the device move what the credit allows
    first = guest.take_data(5000)
    assert 0 < len(first) <= small
    guest.send(Op.CREDIT_UPDATE, 5000, 1234)  # it read them: fwd_cnt moved on
    deadline = time.monotonic() + 5
    more = b""
    while len(more) < small and time.monotonic() < deadline:
        more += guest.take_data(5000)
    assert len(more) <= small  # never past the credit: fwd_cnt + buf_alloc


def test_reset_closes_every_host_socket(vsock):
    dev, guest, path = vsock()
    _, host = open_guest_conn(guest, path)
    guest.drv.set_status(0)
    assert host.recv(100) == b""
    assert dev.connection_count() == 0


def test_config_errors():
    with pytest.raises(ValueError, match="cid=3"):
        VsockConfig(cid=2, path="/tmp/x")
    with pytest.raises(ValueError, match="path="):
        VsockConfig(cid=3)
    with pytest.raises(ValueError, match="longer"):
        VsockConfig(cid=3, path="/" + "a" * 100)


def test_header_sized_rx_buffers_carry_control_packets_not_a_false_end(tmp_path, virtio_driver):
    """rx buffers with room for a header only carry control packets; host data waits for bigger
    ones (reading 0 bytes from the host socket is not its end)."""
    path = str(tmp_path / "v.sock")
    dev = VsockDevice(VsockConfig(cid=CID, path=path), listener=listen_on(path))
    try:
        guest = Guest(virtio_driver(dev, ram_size=8 << 20), CID, rx_buffers=0)
        drv = guest.drv
        srv = serve(path, 1234)
        guest.send(Op.REQUEST, 5000, 1234)
        host, _ = srv.accept()
        host.sendall(b"waiting data")
        for _ in range(4):
            drv.post(0, [], [44])
        drv.kick(0)
        guest.send(Op.CREDIT_REQUEST, 5000, 1234)
        # the RESPONSE and the CREDIT_UPDATE, a header each; then the two left, which cannot carry
        # the data: returned empty (a Linux guest never posts such), and no SHUTDOWN in them: the
        # host did not end. (wait returns what is used so far: all four may come back at once)
        used = drv.wait(0, 2)
        if len(used) < 4:
            used += drv.wait(0, 4 - len(used))
        assert len(used) == 4
        ops = [Hdr.unpack(u.data[:44]).op for u in used[:2]]
        assert ops == [Op.RESPONSE, Op.CREDIT_UPDATE]
        assert [u.written for u in used[2:]] == [0, 0]
        guest.post_rx(2)
        got = b""
        deadline = time.monotonic() + 5
        while got != b"waiting data" and time.monotonic() < deadline:
            got += guest.take_data(5000)
        assert got == b"waiting data"
        assert not [p for p in guest.inbox if p.hdr.op == Op.SHUTDOWN]
        host.close()
        srv.close()
    finally:
        dev.close()
