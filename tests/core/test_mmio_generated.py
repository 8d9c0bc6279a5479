"""Generated virtio-mmio access sequences: whatever a guest does to the registers, the handler never
raises, the IRQ line follows InterruptStatus, nothing outside guest RAM changes, and a reset brings
the device back to a working state."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from vdm.testing import VirtioTestDriver
from vdm.testing.devices import EchoDevice
from vdm.transport.mmio import Reg

REGS = [v for k, v in vars(Reg).items() if k.isupper()]
RAM = 1 << 20
BASE = 0x4000_0000


def values() -> st.SearchStrategy[int]:
    return st.one_of(
        st.sampled_from([0, 1, 2, 3, 4, 7, 8, 0xB, 0xF, 0x40, 0x80, 0xFF, 16, 0xFFFF, 0xFFFFFFFF]),
        st.integers(BASE, BASE + RAM + 0x100),  # plausible and edge ring addresses
        st.integers(0, 0xFFFFFFFF),
    )


accesses = st.tuples(
    st.booleans(),  # write?
    st.one_of(st.sampled_from(REGS), st.integers(0, 0x1FF)),
    st.sampled_from([4, 4, 4, 1, 2, 8, 3]),
    values(),
)


@settings(max_examples=150, deadline=None)
@given(st.lists(accesses, max_size=60), st.booleans())
def test_any_register_sequence_is_harmless(ops, start_up):
    dev = EchoDevice()
    drv = VirtioTestDriver(dev, ram_size=RAM)
    if start_up:  # sometimes start from a working device, so queue and notify paths are live
        drv.init()
        drv.post(0, [b"x"], [1])
    for write, offset, size, value in ops:
        if write:
            drv.transport.write(offset, size, value & ((1 << (8 * size)) - 1))
        else:
            got = drv.transport.read(offset, size)
            assert 0 <= got < 1 << (8 * max(size, 1))
        assert drv.irq.level == bool(drv.transport.interrupt_status)
        assert 0 <= dev.status <= 0xFF
    drv.ram.check_guards()
    # whatever happened, a driver that resets and starts over gets a working device
    drv.queues.clear()
    drv.init()
    assert drv.request(0, [b"alive"], [5]).data == b"alive"
    assert not drv.needs_reset
    drv.ram.check_guards()
    dev.reset()
