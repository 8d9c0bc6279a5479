#!/usr/bin/env python3
"""Fuzz target: split-virtqueue chain walking, direct and indirect.

The input lays out a descriptor table, indirect tables and the available ring in fake guest RAM
(with canary pages around it), then kicks a device that copies each chain's readable bytes into
its writable ones. Invariants: the device either returns every published chain with a length it
could have written, or marks itself DEVICE_NEEDS_RESET; nothing outside guest RAM changes; no
exception escapes.
"""

from __future__ import annotations

import sys

import common


def one_input(data: bytes) -> None:
    import atheris
    from vdm.ring_layout import DESC
    from vdm.testing import EchoDevice, VirtioTestDriver

    fdp = atheris.FuzzedDataProvider(data)
    dev = EchoDevice(limit=4096)  # copies each chain's readable bytes (up to 4 KiB) into its writable
    drv = VirtioTestDriver(dev, ram_size=64 << 10)
    exclude = 0
    if fdp.ConsumeBool():
        exclude |= 1 << 28  # no INDIRECT_DESC
    if fdp.ConsumeBool():
        exclude |= 1 << 29  # no EVENT_IDX
    size = 1 << fdp.ConsumeIntInRange(1, 4)
    drv.init(exclude=exclude, queue_sizes=[size])
    ram = drv.ram
    scratch = ram.alloc(8192, 16)

    def addr() -> int:
        kind = fdp.ConsumeIntInRange(0, 5)
        if kind <= 2:
            return scratch + fdp.ConsumeIntInRange(0, 8191)
        if kind == 3:
            return ram.base + fdp.ConsumeIntInRange(0, ram.size + 64)
        if kind == 4:
            return ram.end - fdp.ConsumeIntInRange(0, 64)
        return fdp.ConsumeIntInRange(0, (1 << 64) - 1)

    for i in range(size):
        drv.write_desc(
            0,
            i,
            addr(),
            min(fdp.ConsumeIntInRange(0, 1 << fdp.ConsumeIntInRange(0, 32)), 0xFFFFFFFF),  # a u32
            fdp.ConsumeIntInRange(0, 7),
            fdp.ConsumeIntInRange(0, size + 2),
        )
    for _ in range(fdp.ConsumeIntInRange(0, 3)):  # indirect tables in scratch
        at = scratch + 16 * fdp.ConsumeIntInRange(0, 500)
        for j in range(fdp.ConsumeIntInRange(1, 8)):
            ram.write(
                at + 16 * j,
                DESC.pack(
                    addr(),
                    fdp.ConsumeIntInRange(0, 9000),
                    fdp.ConsumeIntInRange(0, 7),
                    fdp.ConsumeIntInRange(0, 9),
                ),
            )
    published = 0
    for _ in range(fdp.ConsumeIntInRange(1, size + 2)):
        drv.publish(0, fdp.ConsumeIntInRange(0, size + 1), bump=fdp.ConsumeIntInRange(1, 2))
        published += 1
    drv.kick(0)
    ram.check_guards()
    if not drv.needs_reset:
        used = drv.used_idx(0)
        assert used <= drv.queues[0].avail_idx or used < size * 2, "used index ran ahead of available"
    dev.reset()
    ram.check_guards()


if __name__ == "__main__":
    common.run(
        one_input,
        (
            *common.QUEUE_MODULES,
            "vdm.device",
            "vdm.memory",
            "vdm.transport.mmio",
            "vdm.transport.common",
            "vdm.testing",
        ),
    )
    sys.exit(0)
