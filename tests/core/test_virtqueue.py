"""The split virtqueue, driven through virtio-mmio by vdm.testing's driver against EchoDevice.

Normal chains (direct, indirect, index wrap-around at 2^16), interrupt suppression both ways with
and without EVENT_IDX, and a driver that breaks the rules: every hostile ring must end with the
device in DEVICE_NEEDS_RESET, no used buffer returned, and no byte written anywhere in guest RAM
(except the avail_event field) or outside it.
"""

from __future__ import annotations

import struct

import pytest
from vdm.device import F_EVENT_IDX, F_INDIRECT_DESC, Status
from vdm.ring_layout import avail_event_offset
from vdm.testing import VirtioTestDriver
from vdm.testing.devices import EchoDevice
from vdm.transport.mmio import Reg

from tests.core import rings

RAM = 1 << 20
INT_VRING, INT_CONFIG = 1, 2


@pytest.fixture
def echo(virtio_driver):
    def make(*, exclude: int = 0, size: int = 16) -> VirtioTestDriver:
        drv = virtio_driver(EchoDevice(), ram_size=RAM)
        drv.init(exclude=exclude, queue_sizes=[size])
        return drv

    return make


# ---- chains that follow the rules ---------------------------------------------------------------


def test_direct_chain_is_gathered_and_scattered(echo):
    drv = echo()
    used = drv.request(0, [b"hello", b" ", b"world"], [4, 3, 8])
    assert used.written == 11
    assert used.data == b"hello world" + b"\xee" * 4
    assert drv.device.seen == [b"hello world"]
    assert drv.used_idx(0) == 1


def test_indirect_chain_uses_one_ring_descriptor(echo):
    drv = echo()
    head = drv.post(0, [b"abc", b"def"], [2, 2, 2], indirect=True)
    # the whole chain sits in one ring descriptor, flagged INDIRECT, 5 entries long
    _, length, flags, _ = drv.queues[0].read_desc(head)
    assert flags == rings.INDIRECT and length == 5 * 16
    drv.kick(0)
    (used,) = drv.wait(0)
    assert (used.head, used.written, used.data) == (head, 6, b"abcdef")


def test_readable_only_and_writable_only_chains(echo):
    drv = echo()
    assert drv.request(0, [b"x" * 100]).written == 0
    used = drv.request(0, [], [16])
    assert used.written == 0 and used.data == b"\xee" * 16


def test_zero_length_descriptors_are_served(echo):
    drv = echo()
    used = drv.request(0, [b"", b"ab"], [0, 2])
    assert (used.written, used.data) == (2, b"ab")


def test_device_serves_a_full_ring_in_one_kick(echo):
    drv = echo(size=8)
    heads = [drv.post(0, [bytes([i]) * 3], [3]) for i in range(4)]
    drv.kick(0)
    used = drv.wait(0, 4)
    assert [u.head for u in used] == heads  # in order for a synchronous device
    assert [u.data for u in used] == [bytes([i]) * 3 for i in range(4)]


def test_indexes_wrap_at_2_16(echo):
    """More than 65536 requests through a 4-entry queue: both free-running indexes wrap.

    The driver reuses one two-descriptor chain (as a driver may once it came back), with a new
    payload each time, so the loop is cheap enough to go round the 16-bit index space. EVENT_IDX
    is on, so used_event/avail_event comparisons are exercised across the wrap too.
    """
    drv = echo(size=4)
    q = drv.queues[0]
    src, dst = drv.ram.alloc(4, 8), drv.ram.alloc(4, 8)
    drv.write_desc(0, 2, src, 4, rings.NEXT, 3)
    drv.write_desc(0, 3, dst, 4, rings.WRITE, 0)
    write, read = drv.ram.write, drv.ram.read
    total = 65536 + 7
    interrupts = 0
    for n in range(total):
        write(src, struct.pack("<I", n))
        drv.publish(0, 2)  # with EVENT_IDX this also sets used_event = q.last_used
        drv.kick(0)
        used = drv.used_idx(0)
        assert used == (n + 1) & 0xFFFF
        assert rings.used_elem(drv, 0, n) == (2, 4)
        assert read(dst, 4) == struct.pack("<I", n)
        q.last_used = used
        if drv.ack_interrupts() & INT_VRING:
            interrupts += 1
    assert drv.device.queues[0].last_avail_idx == total & 0xFFFF
    assert drv.avail_event(0) == total & 0xFFFF
    # the driver asked for an interrupt for every request, including across the wrap
    assert interrupts == total
    assert not drv.needs_reset


# ---- interrupt and notification suppression -----------------------------------------------------


def _submit(drv: VirtioTestDriver, used_event: int | None = None, avail_flags: int | None = None) -> None:
    drv.post(0, [b"q"], [1])
    if used_event is not None:
        rings.set_used_event(drv, 0, used_event)
    if avail_flags is not None:
        rings.set_avail_flags(drv, 0, avail_flags)
    drv.kick(0)


def test_event_idx_used_event_is_honoured(echo):
    drv = echo()
    assert drv.features >> F_EVENT_IDX & 1
    _submit(drv)
    assert drv.ack_interrupts() == INT_VRING
    # "interrupt me when the used index moves past 3": requests 2 and 3 stay silent, 4 interrupts
    for n in (2, 3):
        _submit(drv, used_event=3)
        assert drv.used_idx(0) == n
        assert drv.reg_read(Reg.INTERRUPT_STATUS) == 0 and not drv.irq.level
    edges = drv.irq.edges
    _submit(drv, used_event=3)
    assert drv.used_idx(0) == 4
    assert drv.ack_interrupts() == INT_VRING and drv.irq.edges == edges + 1
    assert not drv.irq.level  # the ack lowered the line
    # several completions in one pass that cross used_event: exactly one interrupt
    drv.collect(0)
    for _ in range(3):
        drv.post(0, [b"z"], [1])
    rings.set_used_event(drv, 0, 5)
    drv.kick(0)
    assert drv.used_idx(0) == 7
    assert drv.ack_interrupts() == INT_VRING and drv.irq.edges == edges + 2
    # a used_event the used index has already passed: no interrupt
    drv.collect(0)
    _submit(drv, used_event=2)
    assert drv.reg_read(Reg.INTERRUPT_STATUS) == 0


def test_event_idx_device_publishes_avail_event(echo):
    drv = echo()
    for n in range(1, 6):
        _submit(drv)
        assert drv.avail_event(0) == n
        drv.collect(0)
    q = drv.device.queues[0]
    # enabling notifications re-publishes avail_event; disabling has no EVENT_IDX representation
    drv.ram.write(drv.queues[0].used + avail_event_offset(drv.queues[0].size), b"\0\0")
    assert q.set_notification(True) is False
    assert drv.avail_event(0) == 5
    assert q.set_notification(False) is False
    assert rings.used_flags(drv, 0) == 0
    # buffers posted without a kick: enabling notifications tells the device to look again
    drv.post(0, [b"late"], [4])
    assert q.set_notification(True) is True


def test_without_event_idx_avail_flags_suppress_interrupts(echo):
    drv = echo(exclude=1 << F_EVENT_IDX)
    _submit(drv, avail_flags=1)  # VIRTQ_AVAIL_F_NO_INTERRUPT
    assert drv.used_idx(0) == 1
    assert drv.reg_read(Reg.INTERRUPT_STATUS) == 0 and drv.irq.edges == 0
    _submit(drv, avail_flags=0)
    assert drv.ack_interrupts() == INT_VRING and drv.irq.edges == 1
    # and the device never writes avail_event (the field past the used ring) without EVENT_IDX
    assert drv.avail_event(0) == 0


def test_without_event_idx_used_flags_suppress_kicks(echo):
    drv = echo(exclude=1 << F_EVENT_IDX)
    q = drv.device.queues[0]
    assert q.set_notification(False) is False
    assert rings.used_flags(drv, 0) == 1  # VIRTQ_USED_F_NO_NOTIFY
    assert q.set_notification(True) is False
    assert rings.used_flags(drv, 0) == 0
    drv.post(0, [b"a"], [1])
    assert q.set_notification(True) is True


# ---- a driver that breaks the rules -------------------------------------------------------------


class Hostile:
    """Snapshot guest RAM, run a hostile ring, prove the device stopped without writing anything."""

    def __init__(self, drv: VirtioTestDriver) -> None:
        self.drv = drv
        self.q = drv.queues[0]
        self.used_before = drv.used_idx(0)

    def snapshot(self) -> None:
        self.before = bytearray(self.drv.ram.read(self.drv.ram.base, self.drv.ram.size))

    def kick_and_check(self) -> None:
        drv = self.drv
        self.snapshot()
        drv.kick(0)
        assert drv.needs_reset, "device served a hostile chain"
        # caught as the guest's error by the checks, not as a crash deep inside the device
        assert drv.device.broken and not drv.device.broken.startswith("internal error"), drv.device.broken
        assert drv.reg_read(Reg.INTERRUPT_STATUS) & INT_CONFIG  # the driver is told
        assert drv.used_idx(0) == self.used_before  # nothing returned
        after = bytearray(drv.ram.read(drv.ram.base, drv.ram.size))
        # the only field the device may have touched is avail_event (written when it pops)
        ev = self.q.used + avail_event_offset(self.q.size) - drv.ram.base
        after[ev : ev + 2] = self.before[ev : ev + 2]
        assert after == self.before, "the device wrote guest memory while serving a bad chain"
        drv.ram.check_guards()
        # further kicks do nothing until the driver resets the device
        drv.kick(0)
        assert drv.used_idx(0) == self.used_before
        # and a reset brings it back to life
        drv.init(queue_sizes=[self.q.size])
        assert not drv.needs_reset
        assert drv.request(0, [b"ok"], [2]).data == b"ok"
        drv.ram.check_guards()


def _buf(drv: VirtioTestDriver, n: int = 16) -> int:
    return drv.ram.alloc(n, 8)


def test_descriptor_loop(echo):
    drv = echo()
    h = Hostile(drv)
    b = _buf(drv)
    drv.write_desc(0, 0, b, 8, rings.NEXT, 1)
    drv.write_desc(0, 1, b + 8, 8, rings.NEXT | rings.WRITE, 0)
    drv.publish(0, 0)
    h.kick_and_check()


def test_chain_longer_than_the_queue(echo):
    """All 16 descriptors chained, the last pointing back into the middle (a rho-shaped chain)."""
    drv = echo()
    h = Hostile(drv)
    b = _buf(drv)
    for i in range(16):
        drv.write_desc(0, i, b, 1, rings.NEXT, i + 1 if i < 15 else 7)
    drv.publish(0, 0)
    h.kick_and_check()


def test_indirect_table_that_loops(echo):
    drv = echo()
    h = Hostile(drv)
    b, table = _buf(drv), drv.ram.alloc(64, 16)
    rings.write_table(drv, table, [(b, 4, rings.NEXT, 1), (b, 4, rings.NEXT, 2), (b, 4, rings.NEXT, 3),
                                   (b, 4, rings.NEXT, 1)])
    drv.write_desc(0, 0, table, 64, rings.INDIRECT, 0)
    drv.publish(0, 0)
    h.kick_and_check()


@pytest.mark.parametrize(
    "where",
    ["straddles_end", "at_end", "below_base", "far_above", "wraps_64bit"],
)
def test_buffer_outside_guest_ram(echo, where):
    drv = echo()
    h = Hostile(drv)
    ram = drv.ram
    addr, length = {
        "straddles_end": (ram.end - 8, 16),
        "at_end": (ram.end, 1),
        "below_base": (ram.base - 16, 16),
        "far_above": (ram.end + (1 << 40), 16),
        "wraps_64bit": ((1 << 64) - 0x1000, 0x2000),
    }[where]
    b = _buf(drv)
    drv.write_desc(0, 0, b, 4, rings.NEXT, 1)
    drv.write_desc(0, 1, addr, length, rings.WRITE, 0)
    drv.publish(0, 0)
    h.kick_and_check()


def test_indirect_table_outside_guest_ram(echo):
    drv = echo()
    h = Hostile(drv)
    drv.write_desc(0, 0, drv.ram.end - 16, 32, rings.INDIRECT, 0)
    drv.publish(0, 0)
    h.kick_and_check()


def test_indirect_inside_indirect(echo):
    drv = echo()
    h = Hostile(drv)
    b = _buf(drv)
    inner, outer = drv.ram.alloc(16, 16), drv.ram.alloc(32, 16)
    rings.write_table(drv, inner, [(b, 4, 0, 0)])
    rings.write_table(drv, outer, [(b, 4, rings.NEXT, 1), (inner, 16, rings.INDIRECT, 0)])
    drv.write_desc(0, 0, outer, 32, rings.INDIRECT, 0)
    drv.publish(0, 0)
    h.kick_and_check()


def test_indirect_not_negotiated(echo):
    drv = echo(exclude=1 << F_INDIRECT_DESC)
    assert not drv.features >> F_INDIRECT_DESC & 1
    h = Hostile(drv)
    b, table = _buf(drv), drv.ram.alloc(16, 16)
    rings.write_table(drv, table, [(b, 4, 0, 0)])
    drv.write_desc(0, 0, table, 16, rings.INDIRECT, 0)
    drv.publish(0, 0)
    h.kick_and_check()


@pytest.mark.parametrize("length", [0, 24, 17], ids=["empty", "not_multiple_of_16", "odd"])
def test_indirect_table_bad_length(echo, length):
    drv = echo()
    h = Hostile(drv)
    b, table = _buf(drv), drv.ram.alloc(32, 16)
    rings.write_table(drv, table, [(b, 4, 0, 0), (b, 4, 0, 0)])
    drv.write_desc(0, 0, table, length, rings.INDIRECT, 0)
    drv.publish(0, 0)
    h.kick_and_check()


def test_indirect_with_next_flag(echo):
    drv = echo()
    h = Hostile(drv)
    b, table = _buf(drv), drv.ram.alloc(16, 16)
    rings.write_table(drv, table, [(b, 4, 0, 0)])
    drv.write_desc(0, 0, table, 16, rings.INDIRECT | rings.NEXT, 1)
    drv.write_desc(0, 1, b, 4, 0, 0)
    drv.publish(0, 0)
    h.kick_and_check()


def test_indirect_next_past_the_table(echo):
    drv = echo()
    h = Hostile(drv)
    b, table = _buf(drv), drv.ram.alloc(32, 16)
    rings.write_table(drv, table, [(b, 4, rings.NEXT, 2), (b, 4, 0, 0)])
    drv.write_desc(0, 0, table, 32, rings.INDIRECT, 0)
    drv.publish(0, 0)
    h.kick_and_check()


def test_chain_describing_more_than_4_gib(echo):
    """300 x 16 MiB: every buffer is in RAM, but the lengths add up past 2^32."""
    drv = VirtioTestDriver(EchoDevice(), ram_size=16 << 20)
    drv.init()
    h = Hostile(drv)
    table = drv.ram.alloc(16 * 300, 16)
    big = drv.ram.size
    rings.write_table(
        drv, table, [(drv.ram.base, big, rings.NEXT if i < 299 else 0, i + 1) for i in range(300)]
    )
    drv.write_desc(0, 0, table, 16 * 300, rings.INDIRECT, 0)
    drv.publish(0, 0)
    h.snapshot()
    drv.kick(0)
    assert drv.needs_reset and "4 GiB" in drv.device.broken
    assert drv.used_idx(0) == 0
    drv.ram.check_guards()
    drv.device.reset()


def test_next_index_past_the_queue(echo):
    drv = echo()
    h = Hostile(drv)
    b = _buf(drv)
    drv.write_desc(0, 0, b, 4, rings.NEXT, 16)
    drv.publish(0, 0)
    h.kick_and_check()


@pytest.mark.parametrize("bump", [17, 0x8000, 0xFFFF])
def test_avail_index_jumps_more_than_the_queue_size(echo, bump):
    drv = echo()
    h = Hostile(drv)
    b = _buf(drv)
    drv.write_desc(0, 0, b, 4, 0, 0)
    drv.publish(0, 0, bump=bump)
    h.kick_and_check()


@pytest.mark.parametrize("head", [16, 0xFFFF])
def test_head_index_out_of_range(echo, head):
    drv = echo()
    h = Hostile(drv)
    drv.publish(0, head)
    h.kick_and_check()


def test_readable_after_writable(echo):
    drv = echo()
    h = Hostile(drv)
    b = _buf(drv, 32)
    drv.write_desc(0, 0, b, 8, rings.NEXT | rings.WRITE, 1)
    drv.write_desc(0, 1, b + 16, 8, 0, 0)
    drv.publish(0, 0)
    h.kick_and_check()


def test_readable_after_writable_inside_indirect(echo):
    drv = echo()
    h = Hostile(drv)
    b, table = _buf(drv, 32), drv.ram.alloc(32, 16)
    rings.write_table(drv, table, [(b, 8, rings.WRITE | rings.NEXT, 1), (b + 16, 8, 0, 0)])
    drv.write_desc(0, 0, table, 32, rings.INDIRECT, 0)
    drv.publish(0, 0)
    h.kick_and_check()


def test_second_chain_bad_first_one_served(echo):
    """A good chain followed by a bad one: the good one is returned, then the device stops."""
    drv = echo()
    drv.post(0, [b"good"], [4])
    drv.write_desc(0, 15, drv.ram.end, 4, 0, 0)  # starts right at the end of guest RAM
    drv.publish(0, 15)
    drv.kick(0)
    assert drv.needs_reset
    assert [u.data for u in drv.collect(0)] == [b"good"]


# ---- ring setup the device must refuse ------------------------------------------------------------


@pytest.mark.parametrize("which", ["desc_misaligned", "used_misaligned", "desc_outside", "used_outside"])
def test_bad_ring_addresses_at_driver_ok(virtio_driver, which):
    drv = virtio_driver(EchoDevice(), ram_size=RAM)
    drv.reg_write(Reg.STATUS, 0)
    drv.reg_write(Reg.STATUS, Status.ACKNOWLEDGE | Status.DRIVER)
    feats = drv.device_features()
    for sel in (0, 1):
        drv.reg_write(Reg.DRIVER_FEATURES_SEL, sel)
        drv.reg_write(Reg.DRIVER_FEATURES, feats >> (32 * sel) & 0xFFFFFFFF)
    st = Status.ACKNOWLEDGE | Status.DRIVER | Status.FEATURES_OK
    drv.reg_write(Reg.STATUS, st)
    q = drv.setup_queue(0)
    drv.reg_write(Reg.QUEUE_READY, 0)
    reg, value = {
        "desc_misaligned": (Reg.QUEUE_DESC_LOW, q.desc + 8),
        "used_misaligned": (Reg.QUEUE_DEVICE_LOW, q.used + 2),
        "desc_outside": (Reg.QUEUE_DESC_LOW, drv.ram.end - 16),
        "used_outside": (Reg.QUEUE_DEVICE_LOW, drv.ram.base - 4096),
    }[which]
    drv.reg_write(reg, value & 0xFFFFFFFF)
    drv.reg_write(Reg.QUEUE_READY, 1)
    drv.reg_write(Reg.STATUS, st | Status.DRIVER_OK)
    assert drv.needs_reset
    assert drv.device.broken
    assert drv.device.activations == 0
    drv.ram.check_guards()
