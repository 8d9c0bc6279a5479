"""vdm_kvm.bus.IoBus: routing, overlaps, unclaimed accesses, broken handlers."""

from __future__ import annotations

import logging

import pytest
from vdm_kvm.bus import IoBus

from tests.kvm.realmode import Recorder


def test_routes_by_range_with_relative_offsets() -> None:
    bus = IoBus("mmio", 1 << 64)
    a, b = Recorder(lambda o, s: 0xA0 + o), Recorder(lambda o, s: 0xB0 + o)
    bus.register(0x1000, 0x10, a, "a")
    bus.register(0x1010, 0x10, b, "b")  # adjacent is fine
    assert bus.read(0x1003, 1) == 0xA3
    assert bus.read(0x1010, 1) == 0xB0
    bus.write(0x101F, 4, 0x12345678)
    assert b.log[-1] == ("w", 0xF, 4, 0x12345678)
    assert [r.owner for r in bus.ranges] == ["a", "b"]


@pytest.mark.parametrize(("base", "size"), [(0x1000, 1), (0x0FFF, 2), (0x100F, 0x10), (0x0F00, 0x1000)])
def test_overlaps_are_refused(base: int, size: int) -> None:
    bus = IoBus("pio", 0x10000)
    bus.register(0x1000, 0x10, Recorder(), "first")
    with pytest.raises(ValueError, match="overlaps first"):
        bus.register(base, size, Recorder(), "second")


@pytest.mark.parametrize(("base", "size"), [(-1, 4), (0xFFFF, 2), (0x10, 0)])
def test_out_of_space_ranges_are_refused(base: int, size: int) -> None:
    with pytest.raises(ValueError, match="bad range"):
        IoBus("pio", 0x10000).register(base, size, Recorder())


def test_unregister_and_cache_invalidation() -> None:
    bus = IoBus("pio", 0x10000)
    bus.register(0x60, 1, Recorder(lambda o, s: 0x11), "kbd")
    assert bus.read(0x60, 1) == 0x11  # now cached
    bus.unregister(0x60)
    assert bus.read(0x60, 1) == 0xFF
    bus.register(0x60, 1, Recorder(lambda o, s: 0x22), "kbd2")
    assert bus.read(0x60, 1) == 0x22
    with pytest.raises(KeyError):
        bus.unregister(0x61)


def test_unclaimed_reads_all_ones_and_logs_once(caplog: pytest.LogCaptureFixture) -> None:
    bus = IoBus("pio", 0x10000)
    with caplog.at_level(logging.DEBUG, logger="vdm_kvm.bus"):
        assert [bus.read(0x80, s) for s in (1, 2, 4)] == [0xFF, 0xFFFF, 0xFFFFFFFF]
        for _ in range(5):
            bus.write(0x80, 1, 0)
    assert (bus.unclaimed_reads, bus.unclaimed_writes) == (3, 5)
    msgs = [r.getMessage() for r in caplog.records]
    assert sum("unclaimed read 0x80" in m for m in msgs) == 1
    assert sum("unclaimed write 0x80" in m for m in msgs) == 1


def test_a_raising_handler_answers_like_an_empty_bus(caplog: pytest.LogCaptureFixture) -> None:
    class Broken:
        def read(self, offset: int, size: int) -> int:
            raise RuntimeError("bug in a device")

        def write(self, offset: int, size: int, value: int) -> None:
            raise RuntimeError("bug in a device")

    bus = IoBus("mmio", 1 << 64)
    bus.register(0xD0000000, 0x200, Broken(), "broken")
    with caplog.at_level(logging.ERROR):
        assert bus.read(0xD0000004, 4) == 0xFFFFFFFF
        bus.write(0xD0000004, 4, 1)
    assert sum("broken" in r.getMessage() for r in caplog.records) == 2


def test_read_values_are_truncated_to_the_access_size() -> None:
    bus = IoBus("pio", 0x10000)
    bus.register(0x10, 1, Recorder(lambda o, s: 0x1FF), "wide")
    assert bus.read(0x10, 1) == 0xFF
