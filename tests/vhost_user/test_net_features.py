"""virtio-net over vhost-user: the features a frontend that owns the control queue can be offered.

QEMU serves a vhost-user virtio-net's control queue itself; the rings it hands the backend are the
data queues only. MQ (and GUEST_ANNOUNCE) would be negotiated without CTRL_VQ and the driver's
VQ_PAIRS_SET would never reach vdm-net, so the backend does not offer them; everything else of
the device's offer is passed through unchanged.
"""

from __future__ import annotations

import pytest
from vdm_net import features as nf
from vdm_net.config import NetConfig
from vdm_net.device import VirtioNet
from vdm_vhost_user import protocol as p
from vdm_vhost_user.protocol import Req

from tests.net.fake_tap import FakeTap
from tests.vhost_user.frontend import F_VERSION_1

CTRL_ONLY = nf.bit(nf.F_MQ) | nf.bit(nf.F_GUEST_ANNOUNCE)


@pytest.fixture
def net_server(serve):
    """``net_server(queues)`` -> (server, path, device): vdm-net on a FakeTap with ``queues`` pairs."""
    made = []

    def start(queues: int):
        tap = FakeTap(queues)
        device = VirtioNet(NetConfig(queues=queues), tap)  # type: ignore[arg-type]
        server, path = serve(device)
        made.append((server, tap))
        return server, path, device

    yield start
    for server, tap in made:
        server.close()
        tap.close()


@pytest.mark.parametrize("queues", [1, 2])
def test_offer_is_the_devices_without_control_queue_only_features(net_server, frontends, queues):
    _, path, device = net_server(queues)
    assert bool(device.features() & nf.bit(nf.F_MQ)) == (queues > 1)
    fe = frontends(path)
    offered = fe.get_features()
    assert offered >> p.F_PROTOCOL_FEATURES & 1
    virtio = offered & ~(1 << p.F_PROTOCOL_FEATURES | 1 << p.F_LOG_ALL)  # LOG_ALL: vhost's own (migration)
    assert virtio == device.features() & ~CTRL_ONLY
    assert not virtio & CTRL_ONLY
    for feature in (nf.F_MRG_RXBUF, nf.F_CSUM, nf.F_GUEST_TSO4):
        assert virtio >> feature & 1, nf.feature_names(1 << feature)
    assert virtio & F_VERSION_1
    fe.set_protocol_features(fe.get_protocol_features())
    assert fe.get_u64(Req.GET_QUEUE_NUM) == 2 * queues + 1


#: the feature bits QEMU 7.2's vhost-user netdev passes on to the backend (net/vhost-user.c,
#: user_feature_bits): ring and transport bits, the offloads, MRG_RXBUF, MTU, GUEST_ANNOUNCE, MQ,
#: RSS, HASH_REPORT. CTRL_VQ, MAC, STATUS and the other control-queue features stay with QEMU.
QEMU_FORWARDED = sum(
    1 << b
    for b in (
        24, 27, 28, 29, 32, 33, 34, 40, 57, 60,  # ring/transport bits, RSS, HASH_REPORT
        nf.F_CSUM, nf.F_GUEST_CSUM, 6, nf.F_GUEST_TSO4, nf.F_GUEST_TSO6, nf.F_GUEST_ECN, nf.F_GUEST_UFO,
        nf.F_HOST_TSO4, nf.F_HOST_TSO6, nf.F_HOST_ECN, nf.F_HOST_UFO, nf.F_MRG_RXBUF, nf.F_MTU,
        nf.F_GUEST_ANNOUNCE, nf.F_MQ,
    )
)  # fmt: skip


def test_what_qemu_acks_is_accepted(net_server, frontends):
    """QEMU acks every offered bit of its forwarded set (the guest took them all); vdm takes it."""
    server, path, _ = net_server(2)
    fe = frontends(path)
    offered = fe.get_features()
    fe.set_protocol_features(fe.get_protocol_features())
    fe.set_features(offered & (QEMU_FORWARDED | 1 << p.F_PROTOCOL_FEATURES))  # REPLY_ACK: raises if refused
    assert not fe.closed_by_backend(0.2)
    assert server.rejected == 0


def test_mq_from_a_frontend_is_refused_as_not_offered(net_server, frontends):
    server, path, _ = net_server(2)
    fe = frontends(path)
    offered = fe.get_features()
    fe.set_features(offered | nf.bit(nf.F_MQ))
    assert fe.closed_by_backend()
    assert server.wait_for(lambda s: s.rejected == 1)


def test_any_device_can_keep_its_control_queue_features_from_vhost_user(serve, frontends):
    """The rule is the device's declaration, not a device id: a toy device shows it."""
    from vdm.device import VirtioDevice, bit

    class Toy(VirtioDevice):
        device_id = 42
        name = "toy"
        queue_max_sizes = (64, 64)
        control_queue_features = bit(5)

        def device_features(self) -> int:
            return bit(3) | bit(5)

    device = Toy()
    _, path = serve(device)
    virtio = frontends(path).get_features() & ~(1 << p.F_PROTOCOL_FEATURES | 1 << p.F_LOG_ALL)
    assert virtio & bit(3) and not virtio & bit(5)
    assert virtio == device.features() & ~bit(5)
