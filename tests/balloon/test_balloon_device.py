"""vdm-balloon through vdm.testing's driver: inflate/deflate, the target, stats, free page reporting.

Guest RAM is an mmap here (page-aligned, as a VMM's), so a page the host released reads as zeros.
"""

from __future__ import annotations

import logging
import mmap
import struct

import pytest
from vdm.memory import FlatGuestMemory, MemoryRegion
from vdm.testing import GuestRam
from vdm.testing.memory import GUARD
from vdm.transport.mmio import Reg
from vdm_balloon.config import BalloonConfig
from vdm_balloon.device import F_DEFLATE_ON_OOM, F_REPORTING, F_STATS_VQ, BalloonDevice

PAGE = 4096


class MmapGuestRam(GuestRam):
    """GuestRam whose host buffer is an anonymous mmap (page-aligned), canaries kept."""

    def __init__(self, size: int = 16 << 20, base: int = 0x4000_0000) -> None:
        super().__init__(size, base)
        host = mmap.mmap(-1, size + 2 * GUARD)
        host[:] = bytes(self._host)
        self._host = host  # type: ignore[assignment]
        self.region = MemoryRegion(base, memoryview(host)[GUARD : GUARD + size])
        self.memory = FlatGuestMemory([self.region])


@pytest.fixture
def balloon(virtio_driver):
    def make(**kw):
        dev = BalloonDevice(BalloonConfig(**kw))
        drv = virtio_driver(dev, ram=MmapGuestRam())
        drv.init()
        return dev, drv

    return make


def page_in_ram(drv, fill: int) -> int:
    """A guest page (its PFN) full of ``fill``."""
    addr = drv.ram.alloc(2 * PAGE, align=PAGE)
    drv.ram.write(addr, bytes([fill]) * PAGE)
    return addr // PAGE


def pfns(*numbers: int) -> bytes:
    return struct.pack(f"<{len(numbers)}I", *numbers)


def test_identity_features_and_config(balloon, virtio_driver):
    _, drv = balloon()
    assert drv.reg_read(Reg.DEVICE_ID) == 5
    offered = drv.device_features()
    assert offered & (1 << F_STATS_VQ) and offered & (1 << F_DEFLATE_ON_OOM) and offered & (1 << F_REPORTING)
    assert drv.config_read(0, 4) == 0 and drv.config_read(4, 4) == 0
    plain = virtio_driver(BalloonDevice(BalloonConfig(stats=False, deflate_on_oom=False, reporting=False)))
    assert plain.device_features() & 0xFFFFFF == 0


def test_target_is_the_config_and_interrupts_the_driver(balloon):
    dev, drv = balloon()
    drv.ack_interrupts()
    dev.set_target_bytes(10 * PAGE + 1)  # whole pages, rounded up
    assert drv.config_read(0, 4) == 11 == dev.target_pages
    assert drv.ack_interrupts() & 2  # the configuration-change interrupt
    drv.config_write(4, 11, 4)  # the driver says what it gave
    assert dev.actual == 11
    with pytest.raises(ValueError):
        dev.set_target_pages(1 << 32)


def test_inflate_releases_pages_and_deflate_takes_them_back(balloon):
    dev, drv = balloon()
    a, b = page_in_ram(drv, 0x5A), page_in_ram(drv, 0x6B)
    drv.request(0, [pfns(a, b)], [])
    assert dev.inflated == {a, b} and dev.released_pages == 2
    assert drv.ram.read(a * PAGE, PAGE) == bytes(PAGE)  # the host dropped it: a fresh zero page
    assert drv.ram.read(b * PAGE, PAGE) == bytes(PAGE)
    drv.request(1, [pfns(a)], [])
    assert dev.inflated == {b}
    drv.ram.check_guards()


def test_hostile_page_numbers_are_skipped_with_one_line(balloon, caplog):
    dev, drv = balloon()
    keep = page_in_ram(drv, 0x77)
    outside = [0, drv.ram.end // PAGE, 0xFFFFFFFF, drv.ram.base // PAGE - 1]
    with caplog.at_level(logging.WARNING):
        drv.request(0, [pfns(*outside) + b"\x01\x02"], [])  # and a trailing partial number
    assert [r.getMessage() for r in caplog.records] == ["balloon: 4 page numbers outside guest RAM ignored"]
    assert dev.inflated == set() and not drv.needs_reset
    assert drv.ram.read(keep * PAGE, PAGE) == b"\x77" * PAGE
    drv.ram.check_guards()


def test_stats_are_read_and_asked_for_again(balloon):
    dev, drv = balloon()
    stats = struct.pack("<HQHQHQ", 4, 1000 * PAGE, 5, 4000 * PAGE, 99, 7)
    drv.submit(2, [stats], [])
    assert drv.collect(2) == []  # the device keeps the buffer until it wants new numbers
    assert dev.stats == {"free_memory": 1000 * PAGE, "total_memory": 4000 * PAGE, "tag_99": 7}
    assert dev.request_stats()
    assert [u.written for u in drv.collect(2)] == [0]
    assert not dev.request_stats()  # nothing held until the driver sends the next
    drv.submit(2, [struct.pack("<HQ", 4, 5)], [])
    assert dev.stats == {"free_memory": 5} and dev.stats_updates == 2


def test_free_page_reporting_releases_the_reported_pages(balloon):
    dev, drv = balloon()
    # Linux reports free pages as device-writable buffers; the device returns them unwritten. The
    # driver's buffer starts as 0xee poison: the host pages wholly inside it come back as zeros.
    used = drv.request(3, [], [3 * PAGE])
    assert used.written == 0
    assert bytes(2 * PAGE) in used.data and dev.released_pages >= 2
    assert dev.released_pages + dev.unreleased_pages == 3 and not drv.needs_reset
    drv.ram.check_guards()


def test_reporting_queue_number_follows_the_features(balloon):
    dev, drv = balloon()
    assert dev._queue_role(3) == "reporting" and dev._queue_role(2) == "stats"
    drv.init(exclude=1 << F_STATS_VQ)  # without the stats queue, reporting is queue 2
    assert dev._queue_role(2) == "reporting" and dev._queue_role(3) == "none"


def test_reset_gives_every_page_back(balloon):
    dev, drv = balloon()
    a = page_in_ram(drv, 1)
    drv.request(0, [pfns(a)], [])
    drv.submit(2, [struct.pack("<HQ", 4, 1)], [])
    drv.init()
    assert dev.inflated == set() and dev.actual == 0 and not dev.request_stats()


def test_a_target_from_the_options():
    assert BalloonDevice(BalloonConfig(target_mib=64)).target_pages == 64 * 256
