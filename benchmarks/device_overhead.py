#!/usr/bin/env python3
"""Device overhead without a guest: 4 KiB virtio-blk reads (or writes) through the device path.

The in-process driver lays out N requests once; each round re-publishes the same N chains
(:class:`vdm.testing.DriverRing`'s ``publish``), kicks, and waits until the device has returned all
of them. Only the device's side is timed per round (the re-publish is a few ring writes).
Backends: ``null`` (readv returns at once), ``raw`` (a file in the page cache) and ``raw-worker``
(the same file with the device's inline paths turned off, so every request goes through the
worker-thread handoff: the A/B of those paths).

    python3 benchmarks/device_overhead.py [--seconds 3] [--runs 3] [--op read|write] [--profile]
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import statistics
import struct
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vdm.testing import VirtioTestDriver
from vdm_blk.config import BlkConfig
from vdm_blk.device import T_IN, T_OUT, BlkDevice


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
    writev_inline = readv

    def flush(self):
        pass

    def close(self):
        pass


def make_backend(kind: str, tmp: str):
    if kind == "null":
        return NullDisk()
    from vdm_blk.backends import open_disk

    path = os.path.join(tmp, "raw.img")
    if not os.path.exists(path):
        with open(path, "wb") as f:
            f.write(os.urandom(64 << 20))
    disk = open_disk(path, format="raw")
    if kind == "raw-worker":
        # the DiskBackend defaults: None = "use a worker" for every request
        disk.readv_nowait = disk.writev_inline = lambda offset, buffers: None
    return disk


def run(kind: str, inflight: int, seconds: float, tmp: str, profile: bool, op: str = "read") -> dict:
    dev = BlkDevice(make_backend(kind, tmp), BlkConfig(path="bench", queue_size=256))
    drv = VirtioTestDriver(dev, ram_size=64 << 20)
    drv.init()
    q = drv.queues[0]
    heads = []
    for i in range(inflight):
        if op == "read":
            heads.append(drv.post(0, [struct.pack("<IIQ", T_IN, 0, i * 8)], [4096, 1]))
        else:
            heads.append(drv.post(0, [struct.pack("<IIQ", T_OUT, 0, i * 8), os.urandom(4096)], [1]))
    drv.kick(0)
    drv.wait(0, inflight)
    n = 0
    busy = 0.0
    prof = cProfile.Profile() if profile else None
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        # re-publish the same chains (no kick yet: the device looks only when kicked below)
        for h in heads:
            q.publish(h)
        # used_event: interrupt when the last of the round is returned
        q.set_used_event(q.avail_idx - 1)
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
    ap.add_argument("--runs", type=int, default=3, help="runs per row (median; backends interleaved)")
    ap.add_argument("--backends", default="null,raw")
    ap.add_argument("--op", choices=("read", "write"), default="read", help="4 KiB reads or writes")
    ap.add_argument("--profile", action="store_true", help="print where the time goes (cProfile)")
    args = ap.parse_args()
    kinds = args.backends.split(",")
    res: dict[tuple[str, int], list[dict]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        load0 = os.getloadavg()[0]
        for _ in range(args.runs):
            for inflight in (1, 8, 32):
                for kind in kinds:
                    r = run(kind, inflight, args.seconds, tmp, False, args.op)
                    res.setdefault((kind, inflight), []).append(r)
        load1 = os.getloadavg()[0]
        print(
            f"4 KiB {args.op}s; load average before/after: {load0:.2f} / {load1:.2f}; "
            f"median of {args.runs} runs of {args.seconds:g} s each\n"
        )
        print("| backend | in flight | requests/s | µs/request |")
        print("| --- | --- | --- | --- |")
        for kind in kinds:
            for inflight in (1, 8, 32):
                rs = res[kind, inflight]
                rps = statistics.median(r["req_per_s"] for r in rs)
                print(f"| {kind} | {inflight} | {rps:,.0f} | {1e6 / rps:.1f} |", flush=True)
        if args.profile:
            for kind in kinds:
                r = run(kind, 32, args.seconds, tmp, True, args.op)
                print(f"\nprofile: {kind}, 32 in flight, top 15 by own time\n```")
                pstats.Stats(r["profile"], stream=sys.stdout).sort_stats("tottime").print_stats(15)
                print("```")


if __name__ == "__main__":
    main()
