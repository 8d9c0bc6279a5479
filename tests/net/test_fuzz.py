"""Whatever the guest puts on the transmit and control queues, the device survives and accounts for it."""

from __future__ import annotations

import struct

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from vdm.testing import FeaturesRefused, VirtioTestDriver
from vdm_net.config import NetConfig
from vdm_net.device import CTRL_ERR, CTRL_OK, VirtioNet
from vdm_net.vnet_hdr import HDR_LEN, VnetHdr

from tests.net.test_flow_control import FakeTap

headers = st.builds(
    VnetHdr,
    flags=st.integers(0, 255),
    gso_type=st.sampled_from([0, 1, 3, 4, 5, 0x81, 0x84, 2, 0x80, 0x7F]),
    hdr_len=st.integers(0, 0xFFFF),
    gso_size=st.integers(0, 0xFFFF),
    csum_start=st.integers(0, 200),
    csum_offset=st.integers(0, 200),
    num_buffers=st.integers(0, 0xFFFF),
)
frames = st.tuples(
    st.sampled_from([b"\x08\x00", b"\x86\xdd", b"\x88\xb5", b"\x81\x00\x00\x01\x08\x00"]),
    st.binary(max_size=300),
    st.integers(0, 20),  # bytes to cut off the front (runts)
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(st.tuples(headers, frames, st.integers(1, 4)), min_size=1, max_size=12),
    st.integers(0, 0x7FFF),
)
def test_every_transmitted_chain_is_sent_or_counted(items, dropped_features):
    tap = FakeTap()
    dev = VirtioNet(NetConfig(), tap)  # type: ignore[arg-type]
    drv = VirtioTestDriver(dev)
    try:
        offered = drv.device_features()
        try:
            drv.init(offered & ~dropped_features)  # some of the offloads (bits 0..14) left out
        except FeaturesRefused:
            drv.init()  # that selection broke a dependency: take everything
        for hdr, (etype, body, cut), pieces in items:
            data = (hdr.pack() + bytes(12) + etype + body)[cut:]
            step = max(1, len(data) // pieces)
            drv.post(1, [data[i : i + step] for i in range(0, len(data), step)] or [b""])
        drv.kick(1)
        used = drv.wait(1, len(items))
        assert all(u.written == 0 for u in used)
        sent = []
        tap.peers[0].setblocking(False)
        try:
            while True:
                sent.append(tap.peers[0].recv(1 << 17))
        except BlockingIOError:
            pass
        st_ = dev.stats()
        assert st_["tx_packets"] == len(sent)
        assert st_["tx_packets"] + st_["tx_dropped"] == len(items)
        for msg in sent:
            out = VnetHdr.unpack(msg)
            assert out.num_buffers == 0 and len(msg) - HDR_LEN >= 14
        assert dev.broken is None and not drv.needs_reset
    finally:
        dev.reset()
        tap.close()
        drv.ram.check_guards()


@settings(max_examples=80, deadline=None)
@given(st.lists(st.binary(max_size=40), min_size=1, max_size=10))
def test_any_control_command_gets_an_answer(commands):
    tap = FakeTap(queues=2)
    dev = VirtioNet(NetConfig(queues=2), tap)  # type: ignore[arg-type]
    drv = VirtioTestDriver(dev)
    try:
        drv.init()
        for cmd in commands:
            used = drv.request(4, [cmd] if cmd else [b"\0"], [1])
            assert used.written == 1 and used.data[0] in (CTRL_OK, CTRL_ERR)
        assert dev.broken is None
        assert 1 <= dev.active_pairs <= 2
        assert struct.unpack("<H", drv.config_bytes(8, 2))[0] == 2
    finally:
        dev.reset()
        tap.close()


@settings(max_examples=300, deadline=None)
@given(headers, st.integers(0, 70000), st.integers(0, 0x3FFFFFF), st.sampled_from([None, 68, 1500, 9000]))
def test_the_receive_header_checked_in_place_is_check_rx(hdr, frame_len, features, mtu):
    """check_rx_into (the receive path's) writes what check_rx returns, or raises what it raises."""
    from vdm_net.vnet_hdr import HeaderError, HeaderPolicy, check_rx, check_rx_into

    policy = HeaderPolicy.for_rx(features, mtu)
    buf = bytearray(hdr.pack() + b"frame")
    try:
        want: VnetHdr | str = check_rx(hdr, frame_len, policy)
    except HeaderError as e:
        want = str(e)
    try:
        check_rx_into(buf, frame_len, policy)
        got: VnetHdr | str = VnetHdr.unpack(buf)
    except HeaderError as e:
        got = str(e)
    assert got == want
    assert buf[HDR_LEN:] == b"frame"
