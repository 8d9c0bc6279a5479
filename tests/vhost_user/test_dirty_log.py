"""Dirty logging for live migration (issue 16 item 2), with the in-process test frontend.

What QEMU relies on while it copies guest RAM: every page the backend writes -- request buffers and
the used ring -- has its bit set in the shared log (bit per 4 KiB guest-physical page), and nothing
is set while logging is off.
"""

from __future__ import annotations

import logging
import os
import struct
import time

import pytest
from vdm.ring_layout import used_ring_size
from vdm_blk.device import S_OK, T_IN, T_OUT
from vdm_vhost_user import protocol as p
from vdm_vhost_user.handler import OFFERED_PROTOCOL_FEATURES
from vdm_vhost_user.protocol import ProtocolFeature, Req

from tests.vhost_user.frontend import Frontend
from tests.vhost_user.vdmproc import VdmProcess

PAGE = 4096


def hdr(rtype: int, sector: int = 0) -> bytes:
    return struct.pack("<IIQ", rtype, 0, sector)


def marked(log, lo: int, hi: int) -> set[int]:
    """Guest pages in [lo, hi) whose bit is set."""
    return {pg for pg in range(lo // PAGE, -(-hi // PAGE)) if log[pg >> 3] >> (pg & 7) & 1}


def all_marked(log) -> set[int]:
    out = set()
    for i, byte in enumerate(bytes(log)):
        for b in range(8):
            if byte >> b & 1:
                out.add(8 * i + b)
    return out


def started(blk_server, frontends):
    _, path, device = blk_server
    fe = frontends(path)
    # both offered, or QEMU blocks migration ("vhost lacks VHOST_F_LOG_ALL feature")
    assert fe.get_features() >> p.F_LOG_ALL & 1
    assert OFFERED_PROTOCOL_FEATURES >> ProtocolFeature.LOG_SHMFD & 1
    fe.start(queues={0: 16})
    return fe, device


def test_pages_a_read_request_writes_and_the_used_ring_are_marked(blk_server, frontends, image):
    fe, _ = started(blk_server, frontends)
    fd, log = fe.set_log_base()
    try:
        fe.set_logging(True)
        header = fe.ram.alloc(0, PAGE)  # the header alone on its page, then page-aligned buffers
        n = 3 * PAGE
        head = fe.post(0, [hdr(T_IN, 0)], [n, 1], in_align=PAGE)
        (u,) = fe.wait_used(0)
        assert u.head == head and u.data[-1] == S_OK
        with open(image, "rb") as f:
            assert u.data[:n] == f.read(n)
        data_start = header + PAGE
        status = data_start + n
        q = fe.queues[0]
        got = all_marked(log)
        want = set(range(data_start // PAGE, status // PAGE + 1))  # 3 data pages, the status byte's
        assert want <= got, f"pages {sorted(want)} not all marked: {sorted(got)}"
        used_pages = marked(log, q.used, q.used + used_ring_size(q.size))
        assert used_pages, "the used ring's page is not marked"
        # the request header (device-readable) is not written: its page is not marked
        assert header // PAGE not in got
        assert got == want | used_pages
    finally:
        log.close()
        os.close(fd)


def test_a_write_request_marks_only_the_status_byte_and_used_ring(blk_server, frontends):
    fe, _ = started(blk_server, frontends)
    fd, log = fe.set_log_base()
    try:
        fe.set_logging(True)
        out_start = fe.ram.alloc(0, PAGE)
        data = os.urandom(2 * PAGE)
        fe.post(0, [hdr(T_OUT, 8), data], [1], in_align=PAGE)
        (u,) = fe.wait_used(0)
        assert u.data == bytes([S_OK])
        got = all_marked(log)
        status = fe.ram.alloc(0, 1) - 1
        q = fe.queues[0]
        assert status // PAGE in got
        # the guest's data the device only read: not marked
        assert not got & set(range(out_start // PAGE, status // PAGE)), sorted(got)
        assert got <= {status // PAGE} | marked(log, q.used, q.used + used_ring_size(q.size))
    finally:
        log.close()
        os.close(fd)


def test_nothing_is_marked_while_logging_is_off(blk_server, frontends):
    fe, _ = started(blk_server, frontends)
    fd, log = fe.set_log_base()
    try:
        # a log given, logging never turned on
        for i in range(4):
            u = fe.request(0, [hdr(T_IN, i)], [PAGE, 1])
            assert u.data[-1] == S_OK
        assert not all_marked(log)
        # on, then off again (a migration that was cancelled): nothing more after it ends
        fe.set_logging(True)
        fe.request(0, [hdr(T_IN, 0)], [PAGE, 1])
        assert all_marked(log)
        log[:] = bytes(len(log))
        fe.set_logging(False)
        for i in range(4):
            fe.request(0, [hdr(T_IN, i)], [PAGE, 1])
        assert not all_marked(log)
    finally:
        log.close()
        os.close(fd)


def test_a_bad_log_closes_only_that_connection(blk_server, frontends, caplog):
    _, path, _ = blk_server
    fe, _ = started(blk_server, frontends)
    caplog.set_level(logging.ERROR, logger="vdm_vhost_user")
    fd = os.memfd_create("short-log", os.MFD_CLOEXEC)
    os.ftruncate(fd, 4096)
    try:
        fe.send(Req.SET_LOG_BASE, p.LOG_BASE.pack(1 << 20, 0), [fd])  # says 1 MiB, holds 4 KiB
        assert fe.closed_by_backend()
    finally:
        os.close(fd)
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and "SET_LOG_BASE" in errors[0].getMessage()
    # the backend serves the next frontend
    fe2 = frontends(path)
    fe2.start(queues={0: 16})
    assert fe2.request(0, [hdr(T_IN, 0)], [512, 1]).data[-1] == S_OK


def test_a_log_too_small_for_the_guest_marks_what_it_covers_and_nothing_past_it(blk_server, frontends):
    fe, _ = started(blk_server, frontends)
    # a log that ends in the middle of guest RAM: the backend must not write past it
    fd, log = fe.set_log_base(size=(fe.ram.base // PAGE) // 8 + 1)
    try:
        fe.set_logging(True)
        assert fe.request(0, [hdr(T_IN, 0)], [PAGE, 1]).data[-1] == S_OK
        assert fe.request(0, [hdr(T_IN, 1)], [PAGE, 1]).data[-1] == S_OK
    finally:
        log.close()
        os.close(fd)


@pytest.mark.parametrize("kind", ["unsealable memfd", "plain file"])
def test_a_log_shrunk_under_vdm_closes_only_that_connection(tmp_path, kind):
    """The frontend truncates its dirty log while vdm marks pages in it: a SIGBUS in vdm's atomic
    OR is caught (faultguard), that connection closes with one line, vdm serves the next one."""
    image = tmp_path / "d.img"
    image.write_bytes(b"\x5a" * 512 + bytes(1 << 20))
    vdm = VdmProcess(str(tmp_path / "vu.sock"), "--disk", str(image))
    try:
        fe = Frontend(vdm.socket_path)
        fe.start(queues={0: 16})
        pages = -(-(fe.ram.base + fe.ram.size) // PAGE)
        size = -(-pages // 8)
        if kind == "plain file":
            fd = os.open(tmp_path / "log", os.O_RDWR | os.O_CREAT, 0o600)
        else:
            fd = os.memfd_create("unsealable-log", os.MFD_CLOEXEC)
        os.ftruncate(fd, size)
        fe.send(Req.SET_LOG_BASE, p.LOG_BASE.pack(size, 0), [fd])
        fe.recv(Req.SET_LOG_BASE)
        fe.set_logging(True)
        os.ftruncate(fd, 0)
        fe.post(0, [hdr(T_IN, 0)], [PAGE, 1])
        assert fe.closed_by_backend(), vdm.output
        os.close(fd)
        fe.close()
        fe.ram.close()
        time.sleep(0.5)
        assert vdm.alive, f"vdm died:\n{vdm.output}"
        assert vdm.count("shrank a shared memory file") == 1, vdm.output
        fe2 = Frontend(vdm.socket_path)
        fe2.start(queues={0: 16})
        assert fe2.request(0, [hdr(T_IN, 0)], [512, 1]).data == b"\x5a" * 512 + bytes([S_OK])
        fe2.close()
        fe2.ram.close()
    finally:
        rc = vdm.stop()
    assert rc == 0, vdm.output


def test_set_log_fd_takes_an_eventfd_and_refuses_anything_else(blk_server, frontends, caplog):
    fe, _ = started(blk_server, frontends)
    efd = os.eventfd(0, os.EFD_CLOEXEC)
    try:
        fe.call(Req.SET_LOG_FD, b"", [efd])  # (REPLY_ACK negotiated: the ack says it was taken)
        assert fe.request(0, [hdr(T_IN, 0)], [512, 1]).data[-1] == S_OK
    finally:
        os.close(efd)
    caplog.set_level(logging.ERROR, logger="vdm_vhost_user")
    r, w = os.pipe()
    try:
        fe.send(Req.SET_LOG_FD, b"", [r])
        assert fe.closed_by_backend()
    finally:
        os.close(r)
        os.close(w)
    (line,) = [rec.getMessage() for rec in caplog.records if rec.levelno >= logging.ERROR]
    assert "SET_LOG_FD" in line and "not an eventfd" in line
