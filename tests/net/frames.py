"""Building and taking apart the Ethernet/IPv4/IPv6/UDP/TCP frames the net tests send."""

from __future__ import annotations

import os
import select
import socket
import struct
import time

BROADCAST = b"\xff" * 6
#: IEEE 802 "local experimental" EtherType: nobody in the namespace answers or forwards it
ETH_P_TEST = 0x88B5
ETH_P_IP = 0x0800
ETH_P_IPV6 = 0x86DD


def checksum(data: bytes) -> int:
    """The Internet (ones' complement) checksum of ``data``."""
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def eth(dst: bytes, src: bytes, ethertype: int, payload: bytes) -> bytes:
    return dst + src + struct.pack("!H", ethertype) + payload


def ipv4(src: str, dst: str, proto: int, payload: bytes, *, ident: int = 1, ttl: int = 64) -> bytes:
    hdr = struct.pack(
        "!BBHHHBBH4s4s", 0x45, 0, 20 + len(payload), ident, 0x4000, ttl, proto, 0, _a4(src), _a4(dst)
    )
    hdr = hdr[:10] + struct.pack("!H", checksum(hdr)) + hdr[12:]
    return hdr + payload


def _a4(addr: str) -> bytes:
    return bytes(int(x) for x in addr.split("."))


def pseudo4(src: str, dst: str, proto: int, length: int) -> bytes:
    return _a4(src) + _a4(dst) + struct.pack("!BBH", 0, proto, length)


def udp4(src: str, dst: str, sport: int, dport: int, data: bytes, *, partial: bool = False) -> bytes:
    """A UDP datagram; ``partial``: the checksum field holds only the pseudo-header sum (NEEDS_CSUM)."""
    length = 8 + len(data)
    hdr = struct.pack("!HHHH", sport, dport, length, 0)
    ph = pseudo4(src, dst, 17, length)
    if partial:
        csum = ~checksum(ph) & 0xFFFF
    else:
        csum = checksum(ph + hdr + data) or 0xFFFF
    return struct.pack("!HHHH", sport, dport, length, csum) + data


def tcp4(
    src: str, dst: str, sport: int, dport: int, seq: int, ack: int, flags: int, data: bytes = b"",
    *, window: int = 65535, options: bytes = b"", partial: bool = False,
) -> bytes:
    off = (20 + len(options)) // 4
    hdr = struct.pack("!HHIIBBHHH", sport, dport, seq, ack, off << 4, flags, window, 0, 0) + options
    ph = pseudo4(src, dst, 6, len(hdr) + len(data))
    csum = ~checksum(ph) & 0xFFFF if partial else checksum(ph + hdr + data)
    return hdr[:16] + struct.pack("!H", csum) + hdr[18:] + data


def l4_checksum_ok(frame: bytes) -> bool:
    """Whether an Ethernet/IPv4 frame's TCP or UDP checksum is correct."""
    ip = frame[14:]
    ihl = (ip[0] & 15) * 4
    total = struct.unpack("!H", ip[2:4])[0]
    proto = ip[9]
    seg = ip[ihl:total]
    ph = ip[12:16] + ip[16:20] + struct.pack("!BBH", 0, proto, len(seg))
    return checksum(ph + seg) == 0


def read_fd(fd: int, timeout: float = 2.0, size: int = 1 << 17) -> bytes | None:
    """One read from a non-blocking fd, waiting up to ``timeout`` seconds; None on timeout."""
    p = select.poll()
    p.register(fd, select.POLLIN)
    if not p.poll(int(timeout * 1000)):
        return None
    return os.read(fd, size)


def recv_matching(sock, predicate, timeout: float = 2.0) -> bytes | None:
    """The first frame on ``sock`` for which ``predicate(frame)`` holds, or None after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return None
        sock.settimeout(left)
        try:
            frame = sock.recv(1 << 17)
        except socket.timeout:  # TimeoutError only from Python 3.10
            return None
        if predicate(frame):
            return frame


def parse_tcp4(frame: bytes) -> dict | None:
    """The fields of an Ethernet/IPv4/TCP frame the tests look at, or None if it is something else."""
    if len(frame) < 54 or frame[12:14] != struct.pack("!H", ETH_P_IP) or frame[23] != 6:
        return None
    ip = frame[14:]
    ihl = (ip[0] & 15) * 4
    tcp = ip[ihl:]
    sport, dport, seq, ack, off, flags, window = struct.unpack_from("!HHIIBBH", tcp)
    return {
        "src": ".".join(map(str, ip[12:16])), "dst": ".".join(map(str, ip[16:20])),
        "sport": sport, "dport": dport, "seq": seq, "ack": ack, "flags": flags, "window": window,
        "payload": bytes(tcp[(off >> 4) * 4 : struct.unpack("!H", ip[2:4])[0] - ihl]),
    }


TCP_FIN, TCP_SYN, TCP_RST, TCP_PSH, TCP_ACK = 0x01, 0x02, 0x04, 0x08, 0x10
