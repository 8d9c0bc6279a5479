#!/usr/bin/env python3
"""Fuzz target: vdm_virtio_rng -- virtio-rng requests under a rate limit, from a file or /dev/urandom.

The input chooses the source (a file of 0 to 4 KiB, or /dev/urandom), the limit (none, or any
rate and period), then a series of steps: requests of any buffer layout (readable buffers,
writable ones of any length including 0, indirect tables), hand-made descriptors (out of RAM,
looping), kicks, driver resets, and moves of the device's clock (injected: nothing waits in real
time). Invariants: every used length is at most the request's writable room and MAX_REQUEST, and
is 0 only for a request with no writable room; with a file source the bytes the guest got, in
used-ring order, are the file's first bytes; with a limit, what the guest got since the first
byte is at most one quota per period elapsed plus one; a source that ends fails the device (never a
short answer of 0 bytes); nothing outside guest RAM is written; no file but the source is
opened; after close the waker thread has ended and no fd is left open.
"""

from __future__ import annotations

import os
import sys
import tempfile

import common

TMP = tempfile.mkdtemp(prefix="fuzz-rng-")


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def one_input(data: bytes) -> None:
    import atheris
    from vdm.testing import VirtioTestDriver
    from vdm_virtio_rng.config import MIN_QUOTA, RngConfig
    from vdm_virtio_rng.device import MAX_REQUEST, RngDevice

    fdp = atheris.FuzzedDataProvider(data)
    pool = None
    source = "/dev/urandom"
    if fdp.ConsumeBool():
        pool = fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 4096))
        source = os.path.join(TMP, "pool")
        with open(source, "wb") as f:
            f.write(pool)
    period = fdp.ConsumeIntInRange(1, 5000)
    least = -(-MIN_QUOTA * 1000 // period)  # the smallest rate whose window gives MIN_QUOTA
    rate = fdp.ConsumeIntInRange(least, max(least, 200_000)) if fdp.ConsumeBool() else 0
    config = RngConfig(source=source, rate=rate, period=period, queue_size=16)
    fds_before = len(os.listdir("/proc/self/fd"))
    opened = common.watch_files()
    clock = Clock()
    dev = RngDevice(config, clock=clock)
    opened.clear()
    drv = VirtioTestDriver(dev, ram_size=1 << 20)
    room: dict[int, int] = {}  # head -> writable bytes of the chains this target posted
    got = bytearray()
    first = None  # the clock when the first byte was served
    try:
        drv.init(exclude=fdp.ConsumeIntInRange(0, 3) << 28)
        for _ in range(fdp.ConsumeIntInRange(1, 24)):
            op = fdp.ConsumeIntInRange(0, 5)
            if op == 0 and len(room) < 3:  # a request of any layout (at most 5 of the 16 descriptors)
                outs = [fdp.ConsumeBytes(fdp.ConsumeIntInRange(1, 32)) or b"x" for _ in
                        range(fdp.ConsumeIntInRange(0, 2))]
                ins = [fdp.ConsumeIntInRange(1, 3 * MAX_REQUEST // 2) if fdp.ConsumeBool()
                       else fdp.ConsumeIntInRange(1, 128) for _ in range(fdp.ConsumeIntInRange(0, 3))]
                if not outs and not ins:
                    ins = [1]
                indirect = bool(drv.features >> 28 & 1) and fdp.ConsumeBool()
                head = drv.post(0, outs, ins, indirect=indirect)
                room[head] = sum(ins)
                if fdp.ConsumeBool():
                    drv.kick(0)
            elif op == 1:  # a hand-made descriptor: anywhere, any length, any next
                if fdp.ConsumeBool():
                    head = fdp.ConsumeIntInRange(0, 15)
                    addr, length = fdp.ConsumeIntInRange(0, 1 << 21), fdp.ConsumeIntInRange(0, 1 << 17)
                    flags, nxt = fdp.ConsumeIntInRange(0, 7), fdp.ConsumeIntInRange(0, 17)
                    drv.write_desc(0, head, addr, length, flags, nxt)
                    drv.publish(0, head)
                    room.clear()  # the ring is the fuzzer's now: no per-request expectations
                    room[-1] = -1
                drv.kick(0)
            elif op == 2:
                drv.kick(0)
            elif op == 3:
                clock.now += fdp.ConsumeIntInRange(0, 3000) / 1000
            elif op == 4 and fdp.ConsumeBool():  # the driver resets and starts again
                drv.init()
                room = {k: v for k, v in room.items() if k == -1}
            try:
                used = drv.collect(0)
            except AssertionError as e:  # a hand-made head came back: the driver did not post it
                if -1 not in room or "not in flight" not in str(e):
                    raise
                used = []
            for u in used:
                assert u.written <= MAX_REQUEST and u.written <= len(u.data), u
                if -1 not in room:
                    want = room.pop(u.head)
                    assert u.written <= want
                    assert u.written > 0 or want == 0, "a 0-byte answer to a request with room"
                    if rate and pool is None:  # answered whole, or with a whole (smaller) quota
                        assert u.written in (min(want, MAX_REQUEST), config.quota), (u.written, want)
                    if u.written and first is None:
                        first = clock.now
                    got += u.data[: u.written]
            if pool is not None and -1 not in room:
                assert bytes(got) == pool[: len(got)], "the guest got bytes out of order or not the file's"
                if drv.needs_reset:
                    assert len(got) == len(pool), "the device failed before the file ended"
            if rate and first is not None:
                windows = int((clock.now - first) * 1000 // config.period) + 1
                assert len(got) <= windows * config.quota, (len(got), windows, config.quota)
            if drv.needs_reset:
                drv.init()
                room = {k: v for k, v in room.items() if k == -1}
    finally:
        dev.close()
        drv.ram.check_guards()
    assert not dev.waker_running, "the waker thread outlived close"
    assert len(os.listdir("/proc/self/fd")) <= fds_before, "an fd left open after close"
    assert not common.data_files([p for p in opened if p != "/proc/self/fd"]), opened


if __name__ == "__main__":
    common.run(one_input, ("vdm_virtio_rng.device", "vdm_virtio_rng.limit", "vdm.virtqueue", "vdm.chain"))
    sys.exit(0)
