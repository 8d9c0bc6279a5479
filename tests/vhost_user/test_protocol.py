"""vhost-user end to end: a Python frontend (memfd guest RAM, eventfds, SCM_RIGHTS) drives vdm-blk."""

from __future__ import annotations

import os
import struct

import pytest
from vdm_blk.device import F_FLUSH, S_OK, T_FLUSH, T_GET_ID, T_IN, T_OUT
from vdm_vhost_user import protocol as p
from vdm_vhost_user.handler import OFFERED_PROTOCOL_FEATURES
from vdm_vhost_user.protocol import ProtocolFeature, Req

from tests.vhost_user.conftest import DISK_SIZE
from tests.vhost_user.frontend import F_VERSION_1, Frontend

SECTOR = 512


def hdr(rtype: int, sector: int = 0) -> bytes:
    return struct.pack("<IIQ", rtype, 0, sector)


def write(fe: Frontend, sector: int, data: bytes) -> int:
    u = fe.request(0, [hdr(T_OUT, sector), data], [1])
    return u.data[-1]


def read(fe: Frontend, sector: int, n: int) -> bytes:
    u = fe.request(0, [hdr(T_IN, sector)], [n, 1])
    assert u.data[-1] == S_OK and u.written == n + 1
    return u.data[:n]


def test_features_protocol_features_and_queue_count(blk_server, frontends):
    _, path, device = blk_server
    fe = frontends(path)
    features = fe.get_features()
    assert features >> p.F_PROTOCOL_FEATURES & 1, "VHOST_USER_F_PROTOCOL_FEATURES must be offered"
    # the device's features, and VHOST_F_LOG_ALL (migration; vhost's own bit)
    assert features & ~(1 << p.F_PROTOCOL_FEATURES | 1 << p.F_LOG_ALL) == device.features()
    assert features >> p.F_LOG_ALL & 1
    assert features & F_VERSION_1 and features >> F_FLUSH & 1
    proto = fe.get_protocol_features()
    assert proto == OFFERED_PROTOCOL_FEATURES
    for bit in (
        ProtocolFeature.MQ,
        ProtocolFeature.REPLY_ACK,
        ProtocolFeature.CONFIG,
        ProtocolFeature.INFLIGHT_SHMFD,
    ):
        assert proto >> bit & 1
    fe.set_protocol_features(proto)
    assert fe.get_u64(Req.GET_QUEUE_NUM) == len(device.queues) == 1
    assert fe.get_u64(Req.GET_MAX_MEM_SLOTS) == p.MAX_MEM_SLOTS


def test_config_space_is_the_disks(blk_server, frontends):
    _, path, device = blk_server
    fe = frontends(path)
    cfg = fe.get_config(0, 60)
    (capacity,) = struct.unpack_from("<Q", cfg)
    assert capacity == DISK_SIZE // SECTOR
    assert cfg == device.config_space()[:60]
    # a window of it, and bytes past its end read as zero
    assert fe.get_config(8, 8) == device.config_space()[8:16]
    assert fe.get_config(200, 16) == bytes(16)


def test_blk_io_through_the_rings_reaches_the_image(blk_server, frontends, image):
    _, path, device = blk_server
    fe = frontends(path)
    acked = fe.start(queues={0: 64})
    assert device.activated and device.driver_features == acked
    data = os.urandom(8 * SECTOR)
    assert write(fe, 100, data) == S_OK
    u = fe.request(0, [hdr(T_FLUSH)], [1])
    assert u.data[-1] == S_OK
    assert read(fe, 100, len(data)) == data
    with open(image, "rb") as f:
        f.seek(100 * SECTOR)
        assert f.read(len(data)) == data, "the write did not reach the image"
        original = f.seek(0) or f.read(SECTOR)
    assert read(fe, 0, SECTOR) == original
    ident = fe.request(0, [hdr(T_GET_ID)], [20, 1])
    assert ident.data[:8] == b"disk.img"
    assert fe.interrupts >= 1, "completions must be signalled on the call eventfd"
    assert device.stats["out"] == 1 and device.stats["flush"] == 1


def test_many_requests_in_flight_complete_once_each(blk_server, frontends, image):
    _, path, _ = blk_server
    fe = frontends(path)
    fe.start(queues={0: 128})
    chunks = {i: os.urandom(4 * SECTOR) for i in range(40)}
    for i, data in chunks.items():
        fe.post(0, [hdr(T_OUT, 8 * i), data], [1], kick=False)
    fe.kick(0)
    used = fe.wait_used(0, 40)
    assert len(used) == 40 and all(u.data[-1] == S_OK for u in used)
    with open(image, "rb") as f:
        for i, data in chunks.items():
            f.seek(8 * i * SECTOR)
            assert f.read(len(data)) == data


def test_reply_ack_and_vring_base_round_trip(blk_server, frontends):
    _, path, device = blk_server
    fe = frontends(path)
    fe.start()  # negotiates REPLY_ACK: every set request below waits for its ack
    assert fe.reply_ack
    for _ in range(5):
        read(fe, 0, SECTOR)
    assert fe.get_vring_base(0) == 5, "GET_VRING_BASE returns the next available index"
    assert not device.activated, "stopping the last ring stops the device"
    q = fe.queues[0]
    os.close(q.kick)
    q.kick = os.eventfd(0, os.EFD_CLOEXEC)
    # the ring restarts where it stopped
    fe.call(Req.SET_VRING_BASE, p.VRING_STATE.pack(0, 5))
    fe.call(Req.SET_VRING_KICK, p.U64.pack(0), [q.kick])
    assert read(fe, 1, SECTOR) is not None
    assert fe.get_vring_base(0) == 6


def test_mem_slots_add_and_remove(blk_server, frontends):
    """CONFIGURE_MEM_SLOTS: memory arrives with ADD_MEM_REG (what QEMU 7.2 sends) instead of the table."""
    _, path, _ = blk_server
    fe = frontends(path)
    fe.get_features()
    fe.set_protocol_features(fe.get_protocol_features())
    fe.set_features(fe.get_features())
    ram = fe.ram
    region = p.SINGLE_REGION.pack(0, ram.base, ram.size, ram.user, 0)
    fe.call(Req.ADD_MEM_REG, region, [ram.fd])
    fe.send_queue(fe.layout_queue(0, 16))
    data = os.urandom(SECTOR)
    assert write(fe, 3, data) == S_OK and read(fe, 3, SECTOR) == data
    assert fe.get_vring_base(0) == 2
    fe.call(Req.REM_MEM_REG, region)
    # the ring now lies outside the (empty) table: a new ring there is refused
    fe.send(Req.SET_VRING_ADDR, p.VRING_ADDR.pack(0, 0, ram.user, ram.user + 512, ram.user + 256, 0))
    assert fe.closed_by_backend()


def test_removing_memory_under_a_running_ring_is_refused(blk_server, frontends):
    _, path, _ = blk_server
    fe = frontends(path)
    fe.start()
    ram = fe.ram
    fe.send(Req.REM_MEM_REG, p.SINGLE_REGION.pack(0, ram.base, ram.size, ram.user, 0))
    assert fe.closed_by_backend()


def test_status_is_recorded(blk_server, frontends):
    _, path, _ = blk_server
    fe = frontends(path)
    fe.start()
    fe.call(Req.SET_STATUS, p.U64.pack(1 | 2 | 8 | 4))
    assert fe.get_u64(Req.GET_STATUS) == 15
    fe.call(Req.SET_STATUS, p.U64.pack(0))  # QEMU 7.2 sends 0 before GET_VRING_BASE
    read(fe, 0, SECTOR)
    assert fe.get_vring_base(0) == 1


def test_next_frontend_is_served_after_one_leaves(blk_server, frontends):
    server, path, device = blk_server
    first = frontends(path)
    first.start()
    data = os.urandom(SECTOR)
    assert write(first, 7, data) == S_OK
    first.close()
    assert server.wait_for(lambda s: s.conn is None)
    assert not device.activated
    second = frontends(path)
    second.start()
    assert read(second, 7, SECTOR) == data
    assert server.connections == 2 and server.rejected == 0


# ---- malformed messages: the connection is closed, the server serves the next frontend ----------


def _too_many_fds(fe: Frontend) -> None:
    fds = [os.eventfd(0) for _ in range(2)]
    try:
        fe.send(Req.SET_VRING_KICK, p.U64.pack(0), fds)
    finally:
        for fd in fds:
            os.close(fd)


def _more_fds_than_any_message(fe: Frontend) -> None:
    fds = [os.eventfd(0) for _ in range(p.MAX_FDS + 3)]
    try:
        fe.send(Req.SET_MEM_TABLE, p.MEM_TABLE_HEAD.pack(1, 0) + p.MEM_REGION.pack(0, 4096, 0, 0), fds)
    finally:
        for fd in fds:
            os.close(fd)


def _region_past_its_file(fe: Frontend) -> None:
    ram = fe.ram
    payload = p.MEM_TABLE_HEAD.pack(1, 0) + p.MEM_REGION.pack(ram.base, ram.size, ram.user, 4096)
    fe.send(Req.SET_MEM_TABLE, payload, [ram.fd])


def _region_count_and_fds_differ(fe: Frontend) -> None:
    ram = fe.ram
    payload = p.MEM_TABLE_HEAD.pack(2, 0) + p.MEM_REGION.pack(ram.base, 4096, ram.user, 0) * 2
    fe.send(Req.SET_MEM_TABLE, payload, [ram.fd])


def _ring_outside_memory(fe: Frontend) -> None:
    fe.set_mem_table()
    ram = fe.ram
    fe.send(Req.SET_VRING_ADDR, p.VRING_ADDR.pack(0, 0, ram.user + ram.size, ram.user, ram.user + 4096, 0))


def _ring_at_guest_not_user_address(fe: Frontend) -> None:
    fe.set_mem_table()
    ram = fe.ram  # the guest-physical address is not a frontend address: must not be accepted
    fe.send(Req.SET_VRING_ADDR, p.VRING_ADDR.pack(0, 0, ram.base, ram.base + 512, ram.base + 256, 0))


def _ring_running_off_the_end(fe: Frontend) -> None:
    fe.set_mem_table()
    ram = fe.ram
    fe.call(Req.SET_VRING_NUM, p.VRING_STATE.pack(0, 256))
    fe.send(
        Req.SET_VRING_ADDR, p.VRING_ADDR.pack(0, 0, ram.user + ram.size - 1024, ram.user, ram.user + 64, 0)
    )


MALFORMED = {
    "short header": lambda fe: (fe.send_raw(b"\x01\x00\x00\x00\x01\x00"), fe.sock.shutdown(1)),
    "wrong size": lambda fe: fe.send_raw(p.HEADER.pack(Req.SET_FEATURES, 1, 4) + b"\0" * 4),
    "payload cut short": lambda fe: (
        fe.send_raw(p.HEADER.pack(Req.SET_FEATURES, 1, 8) + b"\0" * 3),
        fe.sock.shutdown(1),
    ),
    "huge size": lambda fe: fe.send_raw(p.HEADER.pack(Req.SET_MEM_TABLE, 1, 1 << 30)),
    "bad version": lambda fe: fe.send_raw(p.HEADER.pack(Req.GET_FEATURES, 2, 0)),
    "reply flag on a request": lambda fe: fe.send_raw(p.HEADER.pack(Req.GET_FEATURES, 1 | p.FLAG_REPLY, 0)),
    "unknown request": lambda fe: fe.send_raw(p.HEADER.pack(999, 1, 0)),
    "fd where none belongs": lambda fe: fe.send(Req.GET_FEATURES, b"", [fe.ram.fd]),
    "too many fds": _too_many_fds,
    "more fds than any message": _more_fds_than_any_message,
    "kick without fd": lambda fe: fe.send(Req.SET_VRING_KICK, p.U64.pack(0)),
    "region out of bounds": _region_past_its_file,
    "regions and fds differ": _region_count_and_fds_differ,
    "empty region": lambda fe: fe.send(
        Req.SET_MEM_TABLE, p.MEM_TABLE_HEAD.pack(1, 0) + p.MEM_REGION.pack(0, 0, 0, 0), [fe.ram.fd]
    ),
    "bad queue index": lambda fe: fe.send(Req.SET_VRING_NUM, p.VRING_STATE.pack(5, 16)),
    "bad queue index in kick": lambda fe: fe.send(Req.SET_VRING_CALL, p.U64.pack(9), [fe.ram.fd]),
    "queue size not a power of two": lambda fe: fe.send(Req.SET_VRING_NUM, p.VRING_STATE.pack(0, 100)),
    "queue size too big": lambda fe: fe.send(Req.SET_VRING_NUM, p.VRING_STATE.pack(0, 1 << 16)),
    "ring address outside memory": _ring_outside_memory,
    "ring address untranslated": _ring_at_guest_not_user_address,
    "ring running off the end": _ring_running_off_the_end,
    "ring address before memory": lambda fe: fe.send(Req.SET_VRING_ADDR, p.VRING_ADDR.pack(0, 0, 0, 0, 0, 0)),
    "features not offered": lambda fe: fe.send(Req.SET_FEATURES, p.U64.pack(1 << 63)),
    "protocol features not offered": lambda fe: fe.send(Req.SET_PROTOCOL_FEATURES, p.U64.pack(1 << 40)),
    "config past its end": lambda fe: fe.send(Req.GET_CONFIG, p.CONFIG_HEAD.pack(250, 16, 0) + bytes(16)),
    "config size mismatch": lambda fe: fe.send(Req.GET_CONFIG, p.CONFIG_HEAD.pack(0, 16, 0) + bytes(8)),
    "inflight for more queues": lambda fe: fe.send(Req.GET_INFLIGHT_FD, p.INFLIGHT.pack(0, 0, 9, 128)),
    "inflight region too small for its queues": lambda fe: fe.send(
        Req.SET_INFLIGHT_FD, p.INFLIGHT.pack(64, 0, 1, 128), [fe.ram.fd]
    ),
    "inflight fd smaller than described": lambda fe: fe.send(
        Req.SET_INFLIGHT_FD, p.INFLIGHT.pack(64 << 20, 0, 1, 128), [fe.ram.fd]
    ),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_message_closes_only_that_connection(case, blk_server, frontends):
    server, path, device = blk_server
    bad = frontends(path)
    before = server.rejected
    MALFORMED[case](bad)
    assert bad.closed_by_backend(), f"{case}: the backend kept the connection"
    assert server.wait_for(lambda s: s.conn is None and s.rejected == before + 1), (
        "not counted as a rejection"
    )
    good = frontends(path)
    good.start()
    data = os.urandom(SECTOR)
    assert write(good, 9, data) == S_OK and read(good, 9, SECTOR) == data
    assert device.broken is None


def test_bad_message_while_io_runs_leaves_the_device_reusable(blk_server, frontends):
    server, path, device = blk_server
    fe = frontends(path)
    fe.start()
    write(fe, 1, b"A" * SECTOR)
    fe.send(Req.SET_VRING_NUM, p.VRING_STATE.pack(0, 1 << 15))  # resize a running ring
    assert fe.closed_by_backend()
    assert server.wait_for(lambda s: s.conn is None)
    assert not device.activated
    fe2 = frontends(path)
    fe2.start()
    assert read(fe2, 1, SECTOR) == b"A" * SECTOR
