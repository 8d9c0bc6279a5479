"""virtio-mmio (version 2) register interface, access by access, against virtio 1.2 section 4.2.2."""

from __future__ import annotations

import pytest
from vdm.device import F_EVENT_IDX, F_INDIRECT_DESC, F_VERSION_1, Status
from vdm.interrupts import RecordingIrqLine
from vdm.testing import FeaturesRefused, GuestRam, VirtioTestDriver
from vdm.testing.devices import EchoDevice
from vdm.transport.mmio import MmioTransport, Reg

ACK, DRV, FEAT_OK, DRV_OK = Status.ACKNOWLEDGE, Status.DRIVER, Status.FEATURES_OK, Status.DRIVER_OK
INT_VRING, INT_CONFIG = 1, 2


class ConfigDevice(EchoDevice):
    """Echo with a writable 8-byte config field and a feature bit of its own (bit 3)."""

    def __init__(self) -> None:
        super().__init__()
        self.cfg = bytearray(b"ECHO\x01\x02\x03\x04")
        self.writes: list[tuple[int, bytes]] = []
        self.refuse: str | None = None

    def device_features(self) -> int:
        return 1 << 3

    def validate_features(self, features: int) -> str | None:
        return self.refuse

    def config_space(self) -> bytes:
        return bytes(self.cfg)

    def write_config(self, offset: int, data: bytes) -> None:
        self.writes.append((offset, data))


@pytest.fixture
def drv(virtio_driver) -> VirtioTestDriver:
    return virtio_driver(ConfigDevice(), ram_size=1 << 20)


def negotiate(drv: VirtioTestDriver, features: int) -> int:
    drv.reg_write(Reg.STATUS, 0)
    drv.reg_write(Reg.STATUS, ACK)
    drv.reg_write(Reg.STATUS, ACK | DRV)
    for sel in (0, 1):
        drv.reg_write(Reg.DRIVER_FEATURES_SEL, sel)
        drv.reg_write(Reg.DRIVER_FEATURES, features >> (32 * sel) & 0xFFFFFFFF)
    drv.reg_write(Reg.STATUS, ACK | DRV | FEAT_OK)
    return drv.status


# ---- identification and features --------------------------------------------------------------


def test_identification_registers(drv):
    assert drv.reg_read(Reg.MAGIC) == 0x74726976  # "virt"
    assert drv.reg_read(Reg.VERSION) == 2
    assert drv.reg_read(Reg.DEVICE_ID) == 0x7F
    assert drv.reg_read(Reg.VENDOR_ID) == 0x1AF4


def test_device_feature_windows(drv):
    offered = drv.device.features()
    assert offered == (1 << 3) | (1 << F_VERSION_1) | (1 << F_EVENT_IDX) | (1 << F_INDIRECT_DESC)
    drv.reg_write(Reg.DEVICE_FEATURES_SEL, 0)
    assert drv.reg_read(Reg.DEVICE_FEATURES) == (1 << 3) | (1 << F_EVENT_IDX) | (1 << F_INDIRECT_DESC)
    drv.reg_write(Reg.DEVICE_FEATURES_SEL, 1)
    assert drv.reg_read(Reg.DEVICE_FEATURES) == 1  # VERSION_1 is bit 32
    for sel in (2, 0xFFFFFFFF):
        drv.reg_write(Reg.DEVICE_FEATURES_SEL, sel)
        assert drv.reg_read(Reg.DEVICE_FEATURES) == 0


def test_driver_feature_windows_assemble_64_bits(drv):
    drv.reg_write(Reg.STATUS, ACK | DRV)
    drv.reg_write(Reg.DRIVER_FEATURES_SEL, 1)
    drv.reg_write(Reg.DRIVER_FEATURES, 1)
    drv.reg_write(Reg.DRIVER_FEATURES_SEL, 0)
    drv.reg_write(Reg.DRIVER_FEATURES, 1 << 3)
    drv.reg_write(Reg.DRIVER_FEATURES_SEL, 2)
    drv.reg_write(Reg.DRIVER_FEATURES, 0xFFFFFFFF)  # no such window: ignored
    assert drv.device.driver_features == (1 << 32) | (1 << 3)
    drv.reg_write(Reg.STATUS, ACK | DRV | FEAT_OK)
    assert drv.status & FEAT_OK
    assert drv.device.has_feature(3) and drv.device.has_feature(F_VERSION_1)
    # once FEATURES_OK is set the driver cannot change its mind
    drv.reg_write(Reg.DRIVER_FEATURES_SEL, 0)
    drv.reg_write(Reg.DRIVER_FEATURES, 0)
    assert drv.device.driver_features == (1 << 32) | (1 << 3)


@pytest.mark.parametrize(
    "features, why",
    [
        (1 << 3, "no VERSION_1"),
        ((1 << F_VERSION_1) | (1 << 5), "a bit the device did not offer"),
        ((1 << F_VERSION_1) | (1 << 40), "a high bit the device did not offer"),
    ],
)
def test_features_ok_refused(drv, features, why):
    status = negotiate(drv, features)
    assert status == ACK | DRV, why  # FEATURES_OK did not stick
    # a driver that goes on to DRIVER_OK anyway breaks the device
    drv.reg_write(Reg.STATUS, ACK | DRV | DRV_OK)
    assert drv.needs_reset
    assert drv.device.activations == 0


def test_features_ok_refused_by_the_device(drv):
    drv.device.refuse = "feature 3 needs feature 4"
    assert negotiate(drv, (1 << F_VERSION_1) | (1 << 3)) == ACK | DRV
    with pytest.raises(FeaturesRefused):
        drv.init()
    drv.device.refuse = None
    assert drv.init() == drv.device.features()


# ---- status state machine ----------------------------------------------------------------------


def test_status_reads_back_and_driver_ok_activates(drv):
    assert drv.status == 0
    drv.init()
    assert drv.status == ACK | DRV | FEAT_OK | DRV_OK
    assert drv.device.activations == 1
    assert drv.request(0, [b"hi"], [2]).data == b"hi"


def test_clearing_status_bits_breaks_the_device(drv):
    drv.init()
    drv.reg_write(Reg.STATUS, ACK | DRV | FEAT_OK)  # DRIVER_OK dropped without a reset
    assert drv.needs_reset
    assert drv.status & Status.DEVICE_NEEDS_RESET
    assert drv.ack_interrupts() & INT_CONFIG  # the driver was told


def test_driver_ok_without_features_ok(drv):
    drv.reg_write(Reg.STATUS, ACK)
    drv.reg_write(Reg.STATUS, ACK | DRV)
    drv.reg_write(Reg.STATUS, ACK | DRV | DRV_OK)
    assert drv.needs_reset and drv.device.activations == 0


def test_failed_status_stops_the_device(drv):
    drv.init()
    drv.reg_write(Reg.STATUS, ACK | DRV | FEAT_OK | DRV_OK | Status.FAILED)
    assert drv.status & Status.FAILED
    drv.post(0, [b"x"], [1])
    drv.kick(0)
    assert drv.used_idx(0) == 0  # a device the driver gave up on serves nothing


def test_reset_by_writing_zero(drv):
    drv.init()
    drv.request(0, [b"a"], [1])
    drv.device.signal_config()
    assert drv.reg_read(Reg.INTERRUPT_STATUS) == INT_VRING | INT_CONFIG and drv.irq.level
    drv.reg_write(Reg.STATUS, 0)
    assert drv.status == 0
    assert drv.reg_read(Reg.INTERRUPT_STATUS) == 0 and not drv.irq.level
    assert drv.device.driver_features == 0
    drv.reg_write(Reg.QUEUE_SEL, 0)
    assert drv.reg_read(Reg.QUEUE_READY) == 0
    for reg in (Reg.QUEUE_DESC_LOW, Reg.QUEUE_DRIVER_LOW, Reg.QUEUE_DEVICE_LOW):
        assert drv.reg_read(reg) == 0
    # and the device comes back with fresh rings
    drv.queues.clear()
    drv.init()
    assert drv.request(0, [b"again"], [5]).data == b"again"


def test_reset_clears_needs_reset(drv):
    drv.init()
    drv.publish(0, 99)  # head out of range
    drv.kick(0)
    assert drv.needs_reset
    drv.reg_write(Reg.STATUS, 0)
    assert drv.status == 0 and drv.device.broken is None


# ---- queue setup ---------------------------------------------------------------------------------


def test_queue_registers(drv):
    drv.reg_write(Reg.STATUS, ACK | DRV)
    drv.reg_write(Reg.QUEUE_SEL, 0)
    assert drv.reg_read(Reg.QUEUE_NUM_MAX) == 16
    assert drv.reg_read(Reg.QUEUE_READY) == 0
    drv.reg_write(Reg.QUEUE_NUM, 8)
    assert drv.device.queues[0].size == 8
    for low, attr in (
        (Reg.QUEUE_DESC_LOW, "desc_addr"),
        (Reg.QUEUE_DRIVER_LOW, "avail_addr"),
        (Reg.QUEUE_DEVICE_LOW, "used_addr"),
    ):
        drv.reg_write(low, 0x89ABC000)
        drv.reg_write(low + 4, 0x01234567)
        assert getattr(drv.device.queues[0], attr) == 0x01234567_89ABC000
        assert drv.reg_read(low) == 0x89ABC000 and drv.reg_read(low + 4) == 0x01234567
        drv.reg_write(low + 4, 0)  # the halves are independent
        assert getattr(drv.device.queues[0], attr) == 0x89ABC000
    # a queue that does not exist: QueueNumMax 0, writes ignored
    drv.reg_write(Reg.QUEUE_SEL, 1)
    assert drv.reg_read(Reg.QUEUE_NUM_MAX) == 0
    drv.reg_write(Reg.QUEUE_READY, 1)
    assert drv.reg_read(Reg.QUEUE_READY) == 0


def test_queue_registers_frozen_while_ready(drv):
    drv.init()
    q = drv.device.queues[0]
    desc, size = q.desc_addr, q.size
    drv.reg_write(Reg.QUEUE_SEL, 0)
    drv.reg_write(Reg.QUEUE_DESC_LOW, 0x1000)
    drv.reg_write(Reg.QUEUE_NUM, 4)
    assert (q.desc_addr, q.size) == (desc, size)
    assert drv.request(0, [b"still"], [5]).data == b"still"


def test_rings_above_4_gib(virtio_driver):
    """Rings and buffers at guest addresses that need the high halves of the address registers."""
    ram = GuestRam(1 << 20, base=0x3_0000_0000)
    drv = virtio_driver(EchoDevice(), ram=ram)
    drv.init()
    q = drv.device.queues[0]
    assert q.desc_addr >> 32 == 3 and q.used_addr >> 32 == 3
    assert drv.request(0, [b"high"], [4]).data == b"high"


@pytest.mark.parametrize("size", [0, 3, 12, 32, 1 << 16])
def test_bad_queue_size(drv, size):
    """QueueNum must be a power of two no larger than QueueNumMax (16 here)."""
    negotiate(drv, drv.device.features())
    drv.setup_queue(0)
    drv.reg_write(Reg.QUEUE_READY, 0)
    drv.reg_write(Reg.QUEUE_NUM, size)
    drv.reg_write(Reg.QUEUE_READY, 1)
    drv.reg_write(Reg.STATUS, ACK | DRV | FEAT_OK | DRV_OK)
    assert drv.needs_reset


def test_smaller_queue_size_is_used(drv):
    drv.init(queue_sizes=[2])
    assert drv.device.queues[0].size == 2
    for i in range(5):  # the ring wraps every two entries
        assert drv.request(0, [bytes([i])], [1]).data == bytes([i])


def test_queue_reset_and_reenable_after_driver_ok(drv):
    drv.init()
    assert drv.request(0, [b"one"], [3]).data == b"one"
    drv.reg_write(Reg.QUEUE_SEL, 0)
    drv.reg_write(Reg.QUEUE_RESET, 1)
    q = drv.device.queues[0]
    assert drv.reg_read(Reg.QUEUE_READY) == 0 and not q.active
    assert (q.desc_addr, q.avail_addr, q.used_addr, q.size) == (0, 0, 0, 16)
    # the old ring is dead: posting to it does nothing
    drv.post(0, [b"lost"], [4])
    drv.kick(0)
    assert drv.used_idx(0) == 1
    # set the queue up again while the device runs: it serves the new ring from index 0
    drv.queues.pop(0)
    drv.setup_queue(0, 8)
    assert q.active and q.size == 8
    assert drv.request(0, [b"two"], [3]).data == b"two"
    assert not drv.needs_reset


def test_queue_ready_zero_stops_the_queue(drv):
    drv.init()
    drv.reg_write(Reg.QUEUE_SEL, 0)
    drv.reg_write(Reg.QUEUE_READY, 0)
    assert drv.reg_read(Reg.QUEUE_READY) == 0
    drv.post(0, [b"x"], [1])
    drv.kick(0)
    assert drv.used_idx(0) == 0


def test_notify_before_driver_ok_and_for_bad_queues(drv):
    negotiate(drv, drv.device.features())
    drv.setup_queue(0)
    drv.post(0, [b"early"], [5])
    drv.kick(0)
    assert drv.used_idx(0) == 0  # not live yet
    for index in (1, 0xFFFF, 0xFFFFFFFF):
        drv.reg_write(Reg.QUEUE_NOTIFY, index)
    drv.reg_write(Reg.STATUS, ACK | DRV | FEAT_OK | DRV_OK)
    # DRIVER_OK looks at the rings: the early request is served
    assert [u.data for u in drv.collect(0)] == [b"early"]
    assert not drv.needs_reset


# ---- interrupts -----------------------------------------------------------------------------------


def test_interrupt_status_ack_and_line_level():
    ram = GuestRam(1 << 20)
    dev = EchoDevice()
    drv = VirtioTestDriver(dev, ram=ram)
    drv.init()
    assert not drv.irq.level and drv.reg_read(Reg.INTERRUPT_STATUS) == 0
    drv.request(0, [b"x"], [1])
    assert drv.reg_read(Reg.INTERRUPT_STATUS) == INT_VRING and drv.irq.level
    dev.signal_config()
    assert drv.reg_read(Reg.INTERRUPT_STATUS) == INT_VRING | INT_CONFIG
    edges = drv.irq.edges
    drv.reg_write(Reg.INTERRUPT_ACK, INT_VRING)
    assert drv.reg_read(Reg.INTERRUPT_STATUS) == INT_CONFIG and drv.irq.level  # still pending
    drv.reg_write(Reg.INTERRUPT_ACK, INT_CONFIG)
    assert drv.reg_read(Reg.INTERRUPT_STATUS) == 0 and not drv.irq.level
    drv.request(0, [b"y"], [1])
    assert drv.irq.level and drv.irq.edges == edges + 1  # a new rising edge
    drv.reg_write(Reg.INTERRUPT_ACK, 0)  # acking nothing changes nothing
    assert drv.irq.level
    dev.reset()
    ram.check_guards()


def test_interrupt_status_is_read_only(drv):
    drv.init()
    drv.request(0, [b"x"], [1])
    drv.reg_write(Reg.INTERRUPT_STATUS, 0)
    assert drv.reg_read(Reg.INTERRUPT_STATUS) == INT_VRING


# ---- configuration space ------------------------------------------------------------------------


def test_config_generation_bumps_on_change(drv):
    drv.init()
    gen = drv.reg_read(Reg.CONFIG_GENERATION)
    drv.ack_interrupts()
    drv.device.cfg[4:8] = b"\x10\x20\x30\x40"
    drv.device.signal_config()
    assert drv.reg_read(Reg.CONFIG_GENERATION) == gen + 1
    assert drv.reg_read(Reg.INTERRUPT_STATUS) == INT_CONFIG and drv.irq.level
    assert drv.config_read(4, 4) == 0x40302010


def test_config_change_before_driver_ok_does_not_interrupt(drv):
    gen = drv.reg_read(Reg.CONFIG_GENERATION)
    drv.device.signal_config()
    assert drv.reg_read(Reg.CONFIG_GENERATION) == gen + 1
    assert drv.reg_read(Reg.INTERRUPT_STATUS) == 0 and not drv.irq.level


@pytest.mark.parametrize(
    "offset, size, value",
    [
        (0, 1, ord("E")),
        (3, 1, ord("O")),
        (0, 2, int.from_bytes(b"EC", "little")),
        (2, 2, int.from_bytes(b"HO", "little")),
        (0, 4, int.from_bytes(b"ECHO", "little")),
        (4, 4, 0x04030201),
        (0, 8, int.from_bytes(b"ECHO\x01\x02\x03\x04", "little")),
        (6, 4, 0x0403),  # runs past the end: the missing bytes read as zero
        (8, 4, 0),
        (0xF0, 8, 0),
    ],
)
def test_config_reads(drv, offset, size, value):
    assert drv.reg_read(Reg.CONFIG + offset, size) == value


@pytest.mark.parametrize("size", [0, 3, 5, 16])
def test_config_reads_of_odd_sizes_return_zero(drv, size):
    assert drv.reg_read(Reg.CONFIG, size) == 0


def test_config_writes(drv):
    drv.reg_write(Reg.CONFIG + 4, 0x1122, 2)
    drv.reg_write(Reg.CONFIG + 0, 0xAABBCCDD_11223344, 8)
    drv.reg_write(Reg.CONFIG + 1, 0x1FF, 1)  # only the low byte goes through
    drv.reg_write(Reg.CONFIG + 0, 0xFFFFFF, 3)  # odd size: ignored
    assert drv.device.writes == [
        (4, b"\x22\x11"),
        (0, (0xAABBCCDD_11223344).to_bytes(8, "little")),
        (1, b"\xff"),
    ]


# ---- accesses a guest should not make ----------------------------------------------------------------


@pytest.mark.parametrize("offset, size", [(Reg.MAGIC, 1), (Reg.MAGIC, 2), (Reg.MAGIC + 1, 4),
                                          (Reg.DEVICE_ID, 8), (Reg.STATUS + 2, 2)])
def test_unaligned_or_odd_sized_register_reads_return_zero(drv, offset, size):
    assert drv.reg_read(offset, size) == 0


def test_unaligned_or_odd_sized_register_writes_are_ignored(drv):
    drv.reg_write(Reg.STATUS, ACK, size=1)
    drv.reg_write(Reg.STATUS + 1, ACK, size=4)
    drv.reg_write(Reg.STATUS, ACK, size=8)
    assert drv.status == 0
    drv.reg_write(Reg.QUEUE_SEL, 0)
    drv.reg_write(Reg.QUEUE_NUM, 4, size=2)
    assert drv.device.queues[0].size == 16


def test_unknown_and_read_only_registers(drv):
    for offset in (0x018, 0x0F8, 0x0C8, Reg.SHM_SEL):
        assert drv.reg_read(offset) == 0
    # no shared memory regions: their length reads as all ones (-1)
    assert drv.reg_read(Reg.SHM_LEN_LOW) == 0xFFFFFFFF
    assert drv.reg_read(Reg.SHM_LEN_HIGH) == 0xFFFFFFFF
    for offset in (Reg.MAGIC, Reg.VERSION, Reg.DEVICE_ID, Reg.QUEUE_NUM_MAX, Reg.CONFIG_GENERATION, 0x0F8):
        drv.reg_write(offset, 0x12345678)
    assert drv.reg_read(Reg.MAGIC) == 0x74726976
    assert drv.reg_read(Reg.DEVICE_ID) == 0x7F
    assert drv.init() == drv.device.features()


def test_transport_attaches_memory_and_interrupts():
    dev = EchoDevice()
    ram = GuestRam(1 << 20)
    irq = RecordingIrqLine()
    t = MmioTransport(dev, ram.memory, irq)
    assert dev.memory is ram.memory and dev.interrupts is t
