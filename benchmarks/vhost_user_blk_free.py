#!/usr/bin/env python3
"""vhost-user-blk without a guest: vdm and qemu-storage-daemon driven by the same libblkio client.

The client is ``scripts/frontends/blkio_frontend.c`` on libblkio 1.5's ``virtio-blk-vhost-user``
driver (built and run inside the Debian 13 root, ``scripts/frontends/build.sh``): one thread, one
queue, requests submitted as soon as a slot frees, completions waited for on the call eventfd. It
costs far less per request than either backend, so the backend's own per-request cost shows.

Rows: sequential 1 MiB read and write at queue depth 8, 4 KiB random read and write at queue depth
1 and 32 (the rows of table 1 in BENCHMARKS.md). Setups: vdm raw, qsd raw, vdm qcow2, qsd qcow2,
each backend on its own copy of one image (``--mib`` MiB of random data, so reads hit data; the
qcow2 is ``qemu-img convert`` of the raw), page cache on both sides
(``qemu-storage-daemon ... cache.direct=off``, vdm's default). Each backend runs for the whole
benchmark; the rows are interleaved (for every run, for every row, every setup, the setups' order
rotating per run). Figures: median over ``--runs`` of IOPS (MiB/s for 1 MiB rows) and of the
client's p50/p99 latency; ratio vdm/qsd (IOPS: higher is better for vdm; p99: lower is better).

    python3 benchmarks/vhost_user_blk_free.py [--runs 3] [--time 3] [--mib 256] [--formats raw,qcow2]
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from vdm_lab import debian13  # noqa: E402

BUILD = REPO / "scripts" / "frontends" / "build.sh"
#: (client mode, block size, queue depth)
ROWS = [("read", "1m", 8), ("write", "1m", 8), ("randread", "4k", 1), ("randread", "4k", 32),
        ("randwrite", "4k", 1), ("randwrite", "4k", 32)]  # fmt: skip
RESULT = re.compile(r"^RESULT .*ios=(\d+) seconds=([\d.]+) iops=([\d.]+) mibps=([\d.]+) "
                    r"p50_us=([\d.]+) p99_us=([\d.]+) errors=0$", re.M)  # fmt: skip


def vdm_cmd(image: Path, fmt: str, sock: Path) -> list[str]:
    exe = shutil.which("vdm")
    base = [exe] if exe else [sys.executable, "-m", "vdm.cli.main"]
    return [*base, "vhost-user", "--socket-path", str(sock), "--disk", f"path={image},format={fmt}"]


def qsd_cmd(image: Path, fmt: str, sock: Path) -> list[str]:
    return [
        "qemu-storage-daemon",
        "--blockdev", f"driver=file,node-name=f,filename={image},cache.direct=off",
        "--blockdev", f"driver={fmt},node-name=d,file=f",
        "--export", f"type=vhost-user-blk,id=e,node-name=d,addr.type=unix,addr.path={sock},writable=on",
    ]  # fmt: skip


class Backend:
    """One backend process serving ``sock`` for the whole benchmark."""

    def __init__(self, name: str, argv: list[str], sock: Path, log: Path) -> None:
        self.name, self.sock = name, sock
        self._log = open(log, "ab")  # closed in stop()
        self.proc = subprocess.Popen(argv, stdout=self._log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        while not sock.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"{name} did not listen on {sock}: {log.read_text()[-2000:]}")
            time.sleep(0.05)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


def make_images(tmp: Path, mib: int, formats: list[str]) -> dict[str, Path]:
    raw = tmp / "seed.raw"
    with open(raw, "wb") as f:
        for _ in range(mib):
            f.write(os.urandom(1 << 20))
    out = {}
    for fmt in formats:
        for who in ("vdm", "qsd"):
            path = tmp / f"{who}.{fmt}"
            if fmt == "raw":
                shutil.copyfile(raw, path)
            else:
                subprocess.run(["qemu-img", "convert", "-O", fmt, str(raw), str(path)], check=True)
            out[f"{who} {fmt}"] = path
    raw.unlink()
    return out


def run_client(
    root: debian13.Debian13Root, binary: Path, sock: Path, row: tuple[str, str, int], seconds: float, mib: int
) -> dict[str, float]:
    mode, bs, qd = row
    argv = [str(binary), "--path", str(sock), "--mode", mode, "--bs", bs, "--qd", str(qd),
            "--size", f"{mib}M", "--time", str(seconds), "--warmup", "0.5"]  # fmt: skip
    p = root.run(argv, visible=[binary.parent, sock.parent], timeout=60 + 2 * seconds)
    m = RESULT.search(p.stdout)
    if p.returncode != 0 or not m:
        raise RuntimeError(f"blkio_frontend {' '.join(argv[1:])}: exit {p.returncode}\n{p.stdout}{p.stderr}")
    return {"iops": float(m.group(3)), "mibps": float(m.group(4)), "p50": float(m.group(5)),
            "p99": float(m.group(6))}  # fmt: skip


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--time", type=float, default=3, help="seconds per measurement (after 0.5 s warm-up)")
    ap.add_argument("--mib", type=int, default=256, help="image size and the range the client touches")
    ap.add_argument("--formats", default="raw,qcow2")
    a = ap.parse_args()
    formats = a.formats.split(",")
    root = debian13.build()
    binary = Path(subprocess.run(["bash", str(BUILD)], check=True, capture_output=True, text=True)
                  .stdout.strip().splitlines()[-1])  # fmt: skip
    setups = [f"{who} {fmt}" for fmt in formats for who in ("vdm", "qsd")]
    res: dict[tuple[str, int], list[dict[str, float]]] = {
        (s, i): [] for s in setups for i in range(len(ROWS))
    }
    backends: list[Backend] = []
    with tempfile.TemporaryDirectory(dir="/var/tmp", prefix="vdm-blkfree-") as d:
        tmp = Path(d)
        images = make_images(tmp, a.mib, formats)
        try:
            for s in setups:
                who, fmt = s.split()
                sock = tmp / f"{who}-{fmt}.sock"
                argv = (vdm_cmd if who == "vdm" else qsd_cmd)(images[s], fmt, sock)
                backends.append(Backend(s, argv, sock, tmp / f"{who}-{fmt}.log"))
            socks = {b.name: b.sock for b in backends}
            load0 = os.getloadavg()
            for run in range(a.runs):
                order = setups[run % len(setups) :] + setups[: run % len(setups)]
                for i, row in enumerate(ROWS):
                    for s in order:
                        res[(s, i)].append(run_client(root, binary, socks[s], row, a.time, a.mib))
                print(f"# run {run + 1} of {a.runs} done", file=sys.stderr, flush=True)
            load1 = os.getloadavg()
        finally:
            for b in backends:
                b.stop()
    git = subprocess.run(
        ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    )
    print(
        f"vdm at {git.stdout.strip()}, libblkio {root.info.get('libblkio1', '?')}, "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; load average before/after: "
        f"{load0[0]:.2f} / {load1[0]:.2f}; {a.runs} runs, {a.time:g} s each, {a.mib} MiB images\n"
    )
    print("| row | " + " | ".join(f"{s}" for s in setups) + " | "
          + " | ".join(f"vdm/qsd {fmt}" for fmt in formats) + " | "
          + " | ".join(f"p50/p99 µs {s}" for s in setups) + " | "
          + " | ".join(f"p99 vdm/qsd {fmt}" for fmt in formats) + " |")  # fmt: skip
    print("| --- " * (1 + 2 * len(setups) + 2 * len(formats)) + "|")
    for i, (mode, bs, qd) in enumerate(ROWS):
        mb = bs == "1m"
        med = {s: statistics.median(r["mibps" if mb else "iops"] for r in res[(s, i)]) for s in setups}
        p50 = {s: statistics.median(r["p50"] for r in res[(s, i)]) for s in setups}
        p99 = {s: statistics.median(r["p99"] for r in res[(s, i)]) for s in setups}
        cells = [f"{med[s]:,.1f}" if mb else f"{med[s]:,.0f}" for s in setups]
        ratios = [f"{med[f'vdm {f}'] / med[f'qsd {f}']:.2f}" for f in formats]
        lats = [f"{p50[s]:,.0f} / {p99[s]:,.0f}" for s in setups]
        lratios = [f"{p99[f'vdm {f}'] / p99[f'qsd {f}']:.2f}" for f in formats]
        unit = "MiB/s" if mb else "IOPS"
        print(
            f"| {mode} {bs} qd{qd} ({unit}) | " + " | ".join(cells + ratios + lats + lratios) + " |",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
