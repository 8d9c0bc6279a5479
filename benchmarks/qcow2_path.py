#!/usr/bin/env python3
"""The qcow2 backend's own CPU per request, next to raw and the system-call floor (issue 18).

No device, no client: the calls vdm-blk's device makes, on a page-cached image, timed with
``time.thread_time`` (CPU of this thread only, so other load on the machine counts little), best
of ``--passes``. Rows: the floor (a bare ``os.preadv``/``os.pwritev`` of the same size), raw, and
qcow2 per image layout: ``convert`` (random data, ``qemu-img convert``: every cluster allocated in
guest order), ``falloc`` (``qemu-img create -o preallocation=falloc``: plain allocated clusters),
``metadata`` (``preallocation=metadata``: allocated clusters with the zero flag) and ``fresh``
(an empty image written by vdm in random 64 KiB-cluster order before the timing). Calls as the
device makes them: ``readv_nowait`` else ``readv`` (reads), ``writev_inline`` else ``writev``
(writes, not on ``metadata``: they would change the image the next process measures); 4 KiB at
random aligned offsets and 1 MiB sequential. With ``--before COMMIT`` each
row is measured also with vdm-blk's qcow2 modules as at COMMIT (a child process; see
``qcow2_ab.py``), alternating; ``--profile`` prints cProfile's top entries for qcow2.

    python3 benchmarks/qcow2_path.py [--mib 64] [--before COMMIT] [--profile]
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

LAYOUTS = ["convert", "falloc", "metadata", "fresh"]


def measure(tmp: Path, mib: int, passes: int, profile: bool) -> dict[str, float]:
    from vdm_blk.backends.qcow2 import Qcow2Disk
    from vdm_blk.backends.raw import RawDisk

    mem = mmap.mmap(-1, 2 << 20)
    mv = memoryview(mem)
    b4k = [mv[:4096]]
    b1m = [mv[i : i + (128 << 10)] for i in range(0, 1 << 20, 128 << 10)]  # 8 segments, as Linux sends
    rnd = random.Random(1)
    offs4 = [rnd.randrange((mib << 20) // 4096) * 4096 for _ in range(20000)]
    offs1m = [(i % mib) << 20 for i in range(300)]
    out: dict[str, float] = {}

    def best(name, fn, offs, bufs) -> None:
        t_best = 1e9
        for _ in range(passes):
            t = time.thread_time()
            for o in offs:
                fn(o, bufs)
            t_best = min(t_best, time.thread_time() - t)
        out[name] = t_best / len(offs) * 1e6

    fd = os.open(tmp / "img.raw", os.O_RDWR)
    best("floor read 4k", lambda o, b: os.preadv(fd, b, o), offs4, b4k)
    best("floor read 1m", lambda o, b: os.preadv(fd, b, o), offs1m, b1m)
    best("floor write 4k", lambda o, b: os.pwritev(fd, b, o), offs4, b4k)
    os.close(fd)
    disks = {"raw": RawDisk(str(tmp / "img.raw"))}
    for layout in LAYOUTS:
        disks[f"qcow2 {layout}"] = Qcow2Disk(str(tmp / f"{layout}.qcow2"))
    for name, d in disks.items():

        def read(o, b, d=d):
            if d.readv_nowait(o, b) is None:
                d.readv(o, b)

        def write(o, b, d=d):
            if d.writev_inline(o, b) is None:
                d.writev(o, b)

        best(f"{name} read 4k", read, offs4, b4k)
        best(f"{name} read 1m", read, offs1m, b1m)
        if name != "qcow2 metadata":  # (writes there allocate: the next process would see another image)
            best(f"{name} write 4k", write, offs4, b4k)
        if profile and name == "qcow2 convert":
            import cProfile
            import pstats

            for what, fn, offs, bufs in (("read 4k", read, offs4, b4k), ("read 1m", read, offs1m, b1m)):
                pr = cProfile.Profile()
                pr.enable()
                for o in offs:
                    fn(o, bufs)
                pr.disable()
                print(f"# cProfile, {name} {what} ({len(offs)} calls)", file=sys.stderr)
                pstats.Stats(pr, stream=sys.stderr).sort_stats("tottime").print_stats(8)
        d.close()
    return out


def make_images(tmp: Path, mib: int) -> None:
    with open(tmp / "img.raw", "wb") as f:
        for _ in range(mib):
            f.write(os.urandom(1 << 20))
    subprocess.run(
        ["qemu-img", "convert", "-O", "qcow2", str(tmp / "img.raw"), str(tmp / "convert.qcow2")], check=True
    )
    for layout in ("falloc", "metadata"):
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", f"preallocation={layout}",
                        str(tmp / f"{layout}.qcow2"), f"{mib}M"], check=True)  # fmt: skip
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", str(tmp / "fresh.qcow2"), f"{mib}M"], check=True
    )
    from vdm_blk.backends.qcow2 import Qcow2Disk

    d = Qcow2Disk(str(tmp / "fresh.qcow2"))
    order = list(range((mib << 20) >> 16))
    random.Random(2).shuffle(order)
    data = memoryview(os.urandom(1 << 16))
    for c in order:
        d.writev(c << 16, [data])
    d.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mib", type=int, default=64)
    ap.add_argument("--passes", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=2, help="alternations of before/after (with --before)")
    ap.add_argument("--before", help="also measure vdm-blk's qcow2 modules as at this commit")
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        print(json.dumps(measure(Path(a.child), a.mib, a.passes, a.profile)))
        return 0
    with tempfile.TemporaryDirectory(dir="/var/tmp", prefix="vdm-qcow2path-") as d:
        tmp = Path(d)
        make_images(tmp, a.mib)
        trees = {"after": None}
        if a.before:
            sys.path.insert(0, str(Path(__file__).resolve().parent))
            from qcow2_ab import before_pkg

            (tmp / "before").mkdir()
            before_pkg(a.before, tmp / "before")
            trees = {"before": str(tmp / "before"), "after": None}
        res: dict[str, list[dict[str, float]]] = {k: [] for k in trees}
        for _ in range(a.rounds if a.before else 1):
            for k, path in trees.items():
                env = dict(os.environ)
                if path:
                    env["PYTHONPATH"] = path
                argv = [
                    sys.executable,
                    __file__,
                    "--child",
                    str(tmp),
                    "--mib",
                    str(a.mib),
                    "--passes",
                    str(a.passes),
                ]
                if a.profile:
                    argv.append("--profile")
                p = subprocess.run(argv, env=env, check=True, stdout=subprocess.PIPE, text=True)
                res[k].append(json.loads(p.stdout))
    load = os.getloadavg()[0]
    cols = list(trees)
    print(f"# µs of CPU per call (thread_time, best of {a.passes} passes, min over rounds); load {load:.2f}")
    print("| call | " + " | ".join(cols) + (" | after/before |" if a.before else " |"))
    print("| --- " * (len(cols) + 1 + bool(a.before)) + "|")
    for key in res["after"][0]:
        if any(key not in r for k in cols for r in res[k]):
            continue
        v = {k: min(r[key] for r in res[k]) for k in cols}
        cells = [f"{v[k]:.2f}" for k in cols]
        if a.before:
            cells.append(f"{v['after'] / v['before']:.2f}")
        print(f"| {key} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
