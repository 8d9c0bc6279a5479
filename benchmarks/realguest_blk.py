#!/usr/bin/env python3
"""Block, real guest: fio inside a QEMU TCG guest on vdm vhost-user-blk and its peers.

Rows: sequential 1 MiB read and write (queue depth 8), 4 KiB random read and write at queue depth 1
and 32, all O_DIRECT libaio in the guest. Setups, on one 256 MiB image each (created fresh, filled
so reads hit data): vdm vhost-user-blk on raw and on qcow2, qemu-storage-daemon's vhost-user-blk
export on the same raw and qcow2 images, and QEMU's built-in virtio-blk on raw. Runs are
interleaved (every setup once, then again), medians of ``--runs``. Prints a markdown table, then
what each vhost-user backend process spent per guest request (CPU time and context switches of all its
threads, read from /proc over the whole boot, divided by the requests fio completed; the few boot-time
requests are in the CPU but not in the count). ``--jobs`` picks a subset of the rows, e.g.
``--jobs randread:4k:1`` to see one row's cost alone.

    python3 benchmarks/realguest_blk.py [--runs 3] [--time 3] [--jobs read:1m:8,...]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import vdm_lab
from guest_fio import fio_initrd
from proc_cost import cost

JOBS = ["read:1m:8", "write:1m:8", "randread:4k:1", "randread:4k:32", "randwrite:4k:1", "randwrite:4k:32"]
SETUPS = ["vdm raw", "qsd raw", "qemu virtio-blk raw", "vdm qcow2", "qsd qcow2"]
PEERS = {"vdm raw": ["qsd raw", "qemu virtio-blk raw"], "vdm qcow2": ["qsd qcow2"]}


def qsd_cmd(fmt: str, image: Path, sock: Path) -> list[str]:
    """qemu-storage-daemon exporting ``image`` as vhost-user-blk at ``sock`` (page cache, as vdm)."""
    return ["qemu-storage-daemon",
            "--blockdev", f"driver=file,node-name=f,filename={image},cache.direct=off",
            "--blockdev", f"driver={fmt},node-name=d,file=f",
            "--export",
            f"type=vhost-user-blk,id=e,node-name=d,addr.type=unix,addr.path={sock},writable=on"]


@contextlib.contextmanager
def qsd(fmt: str, image: Path, sock: Path, log: Path) -> Iterator[subprocess.Popen[bytes]]:
    """qemu-storage-daemon serving ``sock`` while the block runs (stopped, and reaped, after)."""
    with open(log, "ab") as err:
        proc = subprocess.Popen(qsd_cmd(fmt, image, sock), stdout=subprocess.DEVNULL, stderr=err)
    try:
        deadline = time.monotonic() + 30
        while not sock.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        if not sock.exists():
            raise RuntimeError(f"qemu-storage-daemon did not listen: {log.read_text()[-2000:]}")
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def run_one(setup: str, images: dict[str, Path], tmp: Path, initrd: Path, seconds: int,
            kit: vdm_lab.GuestKit, jobs: list[str]) -> dict[str, float]:
    fmt = setup.split()[-1]
    image = images[fmt]
    sock = tmp / "b.sock"
    if sock.exists():
        sock.unlink()
    pid = None
    with contextlib.ExitStack() as backend:
        if setup.startswith("vdm"):
            pid = backend.enter_context(vdm_lab.VhostUserBackend(sock, "--disk", f"path={image},format={fmt}",
                                                                 start_timeout=30)).proc.pid
            extra = vdm_lab.vhost_user_blk_args(sock)
        elif setup.startswith("qsd"):
            pid = backend.enter_context(qsd(fmt, image, sock, tmp / "backend.log")).pid
            extra = vdm_lab.vhost_user_blk_args(sock)
        else:  # same host caching as the vhost-user backends (page cache, no O_DIRECT)
            extra = vdm_lab.virtio_blk_args(image, 0, fmt="raw", cache="writeback")
        before = cost(pid) if pid else (0.0, 0)
        r = vdm_lab.run_qemu(extra, ["fio"], {"jobs": "+".join(jobs), "time": seconds},
                             timeout=120 + 10 * seconds * len(jobs), kit=kit, initrd=initrd, memory_mib=512)
        after = cost(pid) if pid else (0.0, 0)
    r.assert_ok("fio")
    out = {k: float(v) for k, v in r["fio"].values.items() if k.endswith(("_iops", "_kibs"))}
    requests = 0.0
    for job in jobs:
        key, unit = metric(job)
        requests += out.get(key, 0.0) * seconds / (1024 if unit == "MiB/s" else 1)
    if pid and requests:
        out["cpu_us_per_request"] = (after[0] - before[0]) * 1e6 / requests
        out["switches_per_request"] = (after[1] - before[1]) / requests
    return out


def make_images(tmp: Path, mib: int) -> dict[str, Path]:
    raw = tmp / "disk.raw"
    with open(raw, "wb") as f:
        for _ in range(mib):
            f.write(os.urandom(1 << 20))
    qcow = tmp / "disk.qcow2"
    subprocess.run(["qemu-img", "convert", "-O", "qcow2", str(raw), str(qcow)], check=True)
    return {"raw": raw, "qcow2": qcow}


def metric(job: str) -> tuple[str, str]:
    rw, bs, qd = job.split(":")
    key = f"{rw}_{bs}_qd{qd}"
    return (key + "_kibs", "MiB/s") if bs == "1m" else (key + "_iops", "IOPS")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--time", type=int, default=3, help="seconds per fio job")
    ap.add_argument("--mib", type=int, default=256)
    ap.add_argument("--setups", default=",".join(SETUPS))
    ap.add_argument("--jobs", default=",".join(JOBS), help="fio rows, comma-separated (of %(default)s)")
    a = ap.parse_args()
    jobs = a.jobs.split(",")
    if unknown := [j for j in jobs if j not in JOBS]:
        ap.error(f"unknown job(s) {', '.join(unknown)}: pick from {', '.join(JOBS)}")
    kit = vdm_lab.guestkit()
    setups = a.setups.split(",")
    res: dict[str, list[dict[str, float]]] = {s: [] for s in setups}
    with tempfile.TemporaryDirectory(dir="/var/tmp") as d:
        tmp = Path(d)
        images = make_images(tmp, a.mib)
        initrd = fio_initrd(kit.initrd_fio, tmp / "initrd-fio-bench.cpio")
        load0 = os.getloadavg()
        for i in range(a.runs):
            for s in setups:
                t0 = time.monotonic()
                res[s].append(run_one(s, images, tmp, initrd, a.time, kit, jobs))
                print(f"# run {i + 1} {s}: {time.monotonic() - t0:.0f} s", file=sys.stderr, flush=True)
        load1 = os.getloadavg()
    print(f"load average before/after: {load0[0]:.2f} / {load1[0]:.2f}; "
          f"{a.runs} runs, {a.time} s per fio job\n")
    print("| fio job | " + " | ".join(setups) + " | " +
          " | ".join(f"{v}/{p}" for v in PEERS if v in setups for p in PEERS[v] if p in setups) + " |")
    ncols = len(setups) + sum(1 for v in PEERS if v in setups for p in PEERS[v] if p in setups)
    print("| --- " * (ncols + 1) + "|")
    for job in jobs:
        key, unit = metric(job)
        div = 1024 if unit == "MiB/s" else 1
        med = {s: statistics.median(r[key] for r in res[s]) / div for s in setups}
        cells = [f"{med[s]:,.1f}" if unit == "MiB/s" else f"{med[s]:,.0f}" for s in setups]
        ratios = [f"{med[v] / med[p]:.2f}" if med[p] else "-"
                  for v in PEERS if v in setups for p in PEERS[v] if p in setups]
        print(f"| {job} ({unit}) | " + " | ".join(cells + ratios) + " |", flush=True)
    backends = [s for s in setups if all("cpu_us_per_request" in r for r in res[s])]
    if backends:
        print(f"\nper guest request, whole boot ({'+'.join(jobs)}):\n")
        print("| backend | CPU us/request | context switches/request |\n| --- | --- | --- |")
        for s in backends:
            cpu = statistics.median(r["cpu_us_per_request"] for r in res[s])
            sw = statistics.median(r["switches_per_request"] for r in res[s])
            print(f"| {s} | {cpu:.1f} | {sw:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
