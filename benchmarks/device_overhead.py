#!/usr/bin/env python3
"""Device overhead without a guest: 4 KiB virtio-blk reads through the device path.

The in-process driver lays out N requests once; each round re-publishes the same N chains, kicks,
and waits until the device has returned all of them. Only the device's side is timed per round
(the re-publish is a few ring writes). Backends: ``null`` (readv returns at once) and ``raw`` (a
file in the page cache).

    python3 benchmarks/device_overhead.py [--seconds 3] [--profile]
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import struct
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vdm.testing import VirtioTestDriver
from vdm_blk.config import BlkConfig
from vdm_blk.device import T_IN, BlkDevice


class NullDisk:
    size = 1 << 30
    read_only = False
    logical_block_size = 512
    physical_block_size = 4096
    optimal_io_size = 0
    supports_discard = False
    supports_write_zeroes = False

    def readv(self, offset, buffers):
        return sum(len(b) for b in buffers)

    writev = readv
    readv_nowait = readv

    def flush(self):
        pass

    def close(self):
        pass


def make_backend(kind: str, tmp: str):
    if kind == "null":
        return NullDisk()
    from vdm_blk.backends import open_disk

    path = os.path.join(tmp, "raw.img")
    with open(path, "wb") as f:
        f.write(os.urandom(64 << 20))
    return open_disk(path, format="raw")


def run(kind: str, inflight: int, seconds: float, tmp: str, profile: bool) -> dict:
    dev = BlkDevice(make_backend(kind, tmp), BlkConfig(path="bench", queue_size=256))
    drv = VirtioTestDriver(dev, ram_size=64 << 20)
    drv.init()
    q = drv.queues[0]
    heads = []
    for i in range(inflight):
        heads.append(drv.post(0, [struct.pack("<IIQ", T_IN, 0, i * 8)], [4096, 1]))
    drv.kick(0)
    drv.wait(0, inflight)
    ram = drv.ram
    n = 0
    busy = 0.0
    prof = cProfile.Profile() if profile else None
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        # re-publish the same chains
        for h in heads:
            ram.write(q.avail + 4 + 2 * (q.avail_idx % q.size), struct.pack("<H", h))
            q.avail_idx = (q.avail_idx + 1) & 0xFFFF
        # used_event: interrupt when the last of the round is returned
        ram.write(q.avail + 4 + 2 * q.size, struct.pack("<H", (q.avail_idx - 1) & 0xFFFF))
        ram.write(q.avail + 2, struct.pack("<H", q.avail_idx))
        target = q.avail_idx
        t0 = time.perf_counter()
        if prof:
            prof.enable()
        with drv.irq.cond:
            dev.kick(0)
            while drv.used_idx(0) != target:
                drv.irq.cond.wait(timeout=1)
        drv.ack_interrupts()
        if prof:
            prof.disable()
        busy += time.perf_counter() - t0
        n += inflight
    dev.close()
    out = {
        "backend": kind,
        "inflight": inflight,
        "requests": n,
        "req_per_s": n / busy,
        "us_per_req": busy / n * 1e6,
    }
    if prof:
        out["profile"] = prof
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--backends", default="null,raw")
    ap.add_argument("--profile", action="store_true", help="print where the time goes (cProfile)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        print("| backend | in flight | requests/s | µs/request |")
        print("| --- | --- | --- | --- |")
        for kind in args.backends.split(","):
            for inflight in (1, 8, 32):
                r = run(kind, inflight, args.seconds, tmp, args.profile and inflight == 32)
                print(f"| {kind} | {inflight} | {r['req_per_s']:,.0f} | {r['us_per_req']:.1f} |", flush=True)
                if "profile" in r:
                    pstats.Stats(r["profile"]).sort_stats("tottime").print_stats(15)


if __name__ == "__main__":
    main()
