#!/usr/bin/env python3
"""Fuzz target: virtio-mmio and virtio-pci register accesses.

The input is a sequence of register reads and writes (offset, size, value) a guest could issue,
interleaved with kicks, against a device behind each transport. Invariants: no access raises,
nothing outside guest RAM changes, and a reset (status 0) always brings the device back to a state
where a well-behaved driver can use it again.
"""

from __future__ import annotations

import sys

import common


def one_input(data: bytes) -> None:
    import atheris
    from vdm.testing import VirtioPciTestDriver, VirtioTestDriver
    from vdm.testing.devices import EchoDevice

    fdp = atheris.FuzzedDataProvider(data)
    pci = fdp.ConsumeBool()
    dev = EchoDevice()
    drv = (VirtioPciTestDriver if pci else VirtioTestDriver)(dev, ram_size=64 << 10)
    if fdp.ConsumeBool():
        drv.init()  # start from a working device, then misbehave
    t = drv.transport
    window = 0x6000 if pci else 0x200
    for _ in range(fdp.ConsumeIntInRange(0, 64)):
        op = fdp.ConsumeIntInRange(0, 9)
        size = (1, 2, 4, 8, 3)[fdp.ConsumeIntInRange(0, 4)]
        offset = fdp.ConsumeIntInRange(0, window)
        if op < 4:
            t.read(offset, size)
        elif op < 8:
            t.write(offset, size, fdp.ConsumeIntInRange(0, (1 << 64) - 1))
        elif pci:
            cfg_off = fdp.ConsumeIntInRange(0, 260)
            if op == 8:
                t.config_read(cfg_off, size)  # type: ignore[attr-defined]
            else:
                t.config_write(cfg_off, size, fdp.ConsumeIntInRange(0, 0xFFFFFFFF))  # type: ignore[attr-defined]
        else:
            dev.kick(fdp.ConsumeIntInRange(0, 3))
    drv.ram.check_guards()
    # a driver that resets and starts over must get a working device
    if pci:
        t.config_write(0x10, 4, drv.BAR)  # type: ignore[attr-defined]
    drv.init()
    used = drv.request(0, [b"after"], [5])
    assert used.data == b"after", used
    dev.reset()
    drv.ram.check_guards()


if __name__ == "__main__":
    common.run(
        one_input,
        (
            "vdm.transport.mmio",
            "vdm.transport.pci",
            "vdm.transport.common",
            "vdm.transport.pci_config",
            "vdm.queue_config",
            "vdm_kvm.pci_bus",
            "vdm.device",
            "vdm.testing",
            "vdm.testing.devices",
        ),
    )
    sys.exit(0)
