"""The compiled transmit step (vdm_net.fastsend) sends, drops and counts exactly as the Python path.

Each case runs the same chains through two devices on FakeTaps: one with the pair's compiled step
(when it is built and the core's compiled path is on), one with it taken away (the Python path,
``_send``), and compares what the tap got, the counters, the used ring and whether the device
failed. Random and hostile chains: headers of every kind (bad GSO types, checksums outside the
frame, runts, unnegotiated offloads), frames split over several buffers (the header too),
writable buffers in a transmit chain, a buffer outside guest RAM, a tap that pushes back and a
tap whose write fails. Without the compiled step both devices take the Python path: the cases
still run (and pass), comparing it with itself.
"""

from __future__ import annotations

import socket
import time

import pytest
import vdm.fastpath
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from vdm.testing import FeaturesRefused, VirtioTestDriver
from vdm_net import fastsend
from vdm_net.config import NetConfig
from vdm_net.device import VirtioNet
from vdm_net.vnet_hdr import VnetHdr

from tests.net.fake_tap import FakeTap

COMPILED = fastsend.ACTIVE and vdm.fastpath.ACTIVE

headers = st.builds(
    VnetHdr,
    flags=st.integers(0, 255),
    gso_type=st.sampled_from([0, 0, 0, 1, 3, 4, 5, 0x81, 0x84, 0x83, 0x85, 2, 0x80, 0x7F]),
    hdr_len=st.sampled_from([0, 14, 54, 66, 300, 0xFFFF]),
    gso_size=st.sampled_from([0, 1, 1448, 0xFFFF]),
    csum_start=st.integers(0, 200),
    csum_offset=st.integers(0, 200),
    num_buffers=st.integers(0, 0xFFFF),
)
frames = st.tuples(
    st.sampled_from([b"\x08\x00", b"\x86\xdd", b"\x88\xb5", b"\x81\x00\x00\x01\x08\x00",
                     b"\x81\x00\x00\x01\x86\xdd", b"\x88\xa8\x00\x01\x81\x00\x00\x02\x08\x00"]),
    st.binary(max_size=300),
    st.integers(0, 20),  # bytes to cut off the front (runts, short headers)
)  # fmt: skip
chains = st.tuples(headers, frames, st.integers(1, 5), st.sampled_from([(), (), (), (16,)]))


class Run:
    """One device on a FakeTap, with (``compiled``) or without its compiled transmit step."""

    def __init__(self, compiled: bool, exclude: int, mtu: int | None = None) -> None:
        self.tap = FakeTap()
        self.dev = VirtioNet(NetConfig(mtu=mtu), self.tap)  # type: ignore[arg-type]
        self.drv = VirtioTestDriver(self.dev)
        offered = self.drv.device_features()
        try:
            self.drv.init(offered & ~exclude)
        except FeaturesRefused:
            self.drv.init()
        pair = self.dev.pairs[0]
        if compiled:
            assert (pair.tx_step is not None) == fastsend.ACTIVE
        else:
            pair.tx_step = None
        self.served = 0
        q = self.dev.queues[1]
        inner = q.serve_compiled

        def counted(fn, ctx):
            got = inner(fn, ctx)
            if got is not None:
                self.served += got[0] + got[1]
            return got

        q.serve_compiled = counted  # type: ignore[method-assign]

    def post(self, hdr: VnetHdr, frame: tuple[bytes, bytes, int], pieces: int, in_lens) -> int:
        etype, body, cut = frame
        data = (hdr.pack() + bytes(12) + etype + body)[cut:]
        step = max(1, len(data) // pieces)
        return self.drv.post(1, [data[i : i + step] for i in range(0, len(data), step)] or [b""], in_lens)

    def collect(self, count: int, timeout: float = 3.0) -> list[tuple[int, int]]:
        used = []
        deadline = time.monotonic() + timeout
        while len(used) < count and time.monotonic() < deadline and not self.drv.needs_reset:
            used += [(u.head, u.written) for u in self.drv.collect(1)]
            if len(used) < count:
                time.sleep(0.002)
        return used

    def result(self, used: list[tuple[int, int]], drain: bool = True) -> tuple:
        sent = self.tap.drain(0) if drain else []  # (a shut-down peer reads EOF for ever)
        return sent, used, self.stats(len(used)), self.dev.broken, self.drv.needs_reset

    def stats(self, completed: int, timeout: float = 2.0) -> dict[str, int]:
        """The device's counters once they count the ``completed`` chains (each is sent or dropped).

        The compiled step publishes its chains and then counts them (VirtioNet._count_compiled);
        when the poller's thread resumes a pushed-back queue, the driver can see a chain before
        that thread has counted it."""
        deadline = time.monotonic() + timeout
        while True:
            st = self.dev.stats()
            if st["tx_packets"] + st["tx_dropped"] >= completed or time.monotonic() > deadline:
                return st
            time.sleep(0.002)

    def close(self) -> None:
        self.dev.reset()
        self.tap.close()
        self.drv.ram.check_guards()


def _both(fn):
    """fn(run) on a compiled and a Python device; both results (compiled first) and the runs."""
    runs = [Run(True, *fn.args), Run(False, *fn.args)]
    try:
        return [fn(r) for r in runs], runs
    finally:
        for r in runs:
            r.close()


class Case:
    def __init__(self, body, *args) -> None:
        self.body = body
        self.args = args

    def __call__(self, run: Run):
        return self.body(run)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(chains, min_size=1, max_size=12), st.integers(0, 0x7FFF), st.sampled_from([None, 1500, 68]))
def test_random_chains_are_sent_dropped_and_counted_as_the_python_path_does(items, exclude, mtu):
    def body(run: Run):
        for hdr, frame, pieces, in_lens in items:
            run.post(hdr, frame, pieces, in_lens)
        run.drv.kick(1)
        return run.result(run.collect(len(items)))

    (compiled, python), _ = _both(Case(body, exclude, mtu))
    assert compiled == python
    assert len(python[1]) == len(items) and not python[4]


@pytest.mark.skipif(not COMPILED, reason="the compiled transmit step is not active")
def test_the_compiled_step_sends_plain_frames():
    def body(run: Run):
        for pieces in (1, 2, 3):
            run.post(VnetHdr(), (b"\x88\xb5", bytes(100), 0), pieces, ())
        run.drv.kick(1)
        return run.result(run.collect(3))

    (compiled, python), (c, p) = _both(Case(body, 0))
    assert compiled == python and len(python[0]) == 3
    assert c.served == 3 and p.served == 0


def test_a_buffer_outside_guest_ram_fails_the_device_the_same_way():
    good = (b"\x88\xb5", bytes(60), 0)

    def body(run: Run):
        run.post(VnetHdr(), good, 1, ())
        head = run.post(VnetHdr(), good, 1, ())
        run.post(VnetHdr(), good, 1, ())
        run.drv.write_desc(1, head, run.drv.ram.size - 8, 74, 0, 0)  # (past the end of RAM)
        run.drv.kick(1)
        used = run.collect(3, timeout=1.0)
        return run.result(used)

    (compiled, python), _ = _both(Case(body, 0))
    assert compiled == python
    assert python[3] is not None and python[4]


def test_a_tap_that_pushes_back_keeps_the_chain_as_the_python_path_does():
    frame = (b"\x88\xb5", bytes(1000), 0)

    def body(run: Run):
        run.tap.fill(0)
        for _ in range(4):
            run.post(VnetHdr(), frame, 2, ())
        run.drv.kick(1)
        time.sleep(0.05)
        pair = run.dev.pairs[0]
        blocked = (pair.tx_blocked, pair.tx_chain is not None, run.dev.stats().get("tx_tap_full"),
                   len(run.drv.collect(1)))  # fmt: skip
        early = [m for m in run.tap.drain(0) if len(m) != 4096]  # (the filler goes: the poller resumes)
        sent, used, stats, *rest = run.result(run.collect(4))
        stats.pop("tx_tap_full")  # (how often it pushed back while the peer drained: a race)
        return blocked, early + sent, used, stats, rest

    (compiled, python), _ = _both(Case(body, 0))
    assert compiled[0] == python[0] == (True, True, 1, 0)
    assert compiled[1:] == python[1:] and len(python[1]) == 4 and len(python[2]) == 4


def test_a_failed_tap_write_is_counted_once_and_not_redone():
    frame = (b"\x88\xb5", bytes(100), 0)

    def body(run: Run):
        run.tap.peers[0].shutdown(socket.SHUT_RDWR)  # (writes to the tap end fail: EPIPE)
        for _ in range(3):
            run.post(VnetHdr(), frame, 1, ())
        run.drv.kick(1)
        return run.result(run.collect(3), drain=False)

    (compiled, python), _ = _both(Case(body, 0))
    assert compiled[1:] == python[1:]
    assert python[2]["tx_errors"] == 3 and python[2]["tx_dropped"] == 3, python[2]
