"""The virtio-net header checks and the feature dependencies."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from vdm_net import features as nf
from vdm_net.vnet_hdr import (
    ETH_HLEN,
    F_DATA_VALID,
    F_NEEDS_CSUM,
    F_RSC_INFO,
    GSO_ECN,
    GSO_NONE,
    GSO_TCPV4,
    GSO_TCPV6,
    GSO_UDP,
    GSO_UDP_L4,
    HDR_LEN,
    MAX_FRAME_LEN,
    HeaderError,
    HeaderPolicy,
    VnetHdr,
    check_rx,
    check_tx,
    ethertype,
)

from tests.net.frames import ETH_P_IP, ETH_P_IPV6, eth

MAC = bytes.fromhex("020000000001")
ALL_TX = HeaderPolicy(csum=True, tso4=True, tso6=True, ecn=True, ufo=True, uso=True)
NOTHING = HeaderPolicy()


def ip4_frame(n: int = 100) -> bytes:
    return eth(MAC, MAC, ETH_P_IP, bytes(n))


def ip6_frame(n: int = 100) -> bytes:
    return eth(MAC, MAC, ETH_P_IPV6, bytes(n))


def tso4(**kw) -> VnetHdr:
    fields = dict(flags=F_NEEDS_CSUM, gso_type=GSO_TCPV4, hdr_len=54, gso_size=1448, csum_start=34,
                  csum_offset=16)
    fields.update(kw)
    return VnetHdr(**fields)


def reason(hdr: VnetHdr, frame: bytes, policy: HeaderPolicy, frame_len: int | None = None) -> str:
    with pytest.raises(HeaderError) as e:
        check_tx(hdr, frame[:64], len(frame) if frame_len is None else frame_len, policy)
    return e.value.reason


def test_pack_unpack_round_trip_and_layout():
    h = VnetHdr(1, GSO_TCPV4, 0x0102, 0x0304, 0x0506, 0x0708, 0x090A)
    raw = h.pack()
    assert raw == bytes([1, 1, 2, 1, 4, 3, 6, 5, 8, 7, 0x0A, 9])  # little endian, 12 bytes
    assert VnetHdr.unpack(raw + b"rest") == h
    with pytest.raises(HeaderError) as e:
        VnetHdr.unpack(raw[:11])
    assert e.value.reason == "short_header"


def test_plain_frame_passes_with_no_features():
    out = check_tx(VnetHdr(), ip4_frame(), len(ip4_frame()), NOTHING)
    assert out == VnetHdr()


def test_a_valid_tso_frame_passes_unchanged_except_num_buffers():
    frame = ip4_frame(3000)
    out = check_tx(tso4(num_buffers=7), frame[:64], len(frame), ALL_TX)
    assert out == tso4(num_buffers=0)


def test_unknown_and_receive_only_flags_are_ignored_on_transmit():
    frame = ip4_frame()
    out = check_tx(VnetHdr(flags=F_DATA_VALID | F_RSC_INFO | 0xF0), frame, len(frame), NOTHING)
    assert out.flags == 0


def test_checksum_fields_are_zeroed_when_not_used():
    frame = ip4_frame()
    out = check_tx(VnetHdr(csum_start=9999, csum_offset=9999), frame, len(frame), ALL_TX)
    assert (out.csum_start, out.csum_offset) == (0, 0)


@pytest.mark.parametrize(
    ("hdr", "frame", "policy", "expected"),
    [
        (VnetHdr(), b"\0" * 13, NOTHING, "runt_frame"),
        (VnetHdr(flags=F_NEEDS_CSUM, csum_start=34, csum_offset=6), ip4_frame(), NOTHING,
         "csum_not_negotiated"),
        (VnetHdr(flags=F_NEEDS_CSUM, csum_start=100, csum_offset=13), ip4_frame(), ALL_TX, "bad_csum_offset"),
        (VnetHdr(hdr_len=500), ip4_frame(), ALL_TX, "bad_hdr_len"),
        (tso4(), ip4_frame(3000), HeaderPolicy(csum=True), "gso_not_negotiated"),
        (tso4(gso_type=GSO_TCPV4 | GSO_ECN), ip4_frame(3000), HeaderPolicy(csum=True, tso4=True),
         "gso_not_negotiated"),
        (tso4(gso_type=2), ip4_frame(3000), ALL_TX, "bad_gso_type"),
        (tso4(gso_type=GSO_ECN), ip4_frame(3000), ALL_TX, "bad_gso_type"),
        (tso4(flags=0), ip4_frame(3000), ALL_TX, "gso_without_csum"),
        (tso4(gso_size=0), ip4_frame(3000), ALL_TX, "bad_gso_size"),
        (tso4(), ip6_frame(3000), ALL_TX, "gso_proto_mismatch"),
        (tso4(gso_type=GSO_TCPV6), ip4_frame(3000), ALL_TX, "gso_proto_mismatch"),
        (VnetHdr(), ip4_frame(1600), HeaderPolicy(mtu=1500), "oversize_frame"),
    ],
)
def test_bad_transmit_headers_are_refused_with_a_reason(hdr, frame, policy, expected):
    assert reason(hdr, frame, policy) == expected


def test_frame_size_limits():
    assert reason(VnetHdr(), ip4_frame(), NOTHING, frame_len=MAX_FRAME_LEN + 1) == "oversize_frame"
    check_tx(tso4(), ip4_frame(), MAX_FRAME_LEN, ALL_TX)
    # with MTU 1500 a VLAN-tagged full-size frame still passes (1500 + 14 + 4)
    check_tx(VnetHdr(), ip4_frame(), 1500 + ETH_HLEN + 4, HeaderPolicy(mtu=1500))


def test_vlan_tags_are_skipped_to_find_the_ethertype():
    tagged = MAC + MAC + b"\x81\x00\x00\x05" + b"\x88\xa8\x00\x06" + b"\x86\xdd" + bytes(60)
    assert ethertype(tagged) == ETH_P_IPV6
    assert ethertype(MAC + MAC + b"\x81\x00\x00\x05") is None
    check_tx(tso4(gso_type=GSO_TCPV6), tagged, 3000, ALL_TX)


@pytest.mark.parametrize(("gso", "policy_field"), [(GSO_TCPV4, "tso4"), (GSO_TCPV6, "tso6"), (GSO_UDP, "ufo"),
                                                    (GSO_UDP_L4, "uso")])
def test_each_gso_type_needs_its_own_feature(gso, policy_field):
    frame = ip6_frame(3000) if gso == GSO_TCPV6 else ip4_frame(3000)
    only = HeaderPolicy(csum=True, **{policy_field: True})
    assert check_tx(tso4(gso_type=gso), frame[:64], len(frame), only).gso_type == gso
    others = HeaderPolicy(csum=True, **{f: True for f in ("tso4", "tso6", "ufo", "uso") if f != policy_field})
    assert reason(tso4(gso_type=gso), frame, others) == "gso_not_negotiated"


@given(
    flags=st.integers(0, 255), gso_type=st.integers(0, 255), hdr_len=st.integers(0, 0xFFFF),
    gso_size=st.integers(0, 0xFFFF), csum_start=st.integers(0, 0xFFFF), csum_offset=st.integers(0, 0xFFFF),
    num_buffers=st.integers(0, 0xFFFF), frame_len=st.integers(0, MAX_FRAME_LEN + 10),
    ipv6=st.booleans(), features=st.integers(0, (1 << 64) - 1), mtu=st.integers(68, 65535),
)
def test_whatever_passes_the_transmit_check_is_safe_for_the_tap(
    flags, gso_type, hdr_len, gso_size, csum_start, csum_offset, num_buffers, frame_len, ipv6, features, mtu
):
    """Any header either raises HeaderError or comes out consistent with the negotiated features."""
    hdr = VnetHdr(flags, gso_type, hdr_len, gso_size, csum_start, csum_offset, num_buffers)
    policy = HeaderPolicy.for_tx(features, mtu)
    head = (ip6_frame(50) if ipv6 else ip4_frame(50))[: min(64, frame_len)]
    try:
        out = check_tx(hdr, head, frame_len, policy)
    except HeaderError as e:
        assert e.reason and e.reason.isidentifier()
        return
    assert ETH_HLEN <= frame_len <= MAX_FRAME_LEN
    assert out.num_buffers == 0
    assert out.flags & ~F_NEEDS_CSUM == 0
    assert out.hdr_len <= frame_len
    if out.flags & F_NEEDS_CSUM:
        assert features >> nf.F_CSUM & 1
        assert out.csum_start + out.csum_offset + 2 <= frame_len
    else:
        assert out.csum_start == out.csum_offset == 0
    base = out.gso_type & ~GSO_ECN
    if out.gso_type == GSO_NONE:
        assert out.gso_size == 0
        if features >> nf.F_MTU & 1:
            assert frame_len <= mtu + ETH_HLEN + 4
    else:
        assert out.flags & F_NEEDS_CSUM and out.gso_size > 0
        needed = {GSO_TCPV4: nf.F_HOST_TSO4, GSO_TCPV6: nf.F_HOST_TSO6, GSO_UDP: nf.F_HOST_UFO,
                  GSO_UDP_L4: nf.F_HOST_USO}[base]
        assert features >> needed & 1
        assert not out.gso_type & GSO_ECN or features >> nf.F_HOST_ECN & 1
        assert not (base == GSO_TCPV4 and ipv6) and not (base == GSO_TCPV6 and not ipv6)
    assert len(out.pack()) == HDR_LEN


def test_receive_check_clears_data_valid_without_guest_csum():
    out = check_rx(VnetHdr(flags=F_DATA_VALID), 100, HeaderPolicy.for_rx(0))
    assert out.flags == 0
    out = check_rx(VnetHdr(flags=F_DATA_VALID), 100, HeaderPolicy.for_rx(1 << nf.F_GUEST_CSUM))
    assert out.flags == F_DATA_VALID


def test_receive_check_refuses_offloads_the_driver_lacks():
    partial = VnetHdr(flags=F_NEEDS_CSUM, csum_start=34, csum_offset=6)
    with pytest.raises(HeaderError, match="rx_csum_not_negotiated"):
        check_rx(partial, 100, HeaderPolicy.for_rx(0))
    guest_csum = HeaderPolicy.for_rx(1 << nf.F_GUEST_CSUM)
    assert check_rx(partial, 100, guest_csum) == partial
    with pytest.raises(HeaderError, match="rx_gso_not_negotiated"):
        check_rx(tso4(), 3000, guest_csum)
    with_tso = HeaderPolicy.for_rx(1 << nf.F_GUEST_CSUM | 1 << nf.F_GUEST_TSO4)
    assert check_rx(tso4(), 3000, with_tso) == tso4()
    with pytest.raises(HeaderError, match="rx_oversize_frame"):
        check_rx(VnetHdr(), 2000, HeaderPolicy.for_rx(1 << nf.F_MTU, mtu=1500))


# ---- feature dependencies (virtio 1.2, 5.1.3.1) -------------------------------------------------------


def test_offer_is_closed_under_the_dependencies():
    b = nf.bit
    offer = nf.close_offer(
        b(nf.F_GUEST_TSO4) | b(nf.F_GUEST_ECN) | b(nf.F_HOST_TSO6) | b(nf.F_CSUM) | b(nf.F_MQ)
    )
    # GUEST_TSO4 lacks GUEST_CSUM, so it goes, and GUEST_ECN (needs a GUEST_TSO) goes with it
    assert offer == b(nf.F_HOST_TSO6) | b(nf.F_CSUM)


def test_driver_selection_breaking_a_dependency_is_named():
    b = nf.bit
    assert nf.dependency_violation(b(nf.F_GUEST_CSUM) | b(nf.F_GUEST_TSO4)) is None
    assert nf.dependency_violation(b(nf.F_GUEST_TSO4)) == "GUEST_TSO4 requires GUEST_CSUM"
    assert (
        nf.dependency_violation(b(nf.F_HOST_ECN) | b(nf.F_CSUM)) == "HOST_ECN requires HOST_TSO4 or HOST_TSO6"
    )
    assert nf.dependency_violation(b(nf.F_MQ)) == "MQ requires CTRL_VQ"


@given(st.integers(0, (1 << 64) - 1))
def test_closed_offers_never_violate(features):
    closed = nf.close_offer(features)
    assert closed & ~features == 0
    assert nf.dependency_violation(closed) is None
    assert nf.close_offer(closed) == closed
