"""Guest memory through foreign and grant mappings, and interrupt lines, against the simulator."""

from __future__ import annotations

import logging

import pytest
from vdm.memory import GuestMemoryError
from vdm_xen.irq import XenIrqLine
from vdm_xen.memory import MAX_MAP_PAGES
from vdm_xen.sim import SimXen

from .conftest import Served

RAM = 0x4000_0000


def test_foreign_mappings_read_and_write_guest_ram(served: Served) -> None:
    sim, mem = served.sim, served.backend.memory
    assert mem is not None
    sim.ram.write(RAM + 0x1FFE, b"\x01\x02\x03\x04")  # straddles a page boundary
    assert mem.read(RAM + 0x1FFE, 4) == b"\x01\x02\x03\x04"
    mem.write(RAM + 0xFFFF0, b"written by the device")
    assert sim.ram.read(RAM + 0xFFFF0, 21) == b"written by the device"
    ro = mem.map(RAM, 16)
    assert ro.readonly
    mem.unmap(ro)
    # the last page of RAM, where the 256-page bucket would reach past the end
    last = RAM + sim.ram.size - 8
    mem.write_u64(last, 0x0123_4567_89AB_CDEF)
    assert sim.ram.read(last, 8) == (0x0123_4567_89AB_CDEF).to_bytes(8, "little")
    sim.ram.check_guards()


@pytest.mark.parametrize(
    ("addr", "length"),
    [
        (RAM - 4096, 16),  # below RAM
        (RAM + (16 << 20) - 4, 8),  # runs off the end
        (0x1000, 4),  # far below
        (RAM, (MAX_MAP_PAGES + 1) * 4096),  # too large to map at once
        ((1 << 63) - 8, 16),  # runs into the grant-address bit
        (-1, 4),
    ],
)
def test_addresses_outside_guest_ram_are_guest_errors(served: Served, addr: int, length: int) -> None:
    mem = served.backend.memory
    assert mem is not None
    with pytest.raises(GuestMemoryError):
        mem.map(addr, length)
    assert served.sim.foreign_maps == {}  # a failed mapping left nothing behind


def test_grant_addresses_are_mapped_exactly_and_released_at_once(served: Served) -> None:
    sim, mem = served.sim, served.backend.memory
    assert mem is not None
    sim.ram.write(RAM + 0x3FF0, b"granted buffer crossing a page")
    dma = sim.grant_range(RAM + 0x3FF0, 30)
    assert dma >> 63 == 1
    view = mem.map(dma, 30, writable=True)
    assert bytes(view) == b"granted buffer crossing a page"
    assert not sim.revoke_grants(dma, 30)  # mapped: the guest cannot take it back yet
    view[:7] = b"GRANTED"
    mem.unmap(view)
    assert sim.grant_maps_live == {}
    assert sim.ram.read(RAM + 0x3FF0, 7) == b"GRANTED"
    assert sim.revoke_grants(dma, 30)
    with pytest.raises(GuestMemoryError):  # revoked
        mem.map(dma, 30)


def test_read_only_grants_cannot_be_mapped_writable(served: Served) -> None:
    sim, mem = served.sim, served.backend.memory
    assert mem is not None
    dma = sim.grant_range(RAM + 0x8000, 100, readonly=True)
    assert mem.read(dma, 4) == bytes(4)
    with pytest.raises(GuestMemoryError):
        mem.map(dma, 100, writable=True)
    with pytest.raises(GuestMemoryError):  # a reference the guest never granted
        mem.map((1 << 63) | (999_999 << 12), 4)


def test_no_gntdev_means_grant_addresses_are_guest_errors() -> None:
    sim = SimXen(gntdev=False)
    try:
        s = Served(sim)
        assert s.backend.memory is not None
        with pytest.raises(GuestMemoryError):
            s.backend.memory.map(sim.grant_range(RAM, 8), 8)
        assert s.backend.memory.read(RAM, 4) == bytes(4)  # foreign mappings still work
        s.stop()
        assert sim.leaks() == []
    finally:
        sim.close()


def test_close_releases_busy_mappings(served: Served) -> None:
    mem = served.backend.memory
    assert mem is not None
    mem.map(RAM, 64)  # never unmapped by a (buggy) device
    mem.map(served.sim.grant_range(RAM + 0x10000, 64), 64)
    assert served.sim.foreign_maps and served.sim.grant_maps_live
    # the fixture's teardown checks that closing released both


def test_spi_lines_use_set_irq_level(served: Served) -> None:
    sim = served.sim
    line = served.backend.vmm_irq_line(33)
    line.set_level(True)
    line.set_level(False)
    line.trigger()
    assert sim.irq_log == [("spi", 33, 1), ("spi", 33, 0), ("spi", 33, 1), ("spi", 33, 0)]
    assert served.backend.vmm_set_irq_level(34, True)
    assert sim.irq_log[-1] == ("spi", 34, 1)


def test_failing_interrupt_calls_are_logged_once_not_raised(
    sim: SimXen, caplog: pytest.LogCaptureFixture
) -> None:
    s = Served(sim, irq_kind="isa")  # the simulated Xen is Arm: ISA IRQs answer EOPNOTSUPP
    try:
        line = s.backend.vmm_irq_line(5)
        with caplog.at_level(logging.WARNING):
            for _ in range(3):
                line.set_level(True)
        assert sum("cannot set isa 5" in r.message for r in caplog.records) == 1
        assert sim.irq_log == []
    finally:
        s.stop()


def test_interrupt_numbers_are_checked() -> None:
    with pytest.raises(ValueError):
        XenIrqLine(None, None, 1, 16, "isa")
    with pytest.raises(ValueError):
        XenIrqLine(None, None, 1, 31, "spi")
    with pytest.raises(ValueError):
        XenIrqLine(None, None, 1, 40, "msi")
