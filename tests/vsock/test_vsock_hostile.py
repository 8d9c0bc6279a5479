"""A hostile guest against vdm-vsock (vdm.testing): every bad packet is one log line and/or a RST,
the device keeps serving, and what the host holds for the guest stays bounded."""

from __future__ import annotations

import os
import select
import selectors
import socket
import threading
import time

import pytest
import vdm.poller
from vdm_vsock.config import VsockConfig
from vdm_vsock.device import MAX_CTRL, WARN_LINES, VsockDevice, listen_on
from vdm_vsock.packet import HDR, HOST_CID, Op

from .guest import Guest
from .test_vsock_device import CID, open_guest_conn, serve, warnings_of


@pytest.fixture
def vsock(tmp_path, virtio_driver):
    made = []

    def make(rx_buffers: int = 64, **kw):
        path = str(tmp_path / "v.sock")
        dev = VsockDevice(VsockConfig(cid=CID, path=path, **kw), listener=listen_on(path))
        made.append(dev)
        return dev, Guest(virtio_driver(dev, ram_size=8 << 20), CID, rx_buffers=rx_buffers), path

    yield make
    for dev in made:
        dev.close()


def still_serves(dev, guest, path, port=4321, gport=6000):
    """A fresh connection still works end to end (the device was not failed)."""
    assert not guest.drv.needs_reset
    _, host = open_guest_conn(guest, path, port, gport)
    guest.send(Op.RW, gport, port, b"still here")
    assert host.recv(100) == b"still here"
    host.close()


def test_packet_shorter_than_its_header_is_dropped_with_one_line(vsock, caplog):
    dev, guest, path = vsock()
    guest.send_raw([b"\x01" * 20])
    guest.send_raw([b"\x02" * (HDR.size - 1)])
    assert len([w for w in warnings_of(caplog) if "shorter than the 44-byte header" in w]) == 2
    still_serves(dev, guest, path)


@pytest.mark.parametrize("length,data", [(100, b"x" * 10), (70 * 1024, b"y" * 100)])
def test_rw_len_its_buffers_do_not_hold_resets_the_connection(vsock, caplog, length, data):
    dev, guest, path = vsock()
    _, host = open_guest_conn(guest, path)
    guest.send(Op.RW, 5000, 1234, data, length=length)
    guest.expect(Op.RST, port=5000)
    assert host.recv(100) == b""  # nothing of the bad packet reached the host; the socket closed
    assert dev.connection_count() == 0
    assert len([w for w in warnings_of(caplog) if "RW packet of len" in w]) == 1
    still_serves(dev, guest, path)


def test_guest_past_its_credit_is_reset_and_buffers_stay_bounded(vsock, caplog):
    buf = 4096
    dev, guest, path = vsock(buf_size=buf)
    _, host = open_guest_conn(guest, path)  # the host never reads
    most = 0
    for _ in range(2000):  # up to 8 MiB, far more than the host socket holds
        guest.send(Op.RW, 5000, 1234, os.urandom(4096))
        most = max(most, dev.buffered_bytes())
        guest.poll()
        if any(p.hdr.op == Op.RST for p in guest.inbox):
            break
    guest.expect(Op.RST, port=5000)
    assert most <= buf
    assert len([w for w in warnings_of(caplog) if "past the credit" in w]) == 1
    host.close()
    still_serves(dev, guest, path)


def test_one_packet_larger_than_the_credit_is_refused(vsock):
    _dev, guest, path = vsock(buf_size=4096)
    _, host = open_guest_conn(guest, path)
    guest.send(Op.RW, 5000, 1234, b"z" * 5000)
    guest.expect(Op.RST, port=5000)
    host.settimeout(5)
    assert host.recv(100) == b""


def test_unknown_op_resets(vsock, caplog):
    dev, guest, path = vsock()
    _, _host = open_guest_conn(guest, path)
    guest.send(99, 5000, 1234)
    guest.expect(Op.RST, port=5000)
    assert any("unknown op 99" in w for w in warnings_of(caplog))
    assert dev.connection_count() == 0


def test_unknown_dst_cid_wrong_type_and_unknown_connection_get_rst(vsock):
    dev, guest, path = vsock()
    guest.send(Op.REQUEST, 7000, 80, dst_cid=7)
    assert guest.expect(Op.RST, port=7000).hdr.src_cid == 7
    guest.send(Op.REQUEST, 7001, 80, type_=2)  # SEQPACKET is not offered
    guest.expect(Op.RST, port=7001)
    guest.send(Op.RW, 7002, 80, b"nobody")
    assert guest.expect(Op.RST, port=7002).hdr.src_cid == HOST_CID
    guest.send(Op.RST, 7003, 80)  # a RST for nothing is not answered
    guest.send(Op.CREDIT_REQUEST, 7004, 80)
    guest.expect(Op.RST, port=7004)
    assert not [p for p in guest.inbox if p.hdr.dst_port == 7003]
    still_serves(dev, guest, path)


def test_packet_from_another_cid_is_dropped(vsock, caplog):
    dev, guest, path = vsock()
    guest.send(Op.REQUEST, 7000, 80, src_cid=9)
    assert any("from cid 9" in w for w in warnings_of(caplog))
    still_serves(dev, guest, path)
    assert not [p for p in guest.inbox if p.hdr.dst_port == 7000]


def test_connection_flood_stops_at_max_conns(vsock, caplog):
    dev, guest, path = vsock(max_conns=4)
    srv = serve(path, 80)
    for gport in range(100, 110):
        guest.send(Op.REQUEST, gport, 80)
    ops = {}
    for gport in range(100, 110):
        while gport not in ops:
            for p in guest.poll():
                ops[p.hdr.dst_port] = p.hdr.op
            guest.inbox.clear()
    assert sorted(ops.values()).count(Op.RESPONSE) == 4
    assert sorted(ops.values()).count(Op.RST) == 6
    assert dev.connection_count() == 4
    assert any("max_conns" in w for w in warnings_of(caplog))
    srv.close()


def test_flood_without_rx_buffers_keeps_control_packets_bounded(vsock):
    dev, guest, _path = vsock(rx_buffers=0)
    for i in range(MAX_CTRL + 500):  # each asks for a RST the guest gives no buffer for
        guest.send(Op.RW, 10000 + i, 80, b"x")
    assert dev.buffered_bytes() <= MAX_CTRL * HDR.size
    assert dev.stats["ctrl_dropped"] == 500
    guest.post_rx(16)
    assert guest.expect(Op.RST).hdr.dst_port == 10000  # the first ones are delivered in order


def test_rx_buffer_shorter_than_a_header_is_returned_empty(vsock, caplog):
    _dev, guest, _path = vsock(rx_buffers=0)
    guest.drv.post(0, [], [16])
    guest.drv.kick(0)
    guest.send(Op.RW, 7002, 80, b"nobody")  # a RST is due: the short buffer comes back empty
    used = guest.drv.wait(0, 1)
    assert used[0].written == 0
    assert any("rx buffer of 16 bytes" in w for w in warnings_of(caplog))


def test_warnings_are_capped(vsock, caplog):
    dev, guest, _path = vsock()
    for _ in range(WARN_LINES + 100):
        guest.send_raw([b"\x00" * 8])
    assert len(warnings_of(caplog)) == WARN_LINES
    assert dev.stats["warnings"] == WARN_LINES + 100


def test_host_programs_that_never_send_connect_are_bounded(vsock, caplog):
    _dev, _guest, path = vsock(max_conns=2)
    socks = []
    for _ in range(6):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(path)
        socks.append(s)
    closed: set[int] = set()
    deadline = time.monotonic() + 10
    while len(closed) < 4 and time.monotonic() < deadline:
        ready, _, _ = select.select([s for s in socks if s.fileno() not in closed], [], [], 0.1)
        for s in ready:
            assert s.recv(1) == b""
            closed.add(s.fileno())
    assert len(closed) == 4  # two wait for their CONNECT line (max_conns); the others are closed
    assert len([w for w in warnings_of(caplog) if "not sent their CONNECT line" in w]) == 4
    for s in socks:
        s.close()


class SlowClosingSelector(selectors.DefaultSelector):  # type: ignore[misc,valid-type]
    """The socket thread's last step takes a while (as under fuzz_vsock's instrumentation)."""

    def close(self) -> None:
        time.sleep(0.3)
        super().close()


def test_a_ring_that_fails_the_device_from_the_socket_thread_leaves_no_thread_after_close(
        vsock, caplog, monkeypatch):
    """The socket thread's own kick finds a bad rx descriptor: the device fails (one line), the
    thread stops itself, and close() waits for it (fuzz_vsock found close() returning first)."""
    monkeypatch.setattr(vdm.poller.selectors, "DefaultSelector", SlowClosingSelector)
    dev, guest, path = vsock(rx_buffers=0)
    _, host = open_guest_conn_without_rx(guest, path)
    drv = guest.drv
    drv.write_desc(0, 15, 0x10, 64, 2, 0)  # writable, but below guest RAM
    drv.publish(0, 15)
    host.sendall(b"data for the guest")  # readable: the socket thread kicks rx and meets the bad ring
    deadline = time.monotonic() + 5
    while not drv.needs_reset and time.monotonic() < deadline:
        time.sleep(0.01)
    assert drv.needs_reset
    assert len([r for r in caplog.records if "marked broken" in r.getMessage()]) == 1
    dev.close()
    assert not [t for t in threading.enumerate() if t.name.startswith("vdm-vsock-io")]
    host.close()


def open_guest_conn_without_rx(guest, path, port=1234, gport=5000):
    """A connection whose RESPONSE the guest reads from one rx buffer it posts for it."""
    srv = serve(path, port)
    guest.send(Op.REQUEST, gport, port)
    guest.post_rx(1)
    resp = guest.expect(Op.RESPONSE, port=gport)
    guest.rx_posted = 0
    host, _ = srv.accept()
    host.settimeout(5)
    srv.close()
    return resp, host


def test_a_connect_line_sent_in_pieces_is_read_without_spinning(vsock, monkeypatch):
    """A host program that sends half its line and waits: the socket thread is woken for the
    bytes that came, not again and again for bytes it has seen (it once peeked them forever)."""
    dev, guest, path = vsock()
    calls = []
    real = dev._ready
    monkeypatch.setattr(dev, "_ready", lambda tag, ev: (calls.append(tag), real(tag, ev))[1])
    dev.reset()  # the socket thread is made again on activation, with the counting _ready
    guest.drv.init()
    guest.post_rx(8)
    host = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    host.settimeout(5)
    host.connect(path)
    host.sendall(b"CONN")
    time.sleep(0.5)  # what the thread does meanwhile is counted, not timed
    assert len(calls) < 20, f"{len(calls)} wake-ups for one partial line"
    host.sendall(b"ECT 52\n")
    req = guest.expect(Op.REQUEST, port=52)
    guest.send(Op.RESPONSE, 52, req.hdr.src_port)
    assert host.recv(100) == f"OK {req.hdr.src_port}\n".encode()
    host.close()
