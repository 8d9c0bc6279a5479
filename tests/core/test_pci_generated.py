"""Generated virtio-pci accesses (BAR0 and configuration space): whatever a guest does, the handler
never raises, its MSI-X table keeps its size, nothing outside guest RAM changes, and a reset brings
the device back."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from vdm.testing import VirtioPciTestDriver
from vdm.testing.devices import EchoDevice
from vdm.transport.pci import (
    BAR_SIZE,
    DEVICE_OFFSET,
    ISR_OFFSET,
    MSIX_PBA_OFFSET,
    MSIX_TABLE_OFFSET,
    NOTIFY_OFFSET,
)

RAM = 1 << 20
TABLE_LEN = 16 * 2  # EchoDevice: one queue + the config vector

bar_offsets = st.one_of(
    st.integers(0, 0x40),
    st.sampled_from([ISR_OFFSET, DEVICE_OFFSET, DEVICE_OFFSET + 6, NOTIFY_OFFSET, NOTIFY_OFFSET + 4]),
    st.integers(MSIX_TABLE_OFFSET - 8, MSIX_TABLE_OFFSET + TABLE_LEN + 8),
    st.integers(MSIX_PBA_OFFSET - 4, MSIX_PBA_OFFSET + 12),
    st.integers(0, BAR_SIZE + 0x100),
)
cfg_offsets = st.one_of(st.integers(0, 0x40), st.integers(0x40, 0xC0), st.integers(0xF0, 0x110))
values = st.one_of(
    st.sampled_from([0, 1, 0xFF, 0xFFFF, 0x8000, 0xC000, 0xFFFFFFFF]), st.integers(0, (1 << 64) - 1)
)


@st.composite
def access(draw: st.DrawFn) -> tuple[str, bool, int, int, int]:
    where = draw(st.sampled_from(["bar", "bar", "cfg"]))
    offset = draw(bar_offsets if where == "bar" else cfg_offsets)
    size = draw(st.sampled_from([1, 2, 4, 4, 8, 3]))
    return where, draw(st.booleans()), offset, size, draw(values) & ((1 << (8 * size)) - 1)


@settings(max_examples=150, deadline=None)
@given(st.lists(access(), max_size=60), st.booleans())
def test_any_pci_access_sequence_is_harmless(ops, start_up):
    dev = EchoDevice()
    drv = VirtioPciTestDriver(dev, ram_size=RAM)
    t = drv.transport
    if start_up:
        drv.init()
        drv.post(0, [b"x"], [1])
    for where, write, offset, size, value in ops:
        if where == "bar":
            if write:
                t.write(offset, size, value)
            else:
                assert 0 <= t.read(offset, size) < 1 << (8 * size)
        elif write:
            t.config_write(offset, size, value)
        else:
            assert 0 <= t.config_read(offset, size) < 1 << (8 * size)
        assert len(t.msix_table) == TABLE_LEN, "the guest changed the size of the MSI-X table"
    drv.ram.check_guards()
    drv.queues.clear()
    drv.init()
    assert drv.request(0, [b"alive"], [5]).data == b"alive"
    assert not drv.needs_reset
    dev.reset()


def test_msix_table_writes_past_its_end_or_unaligned_are_ignored():
    t = VirtioPciTestDriver(EchoDevice(), ram_size=RAM).transport
    before = bytes(t.msix_table)
    t.write(MSIX_TABLE_OFFSET + TABLE_LEN - 4, 8, (1 << 64) - 1)  # last dword + 4 bytes beyond
    t.write(MSIX_TABLE_OFFSET + TABLE_LEN - 3, 4, 0xFFFFFFFF)
    t.write(MSIX_TABLE_OFFSET + 2, 4, 0xFFFFFFFF)  # not dword aligned
    assert bytes(t.msix_table) == before
    t.write(MSIX_TABLE_OFFSET + TABLE_LEN - 4, 4, 0)  # the last dword itself: unmask vector 1
    assert len(t.msix_table) == TABLE_LEN and t.msix_table[-4:] == bytes(4)


def test_partial_writes_to_bar0_do_not_move_it():
    t = VirtioPciTestDriver(EchoDevice(), ram_size=RAM).transport
    bar = t.config_read(0x10, 4)
    for offset, size in ((0x11, 1), (0x12, 2), (0x13, 1), (0x10, 1)):
        t.config_write(offset, size, 0xFF if size == 1 else 0xFFFF)
        assert t.config_read(0x10, 4) == bar, f"a {size}-byte write at 0x{offset:x} moved BAR0"
    t.config_write(0x10, 4, 0xFFFFFFFF)  # sizing still works
    assert t.config_read(0x10, 4) == 0xFFFF8000
