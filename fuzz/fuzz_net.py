#!/usr/bin/env python3
"""Fuzz target: virtio-net request handling -- transmitted frames, receive buffers, control queue.

The input drives a vdm_net device over a fake tap (SOCK_SEQPACKET socketpairs, so neither root nor
a network namespace is needed): transmitted frames with hostile virtio-net headers (any flags,
GSO type, header/segment sizes, checksum offsets), split over several descriptors; control
commands of any class, command and length, with status buffers of any size; frames arriving from
the tap into receive buffers of any layout (also too small for a header). Invariants: every
transmitted chain comes back with nothing written, and is either on the tap or counted as
dropped; every control command is answered OK or ERR (or the device marks itself broken when
the chain has no room for the answer); a receive buffer is never written past its length;
active queue pairs stay within what was offered; nothing outside guest RAM changes.
"""

from __future__ import annotations

import struct
import sys
import time

import common

TX_ETHERTYPES = (b"\x08\x00", b"\x86\xdd", b"\x88\xb5", b"\x81\x00\x00\x01\x08\x00")


def _rx_progress(dev) -> int:
    """A number that moves whenever the receive side delivers, drops, stalls or refuses a buffer."""
    st = dev.stats()
    return sum(st.get(k, 0) for k in ("rx_packets", "rx_dropped", "rx_stalls", "rx_bad_buffers"))


def _settle(drv, dev, mark: int, timeout: float = 1.0):
    """Wait until the receive side did something about the frame; its used buffers (None: broken)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if drv.needs_reset:
            return None
        if _rx_progress(dev) != mark:
            time.sleep(0.0005)  # the used ring entry follows the counter
            return drv.collect(0)
        time.sleep(0.0002)
    return drv.collect(0)


def one_input(data: bytes) -> None:
    import atheris
    from vdm.testing import FeaturesRefused, VirtioTestDriver
    from vdm_net.config import NetConfig
    from vdm_net.device import CTRL_ERR, CTRL_OK, VirtioNet
    from vdm_net.vnet_hdr import HDR_LEN

    from tests.net.test_flow_control import FakeTap

    fdp = atheris.FuzzedDataProvider(data)
    opened = common.watch_files()
    opened.clear()
    pairs = fdp.ConsumeIntInRange(1, 2)
    tap = FakeTap(queues=pairs)
    dev = VirtioNet(NetConfig(queues=pairs), tap)  # type: ignore[arg-type]
    drv = VirtioTestDriver(dev, ram_size=1 << 20)
    try:
        try:
            drv.init(exclude=fdp.ConsumeIntInRange(0, (1 << 24) - 1) & ~(1 << 17))  # keep CTRL_VQ
        except FeaturesRefused:
            drv.init()
        ctrl_q = 2 * pairs if drv.features >> 22 & 1 else 2  # MQ moves the control queue
        hdr_len = HDR_LEN
        sent_tx = 0
        for _ in range(fdp.ConsumeIntInRange(1, 10)):
            op = fdp.ConsumeIntInRange(0, 2)
            if op == 0:  # transmit a frame with a hostile header
                hdr = struct.pack(
                    "<BBHHHHH",
                    fdp.ConsumeIntInRange(0, 255),
                    (0, 1, 3, 4, 5, 0x81, 0x84, fdp.ConsumeIntInRange(0, 255))[fdp.ConsumeIntInRange(0, 7)],
                    fdp.ConsumeIntInRange(0, 0xFFFF),
                    fdp.ConsumeIntInRange(0, 0xFFFF),
                    fdp.ConsumeIntInRange(0, 300),
                    fdp.ConsumeIntInRange(0, 300),
                    fdp.ConsumeIntInRange(0, 0xFFFF),
                )[:hdr_len]
                frame = hdr + bytes(12) + TX_ETHERTYPES[fdp.ConsumeIntInRange(0, 3)]
                frame += fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 1600))
                frame = frame[fdp.ConsumeIntInRange(0, 20) :]
                pieces = fdp.ConsumeIntInRange(1, 6)
                step = max(1, len(frame) // pieces)
                drv.post(1, [frame[i : i + step] for i in range(0, len(frame), step)] or [b"\0"])
                drv.kick(1)
                sent_tx += 1
            elif op == 1:  # a control command
                cmd = bytes([fdp.ConsumeIntInRange(0, 6), fdp.ConsumeIntInRange(0, 3)])
                cmd += fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 64))
                status_len = fdp.ConsumeIntInRange(0, 3)
                try:
                    used = drv.request(ctrl_q, [cmd], [status_len] if status_len else [], timeout=5)
                except TimeoutError:
                    assert drv.needs_reset or dev.broken, "control command neither answered nor device broken"
                    return
                if status_len:  # one ack byte (where in a longer status buffer is the device's choice)
                    acks = [b for b in used.data if b != 0xEE]
                    assert used.written >= 1 and len(acks) == 1 and acks[0] in (CTRL_OK, CTRL_ERR), used
                assert 1 <= dev.active_pairs <= pairs
            else:  # a frame from the host into hostile receive buffers
                frame = bytes(HDR_LEN) + fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 1600))
                in_lens = [fdp.ConsumeIntInRange(0, 2048) for _ in range(fdp.ConsumeIntInRange(1, 3))]
                in_lens = [n for n in in_lens if n] or [1]
                mark = _rx_progress(dev)
                tap.peers[0].send(frame)
                drv.post(0, [], in_lens)
                drv.kick(0)
                used = _settle(drv, dev, mark)
                if used is None:
                    return  # the device marked itself broken: allowed
                for u in used:
                    assert u.written <= len(u.data), u
        if sent_tx:
            used = drv.wait(1, sent_tx, timeout=5)
            assert all(u.written == 0 for u in used), used
            on_tap = len(tap.drain(0))
            st = dev.stats()
            assert st["tx_packets"] == on_tap, (st, on_tap)
            assert st["tx_packets"] + st["tx_dropped"] == sent_tx, st
        assert not drv.needs_reset and dev.broken is None
        assert not common.data_files(opened), f"files opened while serving the guest: {opened}"
    finally:
        dev.reset()
        tap.close()
        drv.ram.check_guards()


if __name__ == "__main__":
    common.run(
        one_input,
        (
            "vdm_net.device",
            "vdm_net.control",
            "vdm_net.vnet_hdr",
            "vdm_net.backends.poller",
            "vdm.poller",
            *common.QUEUE_MODULES,
        ),
    )
    sys.exit(0)
