"""The tap backend against a real tap inside a private network namespace."""

from __future__ import annotations

import fcntl
import os
import socket
import struct
import subprocess

import pytest
from vdm_net.backends import tun
from vdm_net.backends.tap import TapError, open_tap
from vdm_net.vnet_hdr import F_NEEDS_CSUM, GSO_NONE, GSO_TCPV4, HDR_LEN, VnetHdr

from tests.net.frames import (
    BROADCAST,
    ETH_P_IP,
    ETH_P_TEST,
    eth,
    ipv4,
    l4_checksum_ok,
    read_fd,
    recv_matching,
    tcp4,
    udp4,
)

GUEST_MAC = bytes.fromhex("020000000015")
PACKET_VNET_HDR = 15
SOL_PACKET = 263


def test_tap_is_created_inside_the_namespace_only(netns):
    tap = netns.open_tap("vdmtap0")
    assert tap.name == "vdmtap0" and len(tap.fds) == 1
    assert netns.run(["ip", "link", "show", "vdmtap0"]).returncode == 0
    host = subprocess.run(["ip", "link", "show", "vdmtap0"], capture_output=True)
    assert host.returncode != 0, "the tap leaked into the host namespace"
    hdr_sz = fcntl.ioctl(tap.fds[0], tun.TUNGETVNETHDRSZ, struct.pack("i", 0))
    assert struct.unpack("i", hdr_sz)[0] == HDR_LEN
    assert not os.get_blocking(tap.fds[0])


def test_tap_disappears_when_closed(netns):
    tap = netns.open_tap("vdmtap0")
    tap.close()
    assert netns.run(["ip", "link", "show", "vdmtap0"], check=False).returncode != 0


def test_frame_written_to_the_tap_appears_on_the_packet_socket(netns):
    tap = netns.open_tap("vdmtap0")
    netns.up("vdmtap0")
    sock = netns.packet_socket("vdmtap0")
    frame = eth(BROADCAST, GUEST_MAC, ETH_P_TEST, b"hello from the guest side".ljust(64, b"."))
    assert os.write(tap.fds[0], VnetHdr().pack() + frame) == HDR_LEN + len(frame)
    got = recv_matching(sock, lambda f: f[12:14] == struct.pack("!H", ETH_P_TEST))
    assert got == frame


def test_frame_from_the_packet_socket_arrives_with_a_vnet_header(netns):
    tap = netns.open_tap("vdmtap0")
    netns.up("vdmtap0")
    sock = netns.packet_socket("vdmtap0")
    frame = eth(GUEST_MAC, b"\x02\x00\x00\x00\x00\x02", ETH_P_TEST, os.urandom(200))
    sock.send(frame)
    data = read_fd(tap.fds[0])
    assert data is not None, "nothing arrived on the tap fd"
    hdr = VnetHdr.unpack(data)
    assert (hdr.flags, hdr.gso_type, hdr.gso_size) == (0, GSO_NONE, 0)
    assert data[HDR_LEN:] == frame


def _udp_from_namespace(netns, tap, payload: bytes) -> tuple[VnetHdr, bytes]:
    """Send a UDP datagram from the namespace's stack to the 'guest' behind the tap; read it there."""
    def send() -> None:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.sendto(payload, ("10.0.2.15", 9999))

    netns.call(send)
    while True:
        data = read_fd(tap.fds[0])
        assert data is not None, "the datagram never reached the tap"
        if data[HDR_LEN + 12 : HDR_LEN + 14] == struct.pack("!H", ETH_P_IP) and data[HDR_LEN + 23] == 17:
            return VnetHdr.unpack(data), data[HDR_LEN:]


def test_offloads_decide_whether_the_reader_gets_partial_checksums(netns):
    tap = netns.open_tap("vdmtap0")
    netns.up("vdmtap0", address="10.0.2.2/24")
    netns.run(["ip", "neigh", "add", "10.0.2.15", "lladdr", "02:00:00:00:00:15", "dev", "vdmtap0"])

    tap.set_offload(tun.TUN_F_CSUM)
    hdr, frame = _udp_from_namespace(netns, tap, b"x" * 100)
    assert hdr.flags & F_NEEDS_CSUM
    assert (hdr.csum_start, hdr.csum_offset) == (14 + 20, 6)  # Ethernet + IPv4, UDP checksum field

    tap.set_offload(0)
    hdr, frame = _udp_from_namespace(netns, tap, b"y" * 100)
    assert hdr.flags == 0
    assert l4_checksum_ok(frame), "without TUN_F_CSUM the kernel must finish the checksum itself"


def test_offload_probe_and_refusals(netns):
    tap = netns.open_tap("vdmtap0")
    # every Linux since 2.6.27 takes these; UFO is accepted (and ignored) since 4.14's removal
    wanted = tun.TUN_F_CSUM | tun.TUN_F_TSO4 | tun.TUN_F_TSO6 | tun.TUN_F_TSO_ECN | tun.TUN_F_UFO
    assert tap.accepted_offloads == wanted
    assert tap.offload == 0, "probing must leave the offloads off"
    assert tap.try_offload(tun.TUN_F_CSUM | tun.TUN_F_TSO4)
    assert tap.offload == tun.TUN_F_CSUM | tun.TUN_F_TSO4
    with pytest.raises(TapError):
        tap.set_offload(tun.TUN_F_TSO4)  # segmentation without checksum offload is refused
    assert not tap.try_offload(1 << 30)  # a flag the kernel does not know
    assert tap.offload == tun.TUN_F_CSUM | tun.TUN_F_TSO4


def test_gso_frame_written_to_the_tap_keeps_its_gso_metadata(netns):
    """A TSO frame from the 'guest' enters the namespace's stack as one GSO packet of 3 segments."""
    tap = netns.open_tap("vdmtap0")
    netns.up("vdmtap0", address="10.0.2.2/24")
    sock = netns.packet_socket("vdmtap0")
    sock.setsockopt(SOL_PACKET, PACKET_VNET_HDR, 1)
    payload = os.urandom(3 * 1000)
    seg = tcp4("10.0.2.15", "10.0.2.2", 40000, 5001, 1, 0, 0x18, payload, partial=True)
    frame = eth(b"\x02\x00\x00\x00\x00\x02", GUEST_MAC, ETH_P_IP, ipv4("10.0.2.15", "10.0.2.2", 6, seg))
    hdr = VnetHdr(F_NEEDS_CSUM, GSO_TCPV4, 14 + 20 + 20, 1000, 34, 16)
    assert os.write(tap.fds[0], hdr.pack() + frame) == HDR_LEN + len(frame)
    got = recv_matching(sock, lambda f: len(f) > 10 + 23 and f[10 + 23] == 6)
    assert got is not None
    _flags, gso_type, _hl, gso_size = struct.unpack_from("<BBHH", got)
    assert gso_type == GSO_TCPV4 and gso_size == 1000
    assert got[10:] == frame


def test_multi_queue_tap_spreads_flows_and_detached_queues_get_nothing(netns):
    tap = netns.open_tap("vdmtap0", queues=4)
    assert tap.multi_queue and len(tap.fds) == 4
    netns.up("vdmtap0")
    sock = netns.packet_socket("vdmtap0")

    def send_flows(n: int) -> list[int]:
        for port in range(n):
            udp = udp4("10.9.0.1", "10.9.0.2", 1000 + port, 2000 + 7 * port, b"flow%d" % port)
            ip = ipv4("10.9.0.1", "10.9.0.2", 17, udp)
            sock.send(eth(GUEST_MAC, b"\x02\x00\x00\x00\x00\x02", ETH_P_IP, ip))
        seen = [0] * len(tap.fds)
        got = 0
        while got < n:
            progress = False
            for i, fd in enumerate(tap.fds):
                data = read_fd(fd, timeout=0.05)
                if data is not None:
                    seen[i] += 1
                    got += 1
                    progress = True
            if not progress and all(read_fd(fd, timeout=0.5) is None for fd in tap.fds):
                break
        assert got == n, f"{n - got} of {n} frames never arrived ({seen})"
        return seen

    seen = send_flows(32)
    assert sum(1 for c in seen if c) >= 2, f"32 flows all landed on one queue: {seen}"
    for i in (1, 2, 3):
        tap.set_queue_enabled(i, False)
    seen = send_flows(16)
    assert seen == [16, 0, 0, 0]
    tap.set_queue_enabled(2, True)
    tap.set_queue_enabled(2, True)  # attaching twice is harmless


def test_existing_taps_are_opened_by_name(netns):
    netns.create_tap("vdmtap1")
    tap = netns.open_tap("vdmtap1")
    assert tap.name == "vdmtap1" and not tap.multi_queue
    netns.create_tap("vdmtap2", multi_queue=True)
    tap2 = netns.open_tap("vdmtap2")  # one queue of a multi-queue tap
    assert tap2.multi_queue and len(tap2.fds) == 1
    netns.run(["ip", "tuntap", "add", "dev", "vdmtun3", "mode", "tun"])
    with pytest.raises(TapError, match="other flags"):
        netns.open_tap("vdmtun3")


def test_single_queue_tap_has_one_opener(netns):
    netns.open_tap("vdmtap0")
    with pytest.raises(TapError, match="in use"):
        netns.open_tap("vdmtap0")


def test_tap_fd_passed_in(netns):
    def make(flags: int) -> int:
        fd = os.open("/dev/net/tun", os.O_RDWR)
        name = "vdmfd0" if flags & tun.IFF_VNET_HDR else "vdmfd1"
        fcntl.ioctl(fd, tun.TUNSETIFF, tun.ifreq_flags(name, flags))
        return fd

    good = netns.call(make, tun.IFF_TAP | tun.IFF_NO_PI | tun.IFF_VNET_HDR)
    tap = open_tap(fd=good)
    try:
        assert tap.name == "vdmfd0" and tap.fds == [good]
        assert tap.accepted_offloads & tun.TUN_F_CSUM
    finally:
        tap.close()
    bad = netns.call(make, tun.IFF_TAP | tun.IFF_NO_PI)
    with pytest.raises(TapError, match="IFF_VNET_HDR"):
        open_tap(fd=bad)
    os.fstat(bad)  # a refused fd stays open: it is still the caller's
    os.close(bad)
    r, w = os.pipe()
    try:
        with pytest.raises(TapError, match="not an attached tun"):
            open_tap(fd=r)
    finally:
        os.close(w)


def test_up_script_gets_the_tap_name(netns, tmp_path):
    log = tmp_path / "script.log"
    script = tmp_path / "ifup"
    script.write_text(f'#!/bin/sh\necho "$@" >> {log}\nip link set "$1" up\n')
    down = tmp_path / "ifdown"
    down.write_text(f'#!/bin/sh\nip link show "$1" >/dev/null && echo "down $@" >> {log}\n')
    down.chmod(0o755)
    script.chmod(0o755)
    tap = netns.open_tap("vdmtap0", script=str(script), downscript=str(down))
    assert log.read_text() == "vdmtap0\n"
    assert "UP" in netns.run(["ip", "link", "show", "vdmtap0"]).stdout.split(">")[0]
    netns.call(tap.close)
    assert log.read_text() == "vdmtap0\ndown vdmtap0\n", "the down-script runs while the tap still exists"


def test_failing_up_script_is_reported_and_the_tap_closed(netns, tmp_path):
    script = tmp_path / "ifup"
    script.write_text("#!/bin/sh\necho 'no bridge br9' >&2\nexit 3\n")
    script.chmod(0o755)
    with pytest.raises(TapError, match="status 3: no bridge br9"):
        netns.open_tap("vdmtap0", script=str(script))
    assert netns.run(["ip", "link", "show", "vdmtap0"], check=False).returncode != 0


def test_host_mac_is_set_on_the_tap(netns):
    netns.open_tap("vdmtap0", host_mac=bytes.fromhex("02aabbccddee"))
    assert "02:aa:bb:cc:dd:ee" in netns.run(["ip", "link", "show", "vdmtap0"]).stdout


def test_host_ip_addresses_the_tap_and_brings_it_up(netns):
    tap = netns.open_tap("vdmtap0", host_ip="10.0.2.2/24", host_mac=bytes.fromhex("020000000002"))
    out = netns.run(["ip", "-4", "addr", "show", "vdmtap0"]).stdout
    assert "inet 10.0.2.2/24" in out
    assert "UP" in netns.run(["ip", "link", "show", "vdmtap0"]).stdout.split(">")[0]
    # and the namespace's stack answers on it: a datagram to a closed port of 10.0.2.2 makes it
    # look up the sender (an ARP request) to send the ICMP error
    sock = netns.packet_socket("vdmtap0")
    udp = udp4("10.0.2.15", "10.0.2.2", 1234, 9, b"ping?")
    frame = eth(bytes.fromhex("020000000002"), GUEST_MAC, ETH_P_IP, ipv4("10.0.2.15", "10.0.2.2", 17, udp))
    os.write(tap.fds[0], VnetHdr().pack() + frame)
    assert recv_matching(sock, lambda f: f[12:14] == b"\x08\x06") is not None, "no ARP from the stack"


@pytest.mark.parametrize("bad", ["10.0.2.2/33", "10.0.2/24", "fe80::1/64", "host/24"])
def test_bad_host_ip_is_refused(bad):
    from vdm_net.backends.tap import parse_cidr

    with pytest.raises(ValueError, match="IPv4 address"):
        parse_cidr(bad)


def test_several_queues_of_a_single_queue_tap_are_refused_clearly(netns):
    netns.create_tap("vdmtap1")
    with pytest.raises(TapError, match="as a multi-queue tap: it exists with other flags"):
        netns.open_tap("vdmtap1", queues=2)
