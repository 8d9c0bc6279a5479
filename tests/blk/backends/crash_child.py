"""The process the crash test kills: writes, discards and flushes through the qcow2 backend.

It prints ``B kind offset length seed`` before each request, ``D`` when it completed and ``F``
when a flush completed, so the parent knows what must have survived (everything before the last
``F``) and what may or may not have (anything begun after it).
"""

from __future__ import annotations

import random
import sys

from vdm_blk.backends import open_disk, qcow2


def pattern(n: int, seed: int) -> bytearray:
    out = bytearray(n)
    for i in range(0, n, 512):
        out[i : i + 16] = seed.to_bytes(8, "little") + i.to_bytes(8, "little")
    return out


def main() -> None:
    path, seed = sys.argv[1], int(sys.argv[2])
    if len(sys.argv) > 3 and sys.argv[3] == "tiny-caches":
        # two L2 tables and two refcount blocks: evictions write metadata back between flushes
        qcow2.MIN_CACHE_TABLES, qcow2.L2_CACHE_BYTES, qcow2.REFBLOCK_CACHE_BYTES = 2, 0, 0
    rng = random.Random(seed)
    disk = open_disk(path)
    sectors = disk.size // 512
    out = sys.stdout
    out.write("READY\n")
    out.flush()
    n = 0
    while True:
        n += 1
        r = rng.random()
        count = rng.choice((1, 1, 2, 8, 8, 16, 64))
        sector = rng.randrange(0, sectors - count)
        if r < 0.08:
            disk.flush()
            out.write("F\n")
        else:
            kind = "W" if r < 0.85 else ("Z" if r < 0.93 else "X")
            s = seed * 1_000_000 + n
            out.write(f"B {kind} {sector * 512} {count * 512} {s}\n")
            out.flush()
            if kind == "W":
                disk.writev(sector * 512, [memoryview(pattern(count * 512, s))])
            elif kind == "Z":
                disk.write_zeroes(sector * 512, count * 512, rng.random() < 0.5)
            else:
                disk.discard(sector * 512, count * 512)
            out.write("D\n")
        out.flush()


if __name__ == "__main__":
    main()
