"""virtio-net through the in-process driver, with a real tap in a private network namespace.

The "guest" is vdm.testing's driver; the other end is the namespace's stack and an AF_PACKET
socket on the tap.
"""

from __future__ import annotations

import os
import socket
import struct
import threading
import time
from dataclasses import dataclass

import pytest
from vdm.testing import FeaturesRefused, VirtioTestDriver
from vdm_net import features as nf
from vdm_net.backends import tun
from vdm_net.backends.tap import Tap
from vdm_net.config import NetConfig
from vdm_net.device import CTRL_ERR, CTRL_OK, VirtioNet
from vdm_net.vnet_hdr import (
    F_DATA_VALID,
    F_NEEDS_CSUM,
    GSO_NONE,
    GSO_TCPV4,
    HDR_LEN,
    VnetHdr,
)

from tests.net.frames import (
    BROADCAST,
    ETH_P_IP,
    ETH_P_TEST,
    TCP_ACK,
    TCP_SYN,
    eth,
    ipv4,
    l4_checksum_ok,
    parse_tcp4,
    recv_matching,
    tcp4,
    udp4,
)
from tests.net.netns import NetNs

HOST_MAC = bytes.fromhex("02000000aa02")
GUEST_IP = "10.0.2.15"
HOST_IP = "10.0.2.2"
b = nf.bit
RXQ, TXQ = 0, 1
PACKET_VNET_HDR = 15
SOL_PACKET = 263


@dataclass
class Net:
    ns: NetNs
    tap: Tap
    dev: VirtioNet
    drv: VirtioTestDriver
    sock: socket.socket

    @property
    def mac(self) -> bytes:
        return self.dev.mac

    def send(self, frame: bytes, hdr: VnetHdr | None = None, q: int = TXQ) -> None:
        """Transmit as the guest and wait for the device to return the buffer."""
        self.drv.request(q, [(hdr or VnetHdr()).pack() + frame])

    def post_rx(self, count: int, size: int = 1526, q: int = RXQ) -> None:
        for _ in range(count):
            self.drv.post(q, in_lens=[size])
        self.drv.kick(q)

    def receive(self, count: int = 1, q: int = RXQ, timeout: float = 5.0) -> list[bytes]:
        """The next ``count`` received buffers' contents (header included)."""
        return [u.data[: u.written] for u in self.drv.wait(q, count, timeout)]


@pytest.fixture
def net(netns, virtio_driver):
    made = []

    def make(*, queues: int = 1, features: int | None = None, exclude: int = 0, tap_mtu: int = 1500,
             transport: str = "mmio", **cfg) -> Net:
        tap = netns.open_tap("vdmtap0", queues, host_mac=HOST_MAC)
        netns.up("vdmtap0", address=f"{HOST_IP}/24", mtu=tap_mtu)
        sock = netns.packet_socket("vdmtap0")
        dev = VirtioNet(NetConfig(queues=queues, **cfg), tap)
        drv = virtio_driver(dev, transport=transport)
        drv.init(features, exclude=exclude)
        netns.run(["ip", "neigh", "replace", GUEST_IP, "lladdr", ":".join(f"{x:02x}" for x in dev.mac),
                   "dev", "vdmtap0"])
        n = Net(netns, tap, dev, drv, sock)
        made.append(n)
        return n

    yield make
    for n in made:
        assert n.dev.broken is None, f"device broke: {n.dev.broken}"


def test_features_and_config_space(net):
    n = net(guest_mac="02:15:15:15:15:15", mtu=1400)
    f = n.drv.features
    for feature in (nf.F_MAC, nf.F_STATUS, nf.F_MRG_RXBUF, nf.F_CTRL_VQ, nf.F_CSUM, nf.F_GUEST_CSUM,
                    nf.F_HOST_TSO4, nf.F_HOST_TSO6, nf.F_GUEST_TSO4, nf.F_GUEST_TSO6, nf.F_HOST_UFO,
                    nf.F_GUEST_UFO, nf.F_MTU):
        assert f >> feature & 1, nf.feature_names(b(feature))
    assert not f >> nf.F_MQ & 1, "one queue pair: no MQ"
    mac, status, pairs, mtu = struct.unpack("<6sHHH", n.drv.config_bytes(0, 12))
    assert mac == bytes.fromhex("021515151515")
    assert status == 1 and pairs == 1 and mtu == 1400
    # the tap was told what the driver takes
    all_rx = tun.TUN_F_CSUM | tun.TUN_F_TSO4 | tun.TUN_F_TSO6 | tun.TUN_F_TSO_ECN | tun.TUN_F_UFO
    assert n.tap.offload == all_rx


def test_offloads_are_not_offered_when_disabled(net):
    n = net(offload=False)
    assert n.drv.features & (b(nf.F_CSUM) | b(nf.F_GUEST_CSUM) | b(nf.F_HOST_TSO4) | b(nf.F_GUEST_TSO4)) == 0
    assert n.tap.offload == 0


def test_driver_breaking_a_feature_dependency_is_refused(netns, virtio_driver):
    tap = netns.open_tap("vdmtap0")
    drv = virtio_driver(VirtioNet(NetConfig(), tap))
    offered = drv.device_features()
    with pytest.raises(FeaturesRefused):
        drv.init(offered & ~b(nf.F_GUEST_CSUM))  # GUEST_TSO4 without GUEST_CSUM


@pytest.mark.parametrize("transport", ["mmio", "pci"])
def test_transmitted_frames_appear_on_the_tap(net, transport):
    n = net(transport=transport)
    frames = [eth(BROADCAST, n.mac, ETH_P_TEST, os.urandom(40 + 100 * i)) for i in range(5)]
    for f in frames:
        n.send(f)
    for f in frames:
        assert recv_matching(n.sock, lambda got, f=f: got == f) == f
    st = n.dev.stats()
    assert st["tx_packets"] == 5 and st["tx_bytes"] == sum(map(len, frames)) and st["tx_dropped"] == 0


def test_udp_with_checksum_offload_reaches_a_socket_in_the_namespace(net):
    n = net()

    def listen() -> socket.socket:
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.bind((HOST_IP, 7777))
        s.settimeout(3)
        return s

    s = n.ns.call(listen)
    try:
        payload = b"partial checksum from the guest"
        udp = udp4(GUEST_IP, HOST_IP, 5555, 7777, payload, partial=True)
        frame = eth(HOST_MAC, n.mac, ETH_P_IP, ipv4(GUEST_IP, HOST_IP, 17, udp))
        n.send(frame, VnetHdr(F_NEEDS_CSUM, csum_start=34, csum_offset=6))
        data, addr = s.recvfrom(2048)
        assert data == payload and addr == (GUEST_IP, 5555)
    finally:
        s.close()


def test_tso_frame_goes_to_the_tap_as_one_gso_packet(net):
    n = net()
    n.sock.setsockopt(SOL_PACKET, PACKET_VNET_HDR, 1)
    seg = tcp4(GUEST_IP, HOST_IP, 40000, 5001, 1, 0, 0x18, os.urandom(4000), partial=True)
    frame = eth(HOST_MAC, n.mac, ETH_P_IP, ipv4(GUEST_IP, HOST_IP, 6, seg))
    n.send(frame, VnetHdr(F_NEEDS_CSUM, GSO_TCPV4, 54, 1448, 34, 16))
    got = recv_matching(n.sock, lambda f: len(f) > 10 + 23 and f[10 + 23] == 6 and f[10:] == frame)
    assert got is not None
    assert struct.unpack_from("<BBHH", got)[1:4:2] == (GSO_TCPV4, 1448)


def test_bad_frames_from_the_guest_are_dropped_and_counted(net):
    n = net(exclude=b(nf.F_HOST_TSO4) | b(nf.F_HOST_TSO6) | b(nf.F_HOST_ECN) | b(nf.F_HOST_UFO))
    good = eth(BROADCAST, n.mac, ETH_P_TEST, b"good".ljust(50, b"."))
    tso = eth(HOST_MAC, n.mac, ETH_P_IP, bytes(3000))
    n.drv.request(TXQ, [b"short"])  # not even a header
    n.send(b"\x01" * 10)  # runt frame
    n.send(tso, VnetHdr(F_NEEDS_CSUM, GSO_TCPV4, 54, 1448, 34, 16))  # TSO not negotiated
    n.send(good, VnetHdr(F_NEEDS_CSUM, csum_start=60, csum_offset=10))  # checksum beyond the frame
    n.send(good, VnetHdr(gso_type=0x42))  # unknown GSO type
    n.send(good)
    assert recv_matching(n.sock, lambda f: f[12:14] == struct.pack("!H", ETH_P_TEST)) == good
    assert recv_matching(n.sock, lambda f: True, timeout=0.3) is None, "a bad frame reached the tap"
    st = n.dev.stats()
    assert st["tx_dropped"] == 5 and st["tx_packets"] == 1
    for reason in ("short_header", "runt_frame", "gso_not_negotiated", "bad_csum_offset", "bad_gso_type"):
        assert st[f"tx_dropped_{reason}"] == 1, reason
    assert not n.drv.needs_reset


@pytest.mark.parametrize("mrg", [True, False])
def test_frames_from_the_namespace_arrive_in_receive_buffers(net, mrg):
    n = net(exclude=0 if mrg else b(nf.F_MRG_RXBUF))
    n.post_rx(8)
    frames = [eth(n.mac, HOST_MAC, ETH_P_TEST, os.urandom(60 + 200 * i)) for i in range(4)]
    for f in frames:
        n.sock.send(f)
    got = n.receive(4)
    for data, f in zip(got, frames):
        hdr = VnetHdr.unpack(data)
        assert hdr.num_buffers == 1 and hdr.gso_type == GSO_NONE
        assert data[HDR_LEN:] == f
    st = n.dev.stats()
    assert st["rx_packets"] == 4 and st["rx_bytes"] == sum(map(len, frames)) and st["rx_dropped"] == 0


def test_big_frame_is_merged_across_small_buffers(net):
    n = net(tap_mtu=9000)
    n.post_rx(40, size=256)
    frame = eth(n.mac, HOST_MAC, ETH_P_TEST, os.urandom(8000))
    n.sock.send(frame)
    need = -(-(HDR_LEN + len(frame)) // 256)
    got = n.receive(need)
    assert VnetHdr.unpack(got[0]).num_buffers == need
    assert all(len(g) == 256 for g in got[:-1]), "every buffer but the last is filled"
    assert b"".join(got)[HDR_LEN:] == frame


def _frames_of(bufs: list[bytes]) -> list[bytes]:
    """Split received mergeable buffers into frames by each first buffer's num_buffers."""
    frames, i = [], 0
    while i < len(bufs):
        k = VnetHdr.unpack(bufs[i]).num_buffers
        assert k >= 1 and i + k <= len(bufs), f"num_buffers {k} at buffer {i} of {len(bufs)}"
        frames.append(b"".join(bufs[i : i + k])[HDR_LEN:])
        i += k
    return frames


def test_frames_delivered_before_the_buffers_run_out_reach_the_driver_whole(net):
    # frame 1 takes 3 of the 5 buffers; frame 2 needs 3 and finds 2: the device stalls holding
    # them, and frame 1 must already be published (a driver refills only after it has received)
    n = net(tap_mtu=9000)
    n.post_rx(5, size=256)
    frames = [eth(n.mac, HOST_MAC, ETH_P_TEST, os.urandom(600) + bytes([i])) for i in range(3)]
    for f in frames:
        n.sock.send(f)
    assert _frames_of(n.receive(3)) == frames[:1]
    n.post_rx(10, size=256)
    assert _frames_of(n.receive(6)) == frames[1:]
    assert n.dev.stats()["rx_packets"] == 3 and n.dev.stats()["rx_dropped"] == 0


def test_a_burst_of_merged_frames_arrives_whole_and_in_order(net):
    # more buffers per batch than one used-index update publishes: every frame still whole
    n = net(tap_mtu=9000)
    n.post_rx(120, size=512)
    frames = [eth(n.mac, HOST_MAC, ETH_P_TEST, os.urandom(700 + i)) for i in range(40)]
    for f in frames:
        n.sock.send(f)
    need = sum(-(-(HDR_LEN + len(f)) // 512) for f in frames)
    assert _frames_of(n.receive(need)) == frames
    assert n.dev.stats()["rx_packets"] == 40 and n.dev.stats()["rx_dropped"] == 0


def test_without_mrg_rxbuf_a_too_small_buffer_drops_the_frame_and_is_reused(net):
    n = net(tap_mtu=9000, exclude=b(nf.F_MRG_RXBUF))
    n.post_rx(1, size=1526)
    big = eth(n.mac, HOST_MAC, ETH_P_TEST, bytes(3000))
    small = eth(n.mac, HOST_MAC, ETH_P_TEST, b"fits")
    n.sock.send(big)
    n.sock.send(small)
    got = n.receive(1)
    assert got[0][HDR_LEN:] == small
    st = n.dev.stats()
    assert st["rx_dropped_buffer_too_small"] == 1 and st["rx_packets"] == 1


def _cpu_ticks(tid: int) -> int:
    """utime + stime of one of our threads, in clock ticks."""
    with open(f"/proc/self/task/{tid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


def test_receive_without_buffers_waits_and_resumes_after_a_kick(net):
    n = net()
    frames = [eth(n.mac, HOST_MAC, ETH_P_TEST, struct.pack("!I", i) + bytes(60)) for i in range(6)]
    for f in frames:
        n.sock.send(f)
    time.sleep(0.3)
    st = n.dev.stats()
    assert st["rx_packets"] == 0 and st["rx_dropped"] == 0 and st.get("rx_stalls", 0) >= 1
    assert n.dev.pairs[0].rx_stalled
    # stalled with frames waiting in the tap: the poller sleeps instead of spinning
    tid = n.dev._poller._thread.native_id
    before = _cpu_ticks(tid)
    time.sleep(0.5)
    assert _cpu_ticks(tid) - before <= 5, "the poller thread spins while the receive queue is empty"
    n.post_rx(2)
    first = n.receive(2)
    deadline = time.monotonic() + 5
    while not n.dev.pairs[0].rx_stalled and time.monotonic() < deadline:
        time.sleep(0.01)
    assert n.dev.pairs[0].rx_stalled, "stalled again once the two buffers were used"
    n.post_rx(4)
    rest = n.receive(4)
    assert [g[HDR_LEN:] for g in first + rest] == frames, "in order, nothing lost"
    assert n.dev.stats()["rx_dropped"] == 0


def test_partial_checksums_reach_the_guest_only_with_guest_csum(net):
    n = net()
    n.post_rx(4)

    def send() -> None:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.sendto(b"to the guest", (GUEST_IP, 9999))

    n.ns.call(send)
    data = next(d for d in n.receive(1))
    hdr = VnetHdr.unpack(data)
    assert hdr.flags & F_NEEDS_CSUM and (hdr.csum_start, hdr.csum_offset) == (34, 6)


def test_without_guest_csum_the_guest_gets_finished_checksums(net):
    n = net(exclude=b(nf.F_GUEST_CSUM) | b(nf.F_GUEST_TSO4) | b(nf.F_GUEST_TSO6) | b(nf.F_GUEST_ECN)
            | b(nf.F_GUEST_UFO))
    assert n.tap.offload == 0
    n.post_rx(4)

    def send() -> None:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.sendto(b"to the guest", (GUEST_IP, 9999))

    n.ns.call(send)
    data = n.receive(1)[0]
    hdr = VnetHdr.unpack(data)
    assert hdr.flags & ~F_DATA_VALID == 0 and hdr.flags == 0
    assert l4_checksum_ok(data[HDR_LEN:])


def _tcp_flight(n: Net, nbytes: int = 200_000) -> list[bytes]:
    """Open a TCP connection from the namespace to the 'guest', let the kernel send a flight of
    data, and return the received frames (headers included). The guest side is hand-made."""
    n.post_rx(64, size=4096)
    result: dict = {}

    def client() -> None:
        try:
            with socket.create_connection((GUEST_IP, 5001), timeout=5) as s:
                s.settimeout(2)
                try:
                    s.sendall(os.urandom(nbytes))
                except OSError:
                    pass
        except OSError as e:
            result["error"] = e

    t = threading.Thread(target=n.ns.call, args=(client,))
    t.start()
    try:
        syn = None
        while syn is None:
            data = n.receive(1)[0]
            t4 = parse_tcp4(data[HDR_LEN:])
            if t4 and t4["flags"] & TCP_SYN:
                syn = t4
        mss = struct.pack("!BBH", 2, 4, 1460)
        synack = tcp4(GUEST_IP, HOST_IP, 5001, syn["sport"], 1000, syn["seq"] + 1, TCP_SYN | TCP_ACK,
                      window=65535, options=mss)
        n.send(eth(HOST_MAC, n.mac, ETH_P_IP, ipv4(GUEST_IP, HOST_IP, 6, synack)))
        frames = []
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline and sum(len(f) for f in frames) < 40_000:
            try:
                frames += n.receive(1, timeout=0.5)
            except TimeoutError:
                break
            n.drv.post(RXQ, in_lens=[4096])
            n.drv.kick(RXQ)
        return frames
    finally:
        t.join(10)


def test_guest_tso_receives_gso_frames(net):
    n = net()
    frames = _tcp_flight(n)
    gso = [VnetHdr.unpack(f) for f in frames if VnetHdr.unpack(f).gso_type == GSO_TCPV4]
    assert gso, "the kernel sent no TSO frames although GUEST_TSO4 was negotiated"
    # the MSS is the kernel's choice (at most the 1460 the SYN-ACK offered, as a rule); what the
    # device must keep is a partial checksum and a real segment size on every GSO frame
    bad = [h for h in gso if not (h.flags & F_NEEDS_CSUM and 0 < h.gso_size <= 9000)]
    assert not bad, bad
    assert max(len(f) - HDR_LEN for f in frames) > 1514


def test_without_guest_tso_every_frame_fits_the_mtu(net):
    n = net(exclude=b(nf.F_GUEST_TSO4) | b(nf.F_GUEST_TSO6) | b(nf.F_GUEST_ECN) | b(nf.F_GUEST_UFO))
    frames = _tcp_flight(n)
    data = [f for f in frames if (p := parse_tcp4(f[HDR_LEN:])) and p["payload"]]
    assert data, "no data segments arrived"
    assert all(VnetHdr.unpack(f).gso_type == GSO_NONE and len(f) - HDR_LEN <= 1514 for f in frames)


# ---- control queue -----------------------------------------------------------------------------------


def ctrl(n: Net, cls: int, cmd: int, body: bytes = b"", q: int = 2) -> int:
    used = n.drv.request(q, [bytes([cls, cmd]) + body], [1])
    assert used.written == 1
    return used.data[0]


def test_control_commands_answer(net):
    n = net()
    assert ctrl(n, 0, 0, b"\x01") == CTRL_OK  # promiscuous on
    assert ctrl(n, 0, 5, b"\x01") == CTRL_OK  # no broadcast (RX_EXTRA)
    assert ctrl(n, 0, 9, b"\x01") == CTRL_ERR
    assert ctrl(n, 0, 0, b"") == CTRL_ERR
    assert n.dev.rx_mode == {0: True, 5: True}
    table = struct.pack("<I", 1) + bytes.fromhex("020000000001") + struct.pack("<I", 2) + bytes(12)
    assert ctrl(n, 1, 0, table) == CTRL_OK
    assert len(n.dev.mac_table[1]) == 2
    assert ctrl(n, 1, 0, struct.pack("<I", 5) + bytes(6)) == CTRL_ERR  # says 5 entries, has 1
    assert ctrl(n, 2, 0, struct.pack("<H", 100)) == CTRL_OK
    assert ctrl(n, 2, 0, struct.pack("<H", 5000)) == CTRL_ERR
    assert n.dev.vlans == {100}
    assert ctrl(n, 4, 0, struct.pack("<H", 1)) == CTRL_ERR, "no MQ negotiated"
    assert ctrl(n, 42, 0) == CTRL_ERR
    new = bytes.fromhex("021234567890")
    assert ctrl(n, 1, 1, new) == CTRL_OK
    assert n.drv.config_bytes(0, 6) == new
    assert n.dev.stats()["ctrl_err"] == 6
    n.drv.device.reset()
    assert n.dev.mac == n.dev.default_mac


def test_guest_offloads_can_be_switched_off_and_on(net):
    n = net()
    assert ctrl(n, 5, 0, struct.pack("<Q", 0)) == CTRL_OK
    assert n.tap.offload == 0
    n.post_rx(2)

    def send() -> None:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.sendto(b"checksummed", (GUEST_IP, 9999))

    n.ns.call(send)
    data = n.receive(1)[0]
    assert VnetHdr.unpack(data).flags == 0 and l4_checksum_ok(data[HDR_LEN:])
    assert ctrl(n, 5, 0, struct.pack("<Q", b(nf.F_GUEST_TSO4))) == CTRL_ERR  # TSO4 without CSUM
    assert ctrl(n, 5, 0, struct.pack("<Q", b(nf.F_MRG_RXBUF))) == CTRL_ERR  # not an offload
    assert ctrl(n, 5, 0, struct.pack("<Q", b(nf.F_GUEST_CSUM) | b(nf.F_GUEST_TSO4))) == CTRL_OK
    assert n.tap.offload == tun.TUN_F_CSUM | tun.TUN_F_TSO4


# ---- multi-queue -------------------------------------------------------------------------------------


def test_multi_queue_pairs_are_enabled_by_the_driver(net):
    n = net(queues=2)
    assert n.drv.features >> nf.F_MQ & 1
    assert struct.unpack("<H", n.drv.config_bytes(8, 2))[0] == 2
    for q in (0, 2):
        n.post_rx(40, q=q)

    def flows(count: int) -> None:
        for i in range(count):
            udp = udp4("10.9.0.1", "10.9.0.2", 1000 + i, 2000 + 7 * i, b"flow")
            n.sock.send(eth(n.mac, HOST_MAC, ETH_P_IP, ipv4("10.9.0.1", "10.9.0.2", 17, udp)))

    # only the first pair is in use until VQ_PAIRS_SET
    flows(16)
    assert len(n.receive(16, q=0)) == 16
    assert n.drv.collect(2) == []
    assert ctrl(n, 4, 0, struct.pack("<H", 3), q=4) == CTRL_ERR
    assert ctrl(n, 4, 0, struct.pack("<H", 2), q=4) == CTRL_OK
    flows(24)
    got0, got2 = [], []
    deadline = time.monotonic() + 10
    while len(got0) + len(got2) < 24 and time.monotonic() < deadline:
        got0 += n.drv.collect(0)
        got2 += n.drv.collect(2)
        time.sleep(0.02)
    assert len(got0) + len(got2) == 24 and got0 and got2, (len(got0), len(got2))
    # the second pair transmits too
    f = eth(BROADCAST, n.mac, ETH_P_TEST, b"from pair 2".ljust(50))
    n.send(f, q=3)
    assert recv_matching(n.sock, lambda g: g == f) == f


def test_control_queue_is_queue_2_when_mq_is_not_negotiated(net):
    n = net(queues=2, exclude=b(nf.F_MQ))
    assert ctrl(n, 0, 0, b"\x01", q=2) == CTRL_OK


# ---- no backend --------------------------------------------------------------------------------------


def test_mode_none_is_a_nic_without_a_cable(virtio_driver):
    dev = VirtioNet(NetConfig(mode="none"), None)
    drv = virtio_driver(dev)
    drv.init()
    assert struct.unpack("<H", drv.config_bytes(6, 2))[0] == 0  # link down
    assert drv.features & b(nf.F_CSUM) == 0
    drv.request(TXQ, [VnetHdr().pack() + bytes(60)])
    assert dev.stats()["tx_dropped_no_backend"] == 1
    assert not drv.needs_reset
