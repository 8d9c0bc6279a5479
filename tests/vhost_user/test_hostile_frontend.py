"""A hostile vhost-user frontend (issue 20): it can cost its own connection, never vdm.

Each case ends the same way for vdm: one log line, that connection closed, the next frontend
served, and SIGTERM still ends it with status 0. Cases that killed or wedged vdm before they were
fixed run vdm as a subprocess (``vdm vhost-user --disk``), so that a SIGBUS or a blocked write shows
up as what it is instead of taking the test runner down.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import struct
import subprocess
import sys
import time

import pytest
from vdm_blk.device import S_OK, T_IN
from vdm_vhost_user import protocol as p
from vdm_vhost_user import server as server_mod
from vdm_vhost_user.inflight import queue_region_size
from vdm_vhost_user.protocol import Req

from tests.vhost_user.frontend import Frontend, SharedRam
from tests.vhost_user.vdmproc import VdmProcess

SECTOR = 512


def _read_sector(fe: Frontend, sector: int = 0, poll: bool = False) -> bytes:
    head = fe.post(0, [struct.pack("<IIQ", T_IN, 0, sector)], [SECTOR, 1])
    used = fe.poll_used(0) if poll else fe.wait_used(0)
    assert used[0].head == head and used[0].data[-1] == S_OK
    return used[0].data[:SECTOR]


@pytest.fixture
def vdm(tmp_path):
    image = tmp_path / "d.img"
    image.write_bytes(b"\x5a" * SECTOR + bytes(1 << 20))
    proc = VdmProcess(str(tmp_path / "vu.sock"), "--disk", str(image))
    yield proc
    if proc.alive:
        proc.kill()


def _served_again(vdm: VdmProcess) -> None:
    """A well-behaved frontend connects and reads sector 0; then SIGTERM ends vdm cleanly."""
    fe = Frontend(vdm.socket_path)
    try:
        fe.start()
        assert _read_sector(fe) == b"\x5a" * SECTOR
    finally:
        fe.close()
        fe.ram.close()
    assert vdm.stop(timeout=15) == 0, vdm.output


def _closed(fe: Frontend) -> bool:
    try:
        return fe.closed_by_backend()
    finally:
        fe.close()
        fe.ram.close()


# ---- 1: guest memory that shrinks after SET_MEM_TABLE ----------------------------------------


def test_a_sealable_memfd_is_sealed_against_shrinking(vdm):
    fe = Frontend(vdm.socket_path, ram=SharedRam(sealing=True))
    try:
        fe.start()
        with pytest.raises(PermissionError):
            os.ftruncate(fe.ram.fd, 0)
        assert _read_sector(fe) == b"\x5a" * SECTOR
    finally:
        fe.close()
        fe.ram.close()
    _served_again(vdm)


@pytest.mark.parametrize("kind", ["unsealable memfd", "plain file"])
def test_memory_shrunk_under_a_running_ring_closes_only_that_connection(vdm, tmp_path, kind):
    ram = SharedRam(path=str(tmp_path / "ram")) if kind == "plain file" else SharedRam()
    fe = Frontend(vdm.socket_path, ram=ram)
    fe.start()
    assert _read_sector(fe) == b"\x5a" * SECTOR
    fe.post(0, [struct.pack("<IIQ", T_IN, 0, 0)], [SECTOR, 1], kick=False)
    os.ftruncate(ram.fd, 0)  # from here on the frontend must not touch its own RAM either
    fe.kick(0)
    assert _closed(fe), vdm.output
    try:  # a process dying of SIGBUS closes its sockets a moment before it can be reaped
        status = vdm.proc.wait(timeout=1)
    except subprocess.TimeoutExpired:
        status = None
    assert status is None, f"vdm died (status {status}):\n{vdm.output}"
    assert vdm.count("shrank") == 1, vdm.output
    assert "Traceback" not in vdm.output
    _served_again(vdm)


def test_memory_shrunk_before_the_ring_starts_closes_only_that_connection(vdm):
    """The first read is the ring start's (the used index), inside a message."""
    fe = Frontend(vdm.socket_path)
    q = fe.layout_queue(0, 16)
    fe.set_features(fe.get_features() & ~(1 << p.F_PROTOCOL_FEATURES))  # rings start without ENABLE
    fe.call(Req.SET_OWNER)
    fe.set_mem_table()
    fe.get_features()  # a reply: the table is mapped
    os.ftruncate(fe.ram.fd, 0)
    fe.send_queue(q, enable=False)
    assert _closed(fe), vdm.output
    try:
        status = vdm.proc.wait(timeout=1)
    except subprocess.TimeoutExpired:
        status = None
    assert status is None, f"vdm died (status {status}):\n{vdm.output}"
    assert vdm.count("shrank") == 1, vdm.output
    assert "Traceback" not in vdm.output
    _served_again(vdm)


def test_the_inflight_memfd_vdm_hands_out_cannot_be_shrunk(vdm):
    fe = Frontend(vdm.socket_path)
    try:
        fe.start(inflight=True)
        assert fe.inflight is not None
        with pytest.raises(PermissionError):
            os.ftruncate(fe.inflight[0], 0)
        assert _read_sector(fe) == b"\x5a" * SECTOR
    finally:
        fe.close()
        fe.ram.close()
    _served_again(vdm)


def test_an_inflight_region_shrunk_under_a_running_ring_closes_only_that_connection(vdm):
    fe = Frontend(vdm.socket_path)
    size = queue_region_size(16)
    fd = os.memfd_create("kept-inflight", os.MFD_CLOEXEC)  # a region "kept" by the frontend
    os.ftruncate(fd, size)
    fe.inflight = (fd, size, 1, 16)
    fe.start(queues={0: 16}, inflight=True)
    assert _read_sector(fe) == b"\x5a" * SECTOR
    os.ftruncate(fd, 0)
    fe.post(0, [struct.pack("<IIQ", T_IN, 0, 0)], [SECTOR, 1])  # taking it marks the region
    assert _closed(fe), vdm.output
    try:
        status = vdm.proc.wait(timeout=1)
    except subprocess.TimeoutExpired:
        status = None
    assert status is None, f"vdm died (status {status}):\n{vdm.output}"
    assert vdm.count("shrank") == 1, vdm.output
    assert "Traceback" not in vdm.output
    _served_again(vdm)


# ---- 2, 3: notification fds ------------------------------------------------------------------


def _not_an_eventfd(kind: str) -> tuple[int, list[int]]:
    """(fd to send, fds to close afterwards)."""
    if kind == "pipe":
        r, w = os.pipe()
        return w, [r, w]
    a, b = socket.socketpair()
    b.close()  # a socket whose peer has gone
    fd = a.detach()
    return fd, [fd]


@pytest.mark.parametrize("request_", [Req.SET_VRING_CALL, Req.SET_VRING_KICK, Req.SET_VRING_ERR])
@pytest.mark.parametrize("kind", ["pipe", "socket"])
def test_a_notification_fd_that_is_not_an_eventfd_is_refused(blk_server, frontends, caplog, request_, kind):
    server, path, _ = blk_server
    fe = frontends(path)
    fe.start()
    fd, close = _not_an_eventfd(kind)
    try:
        with caplog.at_level(logging.INFO, logger="vdm_vhost_user"):
            fe.send(request_, p.U64.pack(0), [fd])
            assert fe.closed_by_backend()
            assert server.wait_for(lambda s: s.conn is None)
    finally:
        for f in close:
            os.close(f)
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and "not an eventfd" in errors[0].getMessage(), caplog.text
    fe2 = frontends(path)
    fe2.start()
    _read_sector(fe2)


def test_a_saturated_call_eventfd_blocks_nothing(vdm):
    fe = Frontend(vdm.socket_path)
    q = fe.layout_queue(0, 16)
    os.close(q.call)
    q.call = os.eventfd(0, os.EFD_CLOEXEC)
    os.eventfd_write(q.call, (1 << 64) - 2)  # the largest count: one more write would block
    try:
        fe.start()
        for _ in range(3):
            assert _read_sector(fe, poll=True) == b"\x5a" * SECTOR
        assert os.eventfd_read(q.call) == (1 << 64) - 2  # nothing was written, nothing wedged
        q.call = os.eventfd(0, os.EFD_CLOEXEC)
    finally:
        fe.close()
        fe.ram.close()
    _served_again(vdm)


def test_a_kick_fd_whose_reads_fail_closes_the_connection_once(blk_server, frontends, caplog):
    server, path, _ = blk_server
    fe = frontends(path)
    fe.start()
    _read_sector(fe)
    a, b = socket.socketpair()
    b.close()
    kick = server.handler.vrings[0].kick_fd
    with caplog.at_level(logging.INFO):
        os.dup2(a.fileno(), kick)  # the kick fd now reads EOF: what a broken fd looks like
        a.close()
        fe.kick(0)  # the frontend still holds the eventfd the loop watches
        assert fe.closed_by_backend()
        assert server.wait_for(lambda s: s.conn is None)
        time.sleep(0.2)  # a loop that kept failing would log again meanwhile
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and "kick" in errors[0].getMessage(), caplog.text
    assert not any(r.exc_info for r in caplog.records), caplog.text
    # The frontend still holds the old eventfd, with a kick left in it: the event loop must not
    # keep watching it under the reused number (vdm.eventloop's second invariant).
    fe2 = frontends(path)
    fe2.start()
    _read_sector(fe2)


# ---- 5: inflight region with an exhausted counter --------------------------------------------


def test_an_inflight_counter_at_its_maximum_is_a_frontend_error(blk_server, frontends, caplog):
    server, path, _ = blk_server
    fe = frontends(path)
    fd, size = fe.get_inflight_fd(1, 16)
    # a region a previous backend left: version 1, 16 descriptors, head 3 in flight with the
    # largest counter there is (the next one would not fit in the field)
    region = bytearray(os.pread(fd, size, 0))
    struct.pack_into("<QHHHH", region, 0, 0, 1, 16, 0, 0)
    struct.pack_into("<B5xHQ", region, 16 + 16 * 3, 1, 0, (1 << 64) - 1)
    os.pwrite(fd, bytes(region[: queue_region_size(16)]), 0)
    fe.inflight = (fd, size, 1, 16)
    with caplog.at_level(logging.INFO):
        try:
            fe.start(queues={0: 16}, inflight=True)
        except (ConnectionError, OSError):
            pass  # closed while the handshake went on
        assert fe.closed_by_backend()
        assert server.wait_for(lambda s: s.conn is None)
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and "counter" in errors[0].getMessage(), caplog.text
    assert not any(r.exc_info for r in caplog.records), caplog.text
    fe2 = frontends(path)
    fe2.start()
    _read_sector(fe2)


# ---- 6: a message that trickles in -----------------------------------------------------------


def test_a_message_sent_a_byte_at_a_time_is_bounded_as_a_whole(blk_server, frontends, monkeypatch, caplog):
    monkeypatch.setattr(server_mod, "MESSAGE_TIMEOUT", 1.0)
    server, path, _ = blk_server
    fe = frontends(path)
    payload = p.MEM_TABLE_HEAD.pack(1, 0) + p.MEM_REGION.pack(0, 1 << 20, 0, 0)
    data = p.HEADER.pack(Req.SET_MEM_TABLE, p.VERSION, len(payload)) + payload
    fe.send_raw(data[:1], [fe.ram.fd])
    closed = False
    with caplog.at_level(logging.INFO):
        for i in range(1, len(data)):  # 0.3 s per byte: each byte well within the timeout
            time.sleep(0.3)
            try:
                fe.sock.sendall(data[i : i + 1])
            except (BrokenPipeError, ConnectionResetError):
                closed = True
                break
        closed = closed or fe.closed_by_backend(timeout=0.5)
    assert closed, "the message was still open after all its bytes trickled in"
    assert "timed out" in caplog.text
    assert server.wait_for(lambda s: s.conn is None)
    fe2 = frontends(path)
    fe2.start()
    _read_sector(fe2)


def test_the_sigbus_guard_does_not_hide_a_fault_outside_guest_memory(tmp_path):
    """A SIGBUS in a mapping that is not guarded still ends the process as before (faulthandler
    reports it): the guard only repairs the frontend's memory."""
    script = f"""
import faulthandler, mmap, os
from vdm_vhost_user.faultguard import FaultWatch, guard, is_guarded
faulthandler.enable()
watch = FaultWatch()
fd = os.memfd_create("guarded")
os.ftruncate(fd, 65536)
guarded = mmap.mmap(fd, 65536)
guard(guarded, watch)
assert is_guarded(guarded)
os.ftruncate(fd, 0)
assert guarded[4096 * 3] == 0 and watch.faults == 1  # caught: zeros, one fault counted
print("guarded fault caught", flush=True)
other = open({str(tmp_path / "other")!r}, "w+b")
other.truncate(65536)
m = mmap.mmap(other.fileno(), 65536)
other.truncate(0)
print(m[4096 * 3])
print("not reached", flush=True)
"""
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert "guarded fault caught" in r.stdout, r.stderr
    assert "not reached" not in r.stdout
    assert r.returncode == -signal.SIGBUS, (r.returncode, r.stderr)
    assert "Bus error" in r.stderr  # faulthandler's report, the handler that was there before
