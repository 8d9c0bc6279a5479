#!/usr/bin/env python3
"""Fuzz target: vdm_balloon -- virtio-balloon's queues from a hostile guest.

Guest RAM is an anonymous mmap between canary pages (page-aligned, as a VMM's, so releases really
happen). The input is a series of steps: inflate and deflate requests of any page numbers (inside
RAM, around its edges, far outside) and any byte length, statistics buffers of any content,
free page reporting buffers, hand-made descriptors, target changes, stats requests, resets, with
any subset of the offered features. Invariants: the canaries never change (nothing outside guest
RAM is released or written); every inflated PFN lies in guest RAM; a page the guest did not give
keeps its bytes; well-formed requests never break the device; stats are only tags the guest sent.
"""

from __future__ import annotations

import mmap
import struct
import sys

import common

PAGE = 4096


def make_ram(size: int):
    from vdm.memory import FlatGuestMemory, MemoryRegion
    from vdm.testing import GuestRam
    from vdm.testing.memory import GUARD

    ram = GuestRam(size)
    host = mmap.mmap(-1, size + 2 * GUARD)
    host[:] = bytes(ram._host)
    ram._host = host
    ram.region = MemoryRegion(ram.base, memoryview(host)[GUARD : GUARD + size])
    ram.memory = FlatGuestMemory([ram.region])
    return ram


def one_input(data: bytes) -> None:
    import atheris
    from vdm.testing import VirtioTestDriver
    from vdm_balloon.config import BalloonConfig
    from vdm_balloon.device import BalloonDevice

    fdp = atheris.FuzzedDataProvider(data)
    dev = BalloonDevice(BalloonConfig(queue_size=16))
    ram = make_ram(1 << 20)
    drv = VirtioTestDriver(dev, ram=ram)
    keep = ram.alloc(PAGE, align=PAGE)  # a page the guest never gives
    ram.write(keep, b"\x5a" * PAGE)
    first, last = ram.base // PAGE, ram.end // PAGE - 1
    try:
        drv.init(exclude=fdp.ConsumeIntInRange(0, 0x3F) & 0x26)
        for _ in range(fdp.ConsumeIntInRange(1, 24)):
            op = fdp.ConsumeIntInRange(0, 7)
            if op <= 1:  # inflate / deflate
                n = fdp.ConsumeIntInRange(0, 64)
                pick = [first, last, last + 1, first - 1, 0, 0xFFFFFFFF]
                pfns = [pick[fdp.ConsumeIntInRange(0, 5)] if fdp.ConsumeBool()
                        else fdp.ConsumeIntInRange(first, last) for _ in range(n)]
                pfns = [p for p in pfns if p != keep // PAGE]
                body = struct.pack(f"<{len(pfns)}I", *pfns) + fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 3))
                drv.request(op, [body or b"\0"], [], timeout=5)
            elif op == 2 and drv.features & 2:  # statistics
                drv.submit(2, [fdp.ConsumeBytes(fdp.ConsumeIntInRange(1, 200)) or b"\0"], [])
            elif op == 3 and drv.features & 0x20:  # free page reporting
                qi = 3 if drv.features & 2 else 2
                drv.request(qi, [], [fdp.ConsumeIntInRange(1, 3 * PAGE)], timeout=5)
            elif op == 4:  # a hand-made descriptor on any queue
                qi = fdp.ConsumeIntInRange(0, 1)
                head = fdp.ConsumeIntInRange(0, 15)
                drv.write_desc(qi, head, fdp.ConsumeIntInRange(0, 1 << 32), fdp.ConsumeIntInRange(0, 1 << 20),
                               fdp.ConsumeIntInRange(0, 7), fdp.ConsumeIntInRange(0, 17))
                drv.publish(qi, head)
                drv.kick(qi)
            elif op == 5:
                dev.set_target_pages(fdp.ConsumeIntInRange(0, (1 << 32) - 1))
            elif op == 6:
                dev.request_stats()
                for qi in drv.queues:
                    drv.collect(qi)
            else:
                drv.init()
            assert all(ram.base <= p * PAGE and p * PAGE + PAGE <= ram.end for p in dev.inflated)
            if drv.needs_reset:
                drv.init()
        assert ram.read(keep, PAGE) == b"\x5a" * PAGE, "a page the guest kept lost its bytes"
    except TimeoutError:
        assert drv.needs_reset or dev.broken is not None, "a request was never answered"
    finally:
        ram.check_guards()


if __name__ == "__main__":
    common.run(one_input, ("vdm_balloon.device", "vdm_balloon.release", "vdm.virtqueue", "vdm.chain"))
    sys.exit(0)
