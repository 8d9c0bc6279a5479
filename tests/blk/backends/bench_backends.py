"""Requests per second for 4 KiB random reads and writes on raw and qcow2 (not a test).

    python tests/blk/backends/bench_backends.py [--seconds 3] [--threads 4] [--dir /var/tmp]

Images are 1 GiB; qcow2 uses 64 KiB clusters and is fully allocated before the read run and the
"overwrite" run, so those measure the mapped path. "alloc" writes into an empty qcow2 image of
--alloc-gib GiB (64: nearly every write allocates a cluster; all L2 tables fit the cache. 1024:
L2 tables are also evicted, each eviction costing an fdatasync). The host page cache is warm: this
measures the backend's own cost, not the disk.
"""

from __future__ import annotations

import argparse
import os
import random
import subprocess
import tempfile
import threading
import time

from vdm_blk.backends import open_disk

SIZE = 1 << 30
BS = 4096


def run(disk, write: bool, seconds: float, threads: int, span: int) -> float:
    stop = time.monotonic() + seconds
    counts = [0] * threads

    def worker(t: int) -> None:
        rng = random.Random(t)
        buf = memoryview(bytearray(os.urandom(BS)))
        n = 0
        while time.monotonic() < stop:
            for _ in range(64):
                off = rng.randrange(0, span // BS) * BS
                if write:
                    disk.writev(off, [buf])
                else:
                    disk.readv(off, [buf])
                n += 1
        counts[t] = n

    ths = [threading.Thread(target=worker, args=(t,)) for t in range(threads)]
    t0 = time.monotonic()
    for th in ths:
        th.start()
    for th in ths:
        th.join()
    return sum(counts) / (time.monotonic() - t0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--dir", default=None)
    ap.add_argument("--alloc-gib", type=int, default=64, help="size of the image the alloc run writes into")
    args = ap.parse_args()
    alloc_size = args.alloc_gib << 30
    with tempfile.TemporaryDirectory(dir=args.dir) as d:
        raw = os.path.join(d, "b.raw")
        with open(raw, "wb") as f:
            f.truncate(SIZE)
        q = os.path.join(d, "b.qcow2")
        subprocess.run(
            ["qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=65536", q, str(SIZE)], check=True
        )
        empty = os.path.join(d, "e.qcow2")
        # large and empty: nearly every write of the run lands in a cluster of its own
        subprocess.run(
            ["qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=65536", empty, str(alloc_size)],
            check=True,
        )
        subprocess.run(
            ["qemu-io", "-f", "qcow2", "-c", f"write -P 1 0 {SIZE}", q], check=True, capture_output=True
        )
        with open(raw, "r+b") as f:
            f.write(b"\1" * SIZE)
        os.sync()
        results = []
        for name, path in (("raw", raw), ("qcow2", q)):
            disk = open_disk(path)
            results.append((name, "read", run(disk, False, args.seconds, args.threads, SIZE)))
            results.append((name, "overwrite", run(disk, True, args.seconds, args.threads, SIZE)))
            disk.close()
        disk = open_disk(empty)
        results.append(("qcow2", "alloc", run(disk, True, args.seconds, args.threads, alloc_size)))
        disk.close()
        for name, what, rate in results:
            print(f"{name:6} 4k random {what:9} {rate:10.0f} req/s  ({args.threads} thread(s))")


if __name__ == "__main__":
    main()
