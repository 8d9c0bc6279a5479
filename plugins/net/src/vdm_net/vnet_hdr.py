"""The 12-byte virtio-net header (virtio 1.2, 5.1.6): parse, build, and check it.

Every frame between the guest and the tap carries this header in front (the tap is set to the
same 12-byte layout with TUNSETVNETHDRSZ). Both directions are checked against the negotiated
features before the frame moves on:

* :func:`check_tx` -- a header and frame the guest transmitted. A guest that breaks the rules
  (a GSO type it did not negotiate, a checksum position outside the frame, a runt or oversize
  frame...) gets its frame dropped; :class:`HeaderError` names the reason, which the device
  counts. What passes is re-packed from the parsed fields, so the tap never sees bits the checks
  did not look at (unknown flags are ignored as 5.1.6.2.2 requires, num_buffers is zero).
* :func:`check_rx` -- a header the tap wrote for a frame going to the guest: the device must not
  hand the driver an offload it did not negotiate (5.1.6.4.2).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from . import features as nf

__all__ = [
    "ETH_HLEN",
    "F_DATA_VALID",
    "F_NEEDS_CSUM",
    "F_RSC_INFO",
    "GSO_ECN",
    "GSO_NONE",
    "GSO_TCPV4",
    "GSO_TCPV6",
    "GSO_UDP",
    "GSO_UDP_L4",
    "HDR_LEN",
    "MAX_FRAME_LEN",
    "HeaderError",
    "HeaderPolicy",
    "VnetHdr",
    "check_rx",
    "check_rx_into",
    "check_tx",
    "ethertype",
    "pack_num_buffers_into",
]

HDR_LEN = 12
ETH_HLEN = 14
VLAN_HLEN = 4
#: the largest frame either direction carries: Ethernet header, two VLAN tags, an IPv6 header and
#: the largest IPv6 payload (the 65589 bytes of 5.1.6.3 plus the tags)
MAX_FRAME_LEN = ETH_HLEN + 2 * VLAN_HLEN + 40 + 65535

F_NEEDS_CSUM = 1
F_DATA_VALID = 2
F_RSC_INFO = 4

GSO_NONE = 0
GSO_TCPV4 = 1
GSO_UDP = 3
GSO_TCPV6 = 4
GSO_UDP_L4 = 5
GSO_ECN = 0x80

ETH_P_IP = 0x0800
ETH_P_IPV6 = 0x86DD
_VLAN_TPIDS = (0x8100, 0x88A8, 0x9100)

_HDR = struct.Struct("<BBHHHHH")
#: where the header's num_buffers field (le16, its last) is
NUM_BUFFERS_AT = _HDR.size - 2
_NUM_BUFFERS = struct.Struct("<H")


class HeaderError(ValueError):
    """A header or frame that must not be passed on; ``reason`` is the statistics counter name."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


@dataclass(frozen=True)
class VnetHdr:
    """struct virtio_net_hdr without the hash-report fields (which vdm does not offer)."""

    flags: int = 0
    gso_type: int = GSO_NONE
    hdr_len: int = 0
    gso_size: int = 0
    csum_start: int = 0
    csum_offset: int = 0
    num_buffers: int = 0

    @classmethod
    def unpack(cls, data: bytes | memoryview) -> VnetHdr:
        """Parse the first 12 bytes of ``data`` (raises HeaderError if there are fewer)."""
        if len(data) < HDR_LEN:
            raise HeaderError("short_header", f"{len(data)} bytes, need {HDR_LEN}")
        return cls(*_HDR.unpack_from(data))

    def pack(self) -> bytes:
        return _HDR.pack(
            self.flags, self.gso_type, self.hdr_len, self.gso_size, self.csum_start,
            self.csum_offset, self.num_buffers,
        )


def pack_num_buffers_into(buf: bytearray, num_buffers: int) -> None:
    """Store ``num_buffers`` in the header at the start of ``buf``, the device's own bounce buffer
    (its other fields written by :func:`check_rx_into`)."""
    _NUM_BUFFERS.pack_into(buf, NUM_BUFFERS_AT, num_buffers)


@dataclass(frozen=True)
class HeaderPolicy:
    """What one direction may carry, from the negotiated features.

    For transmit the ``HOST_*`` features and ``CSUM`` count, for receive the ``GUEST_*`` ones.
    ``mtu`` is set when VIRTIO_NET_F_MTU was negotiated.
    """

    csum: bool = False
    tso4: bool = False
    tso6: bool = False
    ecn: bool = False
    ufo: bool = False
    uso: bool = False
    mtu: int | None = None

    @classmethod
    def for_tx(cls, features: int, mtu: int | None = None) -> HeaderPolicy:
        """What the driver may send, given the negotiated ``features``."""
        f = features
        return cls(
            csum=bool(f >> nf.F_CSUM & 1),
            tso4=bool(f >> nf.F_HOST_TSO4 & 1),
            tso6=bool(f >> nf.F_HOST_TSO6 & 1),
            ecn=bool(f >> nf.F_HOST_ECN & 1),
            ufo=bool(f >> nf.F_HOST_UFO & 1),
            uso=bool(f >> nf.F_HOST_USO & 1),
            mtu=mtu if f >> nf.F_MTU & 1 else None,
        )

    @classmethod
    def for_rx(cls, features: int, mtu: int | None = None) -> HeaderPolicy:
        """What the device may hand the driver, given the negotiated (or guest-offload) ``features``."""
        f = features
        return cls(
            csum=bool(f >> nf.F_GUEST_CSUM & 1),
            tso4=bool(f >> nf.F_GUEST_TSO4 & 1),
            tso6=bool(f >> nf.F_GUEST_TSO6 & 1),
            ecn=bool(f >> nf.F_GUEST_ECN & 1),
            ufo=bool(f >> nf.F_GUEST_UFO & 1),
            uso=bool(f >> nf.F_GUEST_USO4 & 1 or f >> nf.F_GUEST_USO6 & 1),
            mtu=mtu if f >> nf.F_MTU & 1 else None,
        )

    def allows_gso(self, base: int) -> bool:
        return {
            GSO_TCPV4: self.tso4,
            GSO_TCPV6: self.tso6,
            GSO_UDP: self.ufo,
            GSO_UDP_L4: self.uso,
        }.get(base, False)


def ethertype(frame: bytes | memoryview) -> int | None:
    """The frame's EtherType after any VLAN tags, or None if the frame ends before it."""
    off = 12
    while off + 2 <= len(frame):
        et = int.from_bytes(frame[off : off + 2], "big")
        if et not in _VLAN_TPIDS:
            return et
        off += VLAN_HLEN
    return None


#: which EtherTypes each GSO type applies to
_GSO_PROTOS = {
    GSO_TCPV4: (ETH_P_IP,),
    GSO_TCPV6: (ETH_P_IPV6,),
    GSO_UDP: (ETH_P_IP, ETH_P_IPV6),
    GSO_UDP_L4: (ETH_P_IP, ETH_P_IPV6),
}


def check_tx(hdr: VnetHdr, frame_head: bytes | memoryview, frame_len: int, policy: HeaderPolicy) -> VnetHdr:
    """Check a transmitted frame's header; return the header to give the tap.

    ``frame_head`` is the start of the frame (after the virtio-net header; 64 bytes are plenty),
    ``frame_len`` its full length. Raises :class:`HeaderError` when the frame must be dropped.
    """
    if frame_len < ETH_HLEN:
        raise HeaderError("runt_frame", f"{frame_len}-byte frame is shorter than an Ethernet header")
    if frame_len > MAX_FRAME_LEN:
        raise HeaderError("oversize_frame", f"{frame_len}-byte frame exceeds {MAX_FRAME_LEN}")
    flags = hdr.flags & F_NEEDS_CSUM  # the others mean nothing on transmit: ignored (5.1.6.2.2)
    if flags and not policy.csum:
        raise HeaderError("csum_not_negotiated", "NEEDS_CSUM set without VIRTIO_NET_F_CSUM")
    csum_start = csum_offset = 0
    if flags:
        csum_start, csum_offset = hdr.csum_start, hdr.csum_offset
        if csum_start + csum_offset + 2 > frame_len:
            raise HeaderError(
                "bad_csum_offset",
                f"checksum at {csum_start}+{csum_offset} is outside the {frame_len}-byte frame",
            )
    if hdr.hdr_len > frame_len:
        raise HeaderError("bad_hdr_len", f"hdr_len {hdr.hdr_len} > frame length {frame_len}")
    gso = hdr.gso_type
    base = gso & ~GSO_ECN
    if gso == GSO_NONE:
        limit = policy.mtu + ETH_HLEN + VLAN_HLEN if policy.mtu is not None else None
        if limit is not None and frame_len > limit:
            raise HeaderError("oversize_frame", f"{frame_len}-byte frame exceeds the MTU {policy.mtu}")
        return VnetHdr(flags, GSO_NONE, hdr.hdr_len, 0, csum_start, csum_offset, 0)
    if base not in _GSO_PROTOS:
        raise HeaderError("bad_gso_type", f"unknown gso_type 0x{gso:02x}")
    if not policy.allows_gso(base) or (gso & GSO_ECN and not policy.ecn):
        raise HeaderError("gso_not_negotiated", f"gso_type 0x{gso:02x} was not negotiated")
    if not flags:
        raise HeaderError("gso_without_csum", f"gso_type 0x{gso:02x} without NEEDS_CSUM")
    if hdr.gso_size == 0:
        raise HeaderError("bad_gso_size", "gso_size 0")
    proto = ethertype(frame_head)
    if proto not in _GSO_PROTOS[base]:
        raise HeaderError(
            "gso_proto_mismatch",
            f"gso_type 0x{gso:02x} on a frame of EtherType {'none' if proto is None else hex(proto)}",
        )
    return VnetHdr(flags, gso, hdr.hdr_len, hdr.gso_size, csum_start, csum_offset, 0)


def check_rx(hdr: VnetHdr, frame_len: int, policy: HeaderPolicy) -> VnetHdr:
    """Check a header the tap wrote for a received frame; return the one to give the driver.

    DATA_VALID is cleared when the driver has no GUEST_CSUM; anything else the driver did not
    negotiate raises :class:`HeaderError` (the frame is dropped and counted).
    ``num_buffers`` is left 0: the receive path fills it in.
    """
    return VnetHdr(*_check_rx_fields(hdr.flags, hdr.gso_type, hdr.hdr_len, hdr.gso_size, hdr.csum_start,
                                     hdr.csum_offset, frame_len, policy), 0)  # fmt: skip


def check_rx_into(buf: bytearray, frame_len: int, policy: HeaderPolicy) -> None:
    """:func:`check_rx` of the header in the first 12 bytes of ``buf`` (the device's own bounce
    buffer), written back there checked, ``num_buffers`` 0: the same checks and header without
    the two header objects (one call per received frame)."""
    flags, gso, hdr_len, gso_size, csum_start, csum_offset, _ = _HDR.unpack_from(buf)
    _HDR.pack_into(buf, 0, *_check_rx_fields(flags, gso, hdr_len, gso_size, csum_start, csum_offset,
                                             frame_len, policy), 0)  # fmt: skip


def _check_rx_fields(
    flags: int, gso: int, hdr_len: int, gso_size: int, csum_start: int, csum_offset: int, frame_len: int,
    policy: HeaderPolicy,
) -> tuple[int, int, int, int, int, int]:  # fmt: skip
    """check_rx's rules on the header's fields; the checked fields but num_buffers."""
    if frame_len < ETH_HLEN:
        raise HeaderError("rx_runt_frame", f"{frame_len}-byte frame from the tap")
    raw_flags = flags
    flags = raw_flags & (F_NEEDS_CSUM | F_DATA_VALID) if policy.csum else 0
    if raw_flags & F_NEEDS_CSUM and not policy.csum:
        raise HeaderError("rx_csum_not_negotiated", "tap sent a partial checksum the driver cannot finish")
    if flags & F_NEEDS_CSUM:
        if csum_start + csum_offset + 2 > frame_len:
            raise HeaderError("rx_bad_csum_offset", f"checksum at {csum_start}+{csum_offset} of {frame_len}")
    else:
        csum_start = csum_offset = 0
    base = gso & ~GSO_ECN
    if gso == GSO_NONE:
        if policy.mtu is not None and frame_len > policy.mtu + ETH_HLEN + VLAN_HLEN:
            raise HeaderError("rx_oversize_frame", f"{frame_len}-byte frame exceeds the MTU {policy.mtu}")
        return flags, GSO_NONE, hdr_len, 0, csum_start, csum_offset
    if not policy.allows_gso(base) or (gso & GSO_ECN and not policy.ecn):
        raise HeaderError("rx_gso_not_negotiated", f"tap sent gso_type 0x{gso:02x}")
    if not flags & F_NEEDS_CSUM or gso_size == 0:
        raise HeaderError("rx_bad_gso", f"gso_type 0x{gso:02x} with flags {raw_flags} size {gso_size}")
    return flags, gso, hdr_len, gso_size, csum_start, csum_offset
