"""Back-pressure and hostile input, with a tap stand-in whose queues can be filled at will.

:class:`tests.net.fake_tap.FakeTap` (the ``fake`` fixture) keeps message boundaries like a tap fd
and, unlike a tap, pushes back (EAGAIN) when its peer does not read: exactly what the transmit
path must survive.
"""

from __future__ import annotations

import struct
import threading
import time

import pytest
from vdm_net.backends import tun
from vdm_net.config import NetConfig
from vdm_net.device import CTRL_OK, VirtioNet
from vdm_net.vnet_hdr import F_NEEDS_CSUM, GSO_TCPV4, HDR_LEN, VnetHdr

from tests.net.fake_tap import FakeTap
from tests.net.frames import BROADCAST, ETH_P_TEST, eth

MAC = bytes.fromhex("020000000001")


def frame(tag: bytes) -> bytes:
    return eth(BROADCAST, MAC, ETH_P_TEST, tag.ljust(60, b"."))


def test_a_blocked_transmit_queue_does_not_hold_up_another(fake):
    tap, dev, drv = fake(queues=2)
    assert drv.request(4, [bytes([4, 0]) + struct.pack("<H", 2)], [1]).data[0] == CTRL_OK
    tap.fill(0)
    drv.submit(1, [VnetHdr().pack() + frame(b"stuck")])
    time.sleep(0.1)
    assert drv.collect(1) == [], "the chain completed although the tap pushed back"
    assert dev.pairs[0].tx_blocked
    t0 = time.monotonic()
    drv.request(3, [VnetHdr().pack() + frame(b"other queue")], timeout=1)
    assert time.monotonic() - t0 < 0.5
    assert tap.peers[1].recv(4096)[HDR_LEN:] == frame(b"other queue")
    # the reader catches up: the poller sees the fd writable and finishes the stuck frame
    drained = tap.drain(0)
    drv.wait(1, 1, timeout=3)
    got = [m for m in drained + tap.drain(0) if len(m) != 4096]
    assert [m[HDR_LEN:] for m in got] == [frame(b"stuck")]
    assert dev.stats()["tx_dropped"] == 0 and dev.stats()["tx_packets"] == 2


def test_frames_keep_their_order_through_back_pressure(fake):
    tap, dev, drv = fake()
    tap.fill(0)
    for i in range(20):
        drv.post(1, [VnetHdr().pack() + frame(b"n%d" % i)])
    drv.kick(1)
    time.sleep(0.05)
    received = []
    deadline = time.monotonic() + 5
    while len([m for m in received if len(m) != 4096]) < 20 and time.monotonic() < deadline:
        received += tap.drain(0)
        time.sleep(0.01)
    ours = [m[HDR_LEN:] for m in received if len(m) != 4096]
    assert ours == [frame(b"n%d" % i) for i in range(20)]
    assert len(drv.wait(1, 20)) == 20
    assert dev.stats()["tx_packets"] == 20


def test_receive_drops_headers_the_driver_did_not_negotiate(fake):
    tap, dev, drv = fake(exclude=1 << 7 | 1 << 8 | 1 << 9)  # no GUEST_TSO4/6, GUEST_ECN
    for _ in range(4):
        drv.post(0, in_lens=[2048])
    drv.kick(0)
    tso = VnetHdr(F_NEEDS_CSUM, GSO_TCPV4, 54, 1448, 34, 16).pack() + frame(b"gso")
    tap.peers[0].send(tso)
    tap.peers[0].send(b"tiny")
    tap.peers[0].send(VnetHdr().pack() + frame(b"fine"))
    used = drv.wait(0, 1)
    assert used[0].data[HDR_LEN : used[0].written] == frame(b"fine")
    st = dev.stats()
    assert st["rx_dropped_gso_not_negotiated"] == 1 and st["rx_dropped_short_read"] == 1
    assert st["rx_packets"] == 1


def test_receive_buffers_without_room_are_returned_empty(fake):
    tap, dev, drv = fake()
    drv.post(0, out=[b"readable only"])  # a receive chain the device cannot write to
    drv.post(0, in_lens=[4])  # room for less than a header
    drv.post(0, in_lens=[2048])
    drv.kick(0)
    tap.peers[0].send(VnetHdr().pack() + frame(b"lands in the third"))
    used = drv.wait(0, 3)
    assert [u.written for u in used[:2]] == [0, 0]
    assert used[2].data[HDR_LEN : used[2].written] == frame(b"lands in the third")
    assert dev.stats()["rx_bad_buffers"] == 2
    assert not drv.needs_reset


def test_reset_while_stalled_then_reinit(fake):
    tap, dev, drv = fake()
    tap.peers[0].send(VnetHdr().pack() + frame(b"before reset"))
    deadline = time.monotonic() + 2
    while not dev.pairs[0].rx_stalled and time.monotonic() < deadline:
        time.sleep(0.01)
    assert dev.pairs[0].rx_stalled
    assert dev.stats()["rx_dropped"] == 0, "no buffers: the frame was left in the tap, not read"
    drv.init()  # resets the device, then brings it up again
    for _ in range(2):
        drv.post(0, in_lens=[2048])
    drv.kick(0)
    tap.peers[0].send(VnetHdr().pack() + frame(b"after reset"))
    used = drv.wait(0, 2)
    assert [u.data[HDR_LEN : u.written] for u in used] == [frame(b"before reset"), frame(b"after reset")]


def test_many_descriptor_transmit_chain_is_gathered(fake):
    tap, _dev, drv = fake(queue_size=2048)
    pieces = [VnetHdr().pack()] + [bytes([i % 256]) * 7 for i in range(1100)]
    drv.request(1, pieces, indirect=True)
    msg = tap.peers[0].recv(1 << 17)
    assert msg[HDR_LEN:] == b"".join(pieces[1:])


def test_summary_line_counts_per_pair(fake):
    _tap, dev, drv = fake(queues=2)
    assert drv.request(4, [bytes([4, 0]) + struct.pack("<H", 2)], [1]).data[0] == CTRL_OK
    drv.request(3, [VnetHdr().pack() + frame(b"on pair 1")])
    drv.request(1, [b"bad"])
    line = dev.summary()
    assert "tx 1 packets" in line and "dropped rx 0 tx 1" in line
    assert "'tx_dropped_short_header': 1" in line and "0:0/0 1:0/1" in line


@pytest.mark.parametrize(
    ("accepted", "expected", "absent"),
    [
        (0, [], [0, 1, 2, 7, 8, 9, 10, 11, 12, 13, 14]),
        (tun.TUN_F_CSUM, [0, 1, 2], [7, 8, 9, 10, 11, 12, 13, 14]),
        (tun.TUN_F_CSUM | tun.TUN_F_TSO4, [0, 1, 2, 7, 11], [8, 9, 10, 12, 13, 14]),
        # ECN alone is useless without a TSO type to apply it to: not offered
        (tun.TUN_F_CSUM | tun.TUN_F_TSO_ECN, [0, 1, 2], [7, 8, 9, 11, 12, 13]),
        (tun.TUN_F_TSO4, [], [0, 1, 7, 11]),  # no checksum offload: no segmentation either
    ],
)
def test_only_offloads_the_tap_accepted_are_offered(accepted, expected, absent):
    tap = FakeTap()
    tap.accepted_offloads = accepted
    try:
        offered = VirtioNet(NetConfig(), tap).device_features()  # type: ignore[arg-type]
        assert all(offered >> b & 1 for b in expected), hex(offered)
        assert not any(offered >> b & 1 for b in absent), hex(offered)
    finally:
        tap.close()


def test_reset_waits_for_queue_processing_on_another_thread(fake):
    _tap, dev, drv = fake()
    inside, release = threading.Event(), threading.Event()
    transmit = dev._transmit

    def slow_transmit(pair, q):
        inside.set()
        release.wait(5)
        transmit(pair, q)

    dev._transmit = slow_transmit
    drv.post(1, [VnetHdr().pack() + frame(b"in flight")])
    kicker = threading.Thread(target=drv.kick, args=(1,))
    kicker.start()
    assert inside.wait(5)
    done = threading.Event()
    resetter = threading.Thread(target=lambda: (dev.reset(), done.set()))
    resetter.start()
    assert not done.wait(0.3), "the reset went ahead while a transmit was still running"
    release.set()
    assert done.wait(5)
    kicker.join(5)
    resetter.join(5)
    assert dev._inflight == {}


def test_a_merged_packet_alone_still_interrupts_the_driver(fake):
    """The buffers of one merged packet are published together, and the driver is told."""
    tap, _dev, drv = fake()
    for _ in range(4):
        drv.post(0, in_lens=[64])
    drv.kick(0)
    drv.ack_interrupts()
    edges = drv.irq.edges
    tap.peers[0].send(VnetHdr().pack() + frame(b"x" * 150))  # 12 + 164 bytes: three 64-byte buffers
    used = drv.wait(0, 3)
    assert VnetHdr.unpack(used[0].data).num_buffers == 3
    assert b"".join(u.data[: u.written] for u in used)[HDR_LEN:] == frame(b"x" * 150)
    deadline = time.monotonic() + 2
    while drv.irq.edges == edges and time.monotonic() < deadline:
        time.sleep(0.01)
    assert drv.irq.edges > edges, "no used-buffer interrupt for a packet spread over three buffers"
