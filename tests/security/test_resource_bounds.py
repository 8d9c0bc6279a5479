"""A hostile guest cannot grow vdm's memory without bound nor starve other devices or queues.

Each test plays one misbehaving driver against real devices whose kicks go through one shared
:class:`vdm.eventloop.EventLoop`, as under ``vdm run`` (vdm.vmm routes every ioeventfd there):

* endless requests -- the blk queue is republished the moment anything comes back;
* a kick storm -- a queue kicked in a tight loop with nothing on it;
* receive buffers never given -- the host keeps sending to a net device whose guest posts none;
* chains that all point at one huge buffer -- one request "carrying" 16 or 64 times that buffer;
* chains that share one long tail -- Q heads whose walks cost Q * (Q + 1) / 2 descriptor reads.

The bounds (see SECURITY.md): memory vdm allocates for a queue is bounded by the queue size, not
by how many requests the guest sends; data is never copied per descriptor (a chain's buffers are
passed on as views of guest RAM); another device's request is served within BOUND_S even while
one queue is flooded. Memory is measured with tracemalloc (Python allocations -- where a leak in
vdm would show).
"""

from __future__ import annotations

import collections
import os
import socket
import struct
import time
import tracemalloc

import pytest
from vdm.device import KICK_BUDGET
from vdm.eventfd import eventfd_write
from vdm.eventloop import EventLoop
from vdm.testing import GuestRam, VirtioTestDriver
from vdm.testing.devices import EchoDevice
from vdm.transport.mmio import Reg
from vdm.virtqueue import Virtqueue
from vdm.vmm import Vmm
from vdm_blk.config import BlkConfig
from vdm_blk.device import BlkDevice

from tests.blk.memdisk import MemoryDisk
from tests.core.test_vmm import FakeHypervisor
from tests.security.guest import F_NEXT, F_WRITE, Flooder, KickStorm, attach_kicks, publish_shared_tail

#: the longest another device may wait for a request while one queue is flooded or stormed
BOUND_S = 0.5
#: growth of vdm's Python heap allowed over a long flood (the flood is bounded by the queue size)
GROWTH_BYTES = 1 << 20
BLK_HDR = struct.Struct("<IIQ")


@pytest.fixture
def loop():
    ev = EventLoop("security-test").start()
    yield ev
    ev.stop()


def _blk(loop, disk_size: int = 8 << 20, queue_size: int = 128):
    disk = MemoryDisk(disk_size)
    disk.calls = collections.deque(maxlen=16)  # type: ignore[assignment]  # the test disk's own log
    dev = BlkDevice(disk, BlkConfig(path="mem", queue_size=queue_size, iothreads=2))  # type: ignore[arg-type]
    drv = VirtioTestDriver(dev, ram_size=4 << 20)
    drv.init()
    return dev, drv, attach_kicks(loop, dev)


def _read_chains(drv: VirtioTestDriver, n: int, data_len: int = 4096) -> list[list[tuple[int, int, int]]]:
    chains = []
    for i in range(n):
        hdr = drv.ram.alloc(16, 8)
        drv.ram.write(hdr, BLK_HDR.pack(0, 0, (i * 8) % 1024))  # T_IN
        buf = drv.ram.alloc(data_len, 8)
        status = drv.ram.alloc(1, 1)
        chains.append([(hdr, 16, 0), (buf, data_len, F_WRITE), (status, 1, F_WRITE)])
    return chains


def _echo(loop):
    dev = EchoDevice()
    drv = VirtioTestDriver(dev, ram_size=256 << 10)
    drv.init()
    return dev, drv, attach_kicks(loop, dev)


def _latencies(drv: VirtioTestDriver, kick_fd: int, n: int) -> list[float]:
    out = []
    for i in range(n):
        msg = b"ping%04d" % i
        t0 = time.monotonic()
        drv.post(0, [msg], [len(msg)])
        eventfd_write(kick_fd, 1)
        (used,) = drv.wait(0, 1, timeout=10)
        out.append(time.monotonic() - t0)
        assert used.data == msg
        time.sleep(0.01)
    return out


def test_a_flooded_blk_queue_does_not_starve_another_device(loop):
    blk, blk_drv, blk_kicks = _blk(loop)
    echo, echo_drv, echo_kicks = _echo(loop)
    flood = Flooder(blk_drv, 0, blk_kicks[0], _read_chains(blk_drv, 128))
    flood.start()
    try:
        time.sleep(0.3)
        lat = _latencies(echo_drv, echo_kicks[0], 30)
        assert flood.served > 100, "the flood never got going"
        assert max(lat) < BOUND_S, f"echo waited up to {max(lat):.2f} s behind the blk flood"
    finally:
        flood.stop.set()
        flood.join(5)
        blk.close()
        echo.reset()
    print(f"flood: {flood.served} blk requests; echo latency max {max(lat) * 1000:.1f} ms")


def test_endless_requests_do_not_grow_memory(loop):
    blk, blk_drv, blk_kicks = _blk(loop)
    flood = Flooder(blk_drv, 0, blk_kicks[0], _read_chains(blk_drv, 128))
    tracemalloc.start()
    try:
        flood.start()
        time.sleep(1.0)  # warm up: pools, caches, the queue full once
        base, _ = tracemalloc.get_traced_memory()
        served0 = flood.served
        time.sleep(3.0)
        now, peak = tracemalloc.get_traced_memory()
        served = flood.served - served0
    finally:
        tracemalloc.stop()
        flood.stop.set()
        flood.join(5)
        blk.close()
    assert served > 500, f"only {served} requests in 3 s: not a flood"
    assert now - base < GROWTH_BYTES, f"heap grew {now - base} bytes over {served} requests"
    print(f"endless requests: {served} served in 3 s, heap growth {now - base} bytes, peak {peak}")


def test_a_kick_storm_does_not_starve_another_device_or_break_the_stormed_one(loop):
    blk, blk_drv, blk_kicks = _blk(loop)
    echo, echo_drv, echo_kicks = _echo(loop)
    storm = KickStorm(blk_kicks[0])
    storm.start()
    try:
        time.sleep(0.2)
        lat = _latencies(echo_drv, echo_kicks[0], 30)
        assert storm.kicks > 1000
        assert max(lat) < BOUND_S, f"echo waited up to {max(lat):.2f} s behind the kick storm"
        # the stormed queue still serves a real request
        used = blk_drv.request(0, [BLK_HDR.pack(0, 0, 0)], [512, 1], timeout=5)
        assert used.data[-1] == 0
    finally:
        storm.stop.set()
        storm.join(5)
        blk.close()
        echo.reset()


@pytest.mark.parametrize("copies", [16, 64])
def test_chains_pointing_at_one_huge_buffer_are_not_copied(loop, copies):
    """A write whose chain names the same 1 MiB buffer ``copies`` times: served (or refused)
    without vdm allocating anything like ``copies`` MiB."""
    mib = 1 << 20
    blk, drv, kicks = _blk(loop, disk_size=(copies + 1) * mib, queue_size=128)
    ram = drv.ram
    big = ram.alloc(mib, 4096)
    ram.write(big, os.urandom(16) * (mib // 16))
    hdr = ram.alloc(16, 8)
    ram.write(hdr, BLK_HDR.pack(1, 0, 0))  # T_OUT at sector 0
    status = ram.alloc(1, 1)
    ram.write(status, b"\xee")
    bufs = [(hdr, 16, 0)] + [(big, mib, 0)] * copies + [(status, 1, F_WRITE)]
    for i, (addr, length, flags) in enumerate(bufs):
        more = 1 if i + 1 < len(bufs) else 0
        drv.write_desc(0, i, addr, length, flags | more, i + 1 if more else 0)
    tracemalloc.start()
    try:
        drv.publish(0, 0)
        eventfd_write(kicks[0], 1)
        deadline = time.monotonic() + 20
        while drv.used_idx(0) == 0 and time.monotonic() < deadline:
            time.sleep(0.005)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    try:
        assert drv.used_idx(0) == 1, "the request never completed"
        assert ram.read(status, 1) in (b"\x00", b"\x01"), "no status written"
        if ram.read(status, 1) == b"\x00":
            assert blk.backend.data[copies * mib - mib : copies * mib] == ram.read(big, mib)
        assert peak < 4 * mib, f"vdm allocated {peak} bytes for a {copies} MiB chain"
    finally:
        blk.close()
    print(f"{copies} x 1 MiB chain: peak heap {peak} bytes")


def test_receive_buffers_never_given_cost_vdm_nothing(loop):
    """The guest posts no receive buffers while the host floods its tap: vdm stops reading (the
    kernel's socket buffer pushes back on the sender), its heap does not grow, and transmit on the
    same pair still works."""
    from vdm_net.config import NetConfig
    from vdm_net.device import VirtioNet
    from vdm_net.vnet_hdr import HDR_LEN

    from tests.net.test_flow_control import FakeTap

    tap = FakeTap()
    dev = VirtioNet(NetConfig(), tap)  # type: ignore[arg-type]
    drv = VirtioTestDriver(dev, ram_size=1 << 20)
    drv.init()
    peer = tap.peers[0]
    peer.setblocking(False)
    frame = bytes(HDR_LEN) + b"\xff" * 6 + b"\x02" * 6 + b"\x08\x00" + os.urandom(1400)
    tracemalloc.start()
    sent = refused = 0
    try:
        t_end = time.monotonic() + 2.0
        base = None
        while time.monotonic() < t_end:
            try:
                peer.send(frame)
                sent += 1
            except BlockingIOError:
                refused += 1
                if base is None:
                    base, _ = tracemalloc.get_traced_memory()
                time.sleep(0.001)
        now, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    try:
        assert refused > 0, f"the host sent {sent} frames and never met back-pressure"
        assert base is not None and now - base < GROWTH_BYTES, f"heap grew {now - (base or 0)} bytes"
        st = dev.stats()
        assert st.get("rx_stalls", 0) >= 1, st
        # the transmit queue of the same pair is not held up by the stalled receive side
        tx = bytes(HDR_LEN) + b"\x02" * 6 + b"\x04" * 6 + b"\x08\x00" + b"tx-while-stalled"
        drv.post(1, [tx])
        drv.kick(1)
        drv.wait(1, 1, timeout=5)
        got = []
        peer.settimeout(2)
        while True:
            try:
                m = peer.recv(1 << 17)
            except (socket.timeout, BlockingIOError):
                break
            got.append(m)
            if m.endswith(b"tx-while-stalled"):
                break
        assert any(m.endswith(b"tx-while-stalled") for m in got), "transmit stalled with receive"
    finally:
        dev.reset()
        tap.close()
    print(f"rx never returned: host sent {sent} frames before back-pressure; heap growth {now - base}")


class _ShapedEcho(EchoDevice):
    """An echo device with a queue of ``size`` entries and a hook run on its next processing."""

    def __init__(self, size: int) -> None:
        self.queue_max_sizes = (size,)
        super().__init__()
        self.on_process = None
        #: what the hook returned, one entry per call
        self.observed: list[object] = []

    def process_queue(self, queue: Virtqueue) -> None:
        if self.on_process is not None:
            self.observed.append(self.on_process())
        super().process_queue(queue)


#: queue size of the shared-tail test: its ring costs 1024 * 1025 / 2 = 524,800 descriptor reads
TAIL_Q = 1024


def test_a_ring_of_chains_sharing_one_tail_does_not_starve_another_device():
    """Two devices on one Vmm (one event loop, ioeventfd kicks, as under ``vdm run``). The guest
    fills one queue with chains sharing one long tail and kicks it; while vdm is walking that ring
    the guest kicks the other device. The other device's request must be answered after at most
    one slice of the hostile queue's work, not after the whole quadratic walk; and the hostile
    queue must still be served to the end (nothing stranded by the yield)."""
    ram = GuestRam(1 << 20)
    hv = FakeHypervisor(ram)
    vmm = Vmm(hv, name="tail")
    hostile, other = _ShapedEcho(TAIL_Q), _ShapedEcho(16)
    th, to = vmm.attach_mmio(hostile), vmm.attach_mmio(other)
    try:
        hdrv = VirtioTestDriver(hostile, ram=ram, transport=th)
        odrv = VirtioTestDriver(other, ram=ram, transport=to)
        hdrv.init()
        odrv.init()
        buf = ram.alloc(8, 8)
        ram.write(buf, b"tailtail")

        def kick_the_other_device():
            # the guest, on another vCPU, asks the other device for something meanwhile
            hostile.on_process = None
            odrv.post(0, [b"ping"], [4])
            hv.guest_write(to.base + Reg.QUEUE_NOTIFY, 0)

        hostile.on_process = kick_the_other_device
        other.on_process = lambda: len(hostile.seen)  # hostile chains served when the other runs
        n = publish_shared_tail(hdrv, 0, buf, 8)
        hv.guest_write(th.base + Reg.QUEUE_NOTIFY, 0)
        (used,) = odrv.wait(0, 1, timeout=60)
        assert used.data == b"ping"
        served_before = other.observed[0]
        assert isinstance(served_before, int)
        walked_before = sum(n - i for i in range(served_before))
        # one slice: the kick budget, plus the one chain that crossed it (a chain is not split)
        one_slice = KICK_BUDGET + TAIL_Q
        assert walked_before <= 2 * one_slice, (
            f"the other device waited for {served_before} of {n} hostile chains "
            f"({walked_before} descriptor reads of {n * (n + 1) // 2})"
        )
        # the hostile queue is not stranded: every chain comes back, without another kick
        deadline = time.monotonic() + 120
        while hdrv.used_idx(0) != n and time.monotonic() < deadline and not hdrv.needs_reset:
            time.sleep(0.01)
        assert hdrv.used_idx(0) == n, f"hostile queue: {hdrv.used_idx(0)} of {n} chains came back"
        assert not hostile.broken and not other.broken
        print(f"shared tail, Q={n}: the other device was served after {served_before} hostile chains "
              f"({walked_before} descriptor reads of {n * (n + 1) // 2})")
    finally:
        vmm.close()
    ram.check_guards()


def test_a_ring_sharing_one_tail_does_not_starve_another_vhost_user_device(tmp_path):
    """The same hostile ring, as ``vdm vhost-user`` with two devices serves it: one event loop,
    one socket and connection per device, kick eventfds from the frontend."""
    from vdm_vhost_user.server import VhostUserServer

    from tests.vhost_user.frontend import Frontend, SharedRam

    loop = EventLoop("tail-vu").start()
    hostile, other = _ShapedEcho(TAIL_Q), _ShapedEcho(16)
    servers = [VhostUserServer(str(tmp_path / f"{n}.sock"), d, loop).start()
               for n, d in (("hostile", hostile), ("other", other))]
    fes: list[Frontend] = []
    try:
        h = Frontend(servers[0].path, SharedRam(1 << 20))
        fes.append(h)
        h.start(queues={0: TAIL_Q})
        o = Frontend(servers[1].path)
        fes.append(o)
        o.start(queues={0: 16})
        q = h.queues[0]
        buf = h.ram.alloc(8, 8)
        for i in range(TAIL_Q):  # the ring of publish_shared_tail, written by the frontend
            more = F_NEXT if i + 1 < TAIL_Q else 0
            q.write_desc(i, buf, 8, more, i + 1 if more else 0)
        for i in range(TAIL_Q):
            q.publish(i)

        def kick_the_other_device():
            hostile.on_process = None
            o.post(0, [b"ping"], [4])  # posts and kicks

        hostile.on_process = kick_the_other_device
        other.on_process = lambda: len(hostile.seen)
        h.kick(0)
        (used,) = o.poll_used(0, 1, timeout=60)
        assert used.data == b"ping"
        served_before = next(x for x in other.observed if isinstance(x, int) and x)
        walked_before = sum(TAIL_Q - i for i in range(served_before))
        assert walked_before <= 2 * (KICK_BUDGET + TAIL_Q), (
            f"the other device waited for {served_before} of {TAIL_Q} hostile chains "
            f"({walked_before} descriptor reads)"
        )
    finally:
        for fe in fes:
            fe.close()
            fe.ram.close()
        for s in servers:
            s.close()
        loop.stop()
