"""Ring sizes as frontends set them, and the inflight region's room for them.

QEMU 10 lets the guest pick the ring size (its firmware uses 256, Linux up to 1024, whatever the
device's ``queue-size``), while it asks for the inflight region with its ``queue-size`` (128 by
default). So the ring can be larger than the queue size of GET_INFLIGHT_FD: vdm sizes each queue's
slot in the region it hands out for the largest split ring (32768) and serves any ring the split
ring allows. A region another backend made (libvhost-user sizes it by the queue size) is used
as it is, and a ring that does not fit it is refused with one line.
"""

from __future__ import annotations

import logging
import os
import struct

import pytest
from vdm.registry import DeviceContext
from vdm.testing.devices import EchoDevice
from vdm_blk.config import BlkConfig
from vdm_blk.device import S_OK, T_IN, T_OUT
from vdm_blk.plugin import create as create_blk
from vdm_vhost_user import protocol as p
from vdm_vhost_user.handler import OFFERED_PROTOCOL_FEATURES
from vdm_vhost_user.inflight import queue_region_size
from vdm_vhost_user.protocol import ProtocolFeature, Req

from tests.vhost_user.frontend import Frontend, SharedRam

SECTOR = 512


def _hdr(rtype: int, sector: int) -> bytes:
    return struct.pack("<IIQ", rtype, 0, sector)


@pytest.mark.parametrize("ring", [512, 1024, 32768])
def test_a_blk_ring_larger_than_the_devices_queue_size_is_served(serve, tmp_path, ring):
    """The device's queue_size (256) is what vdm's own transports offer; a vhost-user frontend
    chooses the ring itself, up to the split ring's 32768."""
    image = tmp_path / "d.img"
    image.write_bytes(bytes(1 << 20))
    device = create_blk(BlkConfig(path=str(image)), DeviceContext(vmm=None))
    try:
        _, path = serve(device)
        fe = Frontend(path, SharedRam(size=16 << 20))
        try:
            fe.start(queues={0: ring}, inflight=True)
            data = os.urandom(SECTOR)
            assert fe.request(0, [_hdr(T_OUT, 3), data], [1]).data == bytes([S_OK])
            u = fe.request(0, [_hdr(T_IN, 3)], [SECTOR, 1])
            assert u.data == data + bytes([S_OK])
            assert device.queues[0].size == ring
            # the seg_max the guest sees is the device's, not the ring's
            seg_max = struct.unpack_from("<I", fe.get_config(0, 16), 12)[0]
            assert seg_max == 256 - 2
        finally:
            fe.close()
            fe.ram.close()
    finally:
        device.close()


def test_qemu_10s_inflight_geometry_ring_of_1024_region_asked_for_128(serve):
    """GET_INFLIGHT_FD says 128 (QEMU's queue-size), the guest's ring is 1024: heads above 128 are
    tracked, and after a reconnect (the same region handed back) served again."""
    device = EchoDevice(hold=True)
    _, path = serve(device)
    fe = Frontend(path)
    try:
        fe.inflight = None
        fd, size = fe.get_inflight_fd(1, 128)
        assert size >= queue_region_size(32768), "each queue's slot has room for the largest ring"
        fe.inflight = (fd, size, 1, 128)
        q = fe.layout_queue(0, 1024)
        q.free_desc.reverse()  # heads 1023, 1022, ...: far beyond the 128 asked for
        fe.start(queues={0: 1024}, inflight=True)
        heads = dict(zip((b"A", b"B", b"C"), (fe.post(0, [name], [1]) for name in (b"A", b"B", b"C"))))
        assert min(heads.values()) > 1000
        device.wait_seen(3)
        device.complete(b"B")
        fe.wait_used(0, 1)
        region = os.pread(fd, 16 + 16 * 1024, 0)
        flagged = [i for i in range(1024) if region[16 + 16 * i] == 1]
        assert flagged == sorted([heads[b"A"], heads[b"C"]])
        assert struct.unpack_from("<H", region, 10)[0] == 1024  # desc_num: the ring's size
        fe.sock.close()
        fe.reconnect()
        device.wait_seen(5)
        assert device.seen[3:] == [b"A", b"C"], "in-flight requests above head 128 are served again"
        device.complete(b"A")
        device.complete(b"C")
        assert sorted(u.data for u in fe.wait_used(0, 2)) == [b"A", b"C"]
    finally:
        fe.close()
        fe.ram.close()


def test_a_ring_larger_than_a_handed_over_region_has_room_for_closes_the_connection(serve, caplog):
    """A region sized the libvhost-user way (by the queue size, 128) cannot track a ring of 256."""
    device = EchoDevice(hold=True)
    server, path = serve(device)
    fe = Frontend(path)
    fd = os.memfd_create("other-backends-inflight", os.MFD_CLOEXEC)
    try:
        os.ftruncate(fd, queue_region_size(128))
        fe.inflight = (fd, queue_region_size(128), 1, 128)
        caplog.set_level(logging.WARNING)
        with pytest.raises((ConnectionError, OSError, RuntimeError)):
            fe.start(queues={0: 256}, inflight=True)
            fe.get_features()  # the backend closes once the ring would start
        assert fe.closed_by_backend()
        assert server.wait_for(lambda s: s.conn is None)
        lines = [r.getMessage() for r in caplog.records if "inflight region" in r.getMessage()]
        assert len(lines) == 1 and "256" in lines[0] and "128" in lines[0], lines
    finally:
        fe.close()  # closes the region's fd too
        fe.ram.close()


def test_the_inflight_queue_size_may_exceed_the_devices_queue_size(serve):
    """QEMU's vhost-user-blk queue-size goes up to 1024; the device's own maximum is not the limit."""
    device = EchoDevice(hold=True)  # queue_max_sizes (16,)
    _, path = serve(device)
    fe = Frontend(path)
    try:
        fe.inflight = None
        fd, size = fe.get_inflight_fd(1, 1024)
        fe.inflight = (fd, size, 1, 1024)
        fe.start(queues={0: 1024}, inflight=True)
        fe.post(0, [b"X"], [1])
        device.wait_seen(1)
        device.complete(b"X")
        assert [u.data for u in fe.wait_used(0, 1)] == [b"X"]
    finally:
        fe.close()
        fe.ram.close()


#: QEMU 10's newer protocol features: not offered, so a frontend never acks them
NEWER = {"XEN_MMAP": 17, "SHARED_OBJECT": 18, "DEVICE_STATE": 19}


def test_newer_protocol_features_are_declined():
    for name, bit in NEWER.items():
        assert getattr(ProtocolFeature, name) == bit
        assert not OFFERED_PROTOCOL_FEATURES >> bit & 1, name


@pytest.mark.parametrize("request_no,name", [(41, "GET_SHARED_OBJECT"), (42, "SET_DEVICE_STATE_FD"),
                                             (43, "CHECK_DEVICE_STATE")])
def test_requests_of_features_not_negotiated_close_the_connection_with_their_name(
        serve, caplog, request_no, name):
    device = EchoDevice(hold=True)
    server, path = serve(device)
    fe = Frontend(path)
    try:
        caplog.set_level(logging.WARNING)
        fe.send_raw(p.HEADER.pack(request_no, 1, 0))
        assert fe.closed_by_backend()
        assert server.wait_for(lambda s: s.conn is None)
        lines = [r.getMessage() for r in caplog.records if "not supported" in r.getMessage()]
        assert lines == [f"vhost-user: {name} is not supported; closing the connection"], lines
        assert Req.name(request_no) == name
    finally:
        fe.close()
        fe.ram.close()
