"""Transport feature bits a frontend acks without vdm offering them (issue 16 item 5).

QEMU 7.2 offers VIRTIO_F_RING_RESET (bit 40) to the guest on vhost-user devices whatever the
backend says and then sends it in SET_FEATURES. Bits that change nothing vdm does are accepted
(and logged); bits that change the ring format or a promise the device must keep close the
connection with one line naming the bit and the QEMU property that turns it off.
"""

from __future__ import annotations

import logging
import struct

import pytest
from vdm_blk.device import S_OK, T_IN
from vdm_vhost_user import protocol as p
from vdm_vhost_user.protocol import Req

from tests.vhost_user.frontend import F_VERSION_1


def hdr(rtype: int, sector: int = 0) -> bytes:
    return struct.pack("<IIQ", rtype, 0, sector)


@pytest.mark.parametrize(
    "bit, name", [(40, "VIRTIO_F_RING_RESET"), (36, "VIRTIO_F_ORDER_PLATFORM"), (27, "VIRTIO_F_ANY_LAYOUT")]
)
def test_a_safe_transport_bit_acked_without_offer_is_accepted_and_logged(
    blk_server, frontends, caplog, bit, name
):
    _, path, device = blk_server
    caplog.set_level(logging.INFO, logger="vdm_vhost_user")
    fe = frontends(path)
    offered = fe.get_features()
    assert not offered >> bit & 1, f"{name} is offered now; this test needs a bit that is not"
    acked = fe.start(features=offered & ~(1 << 26) | 1 << bit, queues={0: 16})
    assert acked >> bit & 1
    # the device works and never saw the bit
    assert fe.request(0, [hdr(T_IN, 0)], [512, 1]).data[-1] == S_OK
    assert device.activated and not device.driver_features >> bit & 1
    assert device.driver_features & F_VERSION_1
    lines = [r.getMessage() for r in caplog.records if name in r.getMessage()]
    assert len(lines) == 1 and f"bit {bit}" in lines[0] and "accepted" in lines[0], lines


@pytest.mark.parametrize(
    "bit, name, prop",
    [
        (34, "VIRTIO_F_RING_PACKED", "packed=off"),
        (33, "VIRTIO_F_ACCESS_PLATFORM", "iommu_platform=off"),
        (35, "VIRTIO_F_IN_ORDER", "in_order=off"),
        (24, "VIRTIO_F_NOTIFY_ON_EMPTY", "notify_on_empty=off"),
    ],
)
def test_an_unsafe_transport_bit_closes_the_connection_naming_bit_and_property(
    blk_server, frontends, caplog, bit, name, prop
):
    _, path, _ = blk_server
    caplog.set_level(logging.INFO, logger="vdm_vhost_user")
    fe = frontends(path)
    offered = fe.get_features()
    fe.send(Req.SET_FEATURES, p.U64.pack(offered & ~(1 << 26) | 1 << bit))
    assert fe.closed_by_backend()
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1, errors
    assert name in errors[0] and f"bit {bit}" in errors[0] and prop in errors[0], errors[0]
    # only that connection: the next frontend is served
    fe2 = frontends(path)
    fe2.start(queues={0: 16})
    assert fe2.request(0, [hdr(T_IN, 0)], [512, 1]).data[-1] == S_OK


def test_a_device_bit_not_offered_is_still_refused(blk_server, frontends, caplog):
    _, path, _ = blk_server
    caplog.set_level(logging.ERROR, logger="vdm_vhost_user")
    fe = frontends(path)
    offered = fe.get_features()
    # a device-range bit virtio-blk lacks
    fe.send(Req.SET_FEATURES, p.U64.pack(offered & ~(1 << 26) | 1 << 23))
    assert fe.closed_by_backend()
    (line,) = [r.getMessage() for r in caplog.records]
    assert "bit 23" in line
