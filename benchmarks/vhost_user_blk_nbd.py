#!/usr/bin/env python3
"""vhost-user-blk on an NBD export, without a guest: vdm and qemu-storage-daemon behind the same
qemu-nbd export kind, driven by the same libblkio client (issue 17 item 5).

Like ``benchmarks/vhost_user_blk_free.py`` (its client, rows and interleaving are reused), but each
backend reads its image through NBD: a ``qemu-nbd -f raw --cache=writeback`` process per backend
serves that backend's own copy of the image on a Unix socket; vdm opens
``nbd+unix:///?socket=...`` (libnbd), qsd a ``driver=nbd`` blockdev, and both put the format (raw,
or qcow2 read through the export) on top. Setups are interleaved per run as in the free benchmark;
figures are medians over ``--runs``; ratio vdm/qsd.

    python3 benchmarks/vhost_user_blk_nbd.py [--runs 3] [--time 3] [--mib 256] [--formats raw,qcow2]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import vhost_user_blk_free as free  # noqa: E402


def nbd_server(image: Path, sock: Path, log: Path) -> free.Backend:
    argv = ["qemu-nbd", "-f", "raw", "-t", "-e", "8", "--cache=writeback", "-k", str(sock), str(image)]
    return free.Backend(f"qemu-nbd {image.name}", argv, sock, log)


def vdm_cmd(uri: str, fmt: str, sock: Path) -> list[str]:
    exe = shutil.which("vdm")
    base = [exe] if exe else [sys.executable, "-m", "vdm.cli.main"]
    return [*base, "vhost-user", "--socket-path", str(sock), "--disk", f"path={uri},format={fmt}"]


def qsd_cmd(nbd_sock: Path, fmt: str, sock: Path) -> list[str]:
    nbd = f"driver=nbd,node-name={'d' if fmt == 'raw' else 'n'},server.type=unix,server.path={nbd_sock}"
    args = ["qemu-storage-daemon", "--blockdev", nbd]
    if fmt != "raw":
        args += ["--blockdev", f"driver={fmt},node-name=d,file=n"]
    export = f"type=vhost-user-blk,id=e,node-name=d,addr.type=unix,addr.path={sock},writable=on"
    return [*args, "--export", export]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--time", type=float, default=3, help="seconds per measurement (after 0.5 s warm-up)")
    ap.add_argument("--mib", type=int, default=256, help="image size and the range the client touches")
    ap.add_argument("--formats", default="raw,qcow2")
    a = ap.parse_args()
    formats = a.formats.split(",")
    root = free.debian13.build()
    out = subprocess.run(["bash", str(free.BUILD)], check=True, capture_output=True, text=True).stdout
    binary = Path(out.strip().splitlines()[-1])
    setups = [f"{who} {fmt}" for fmt in formats for who in ("vdm", "qsd")]
    res: dict[tuple[str, int], list[dict[str, float]]] = {
        (s, i): [] for s in setups for i in range(len(free.ROWS))
    }
    procs: list[free.Backend] = []
    with tempfile.TemporaryDirectory(dir="/var/tmp", prefix="vdm-blknbd-") as d:
        tmp = Path(d)
        images = free.make_images(tmp, a.mib, formats)
        try:
            socks = {}
            for s in setups:
                who, fmt = s.split()
                nsock = tmp / f"nbd-{who}-{fmt}.sock"
                procs.append(nbd_server(images[s], nsock, tmp / f"nbd-{who}-{fmt}.log"))
                sock = tmp / f"{who}-{fmt}.sock"
                uri = f"nbd+unix:///?socket={nsock}"
                argv = vdm_cmd(uri, fmt, sock) if who == "vdm" else qsd_cmd(nsock, fmt, sock)
                procs.append(free.Backend(s, argv, sock, tmp / f"{who}-{fmt}.log"))
                socks[s] = sock
            load0 = os.getloadavg()
            for run in range(a.runs):
                order = setups[run % len(setups) :] + setups[: run % len(setups)]
                for i, row in enumerate(free.ROWS):
                    for s in order:
                        res[(s, i)].append(free.run_client(root, binary, socks[s], row, a.time, a.mib))
                print(f"# run {run + 1} of {a.runs} done", file=sys.stderr, flush=True)
            load1 = os.getloadavg()
        finally:
            for p in reversed(procs):
                p.stop()
    git = subprocess.run(
        ["git", "-C", str(free.REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    )
    print(
        f"vdm at {git.stdout.strip()}, libblkio {root.info.get('libblkio1', '?')}, qemu-nbd per backend; "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; load average before/after: "
        f"{load0[0]:.2f} / {load1[0]:.2f}; {a.runs} runs, {a.time:g} s each, {a.mib} MiB images\n"
    )
    print("| row (NBD) | " + " | ".join(setups) + " | " + " | ".join(f"vdm/qsd {f}" for f in formats) + " |")
    print("| --- " * (1 + len(setups) + len(formats)) + "|")
    for i, (mode, bs, qd) in enumerate(free.ROWS):
        mb = bs == "1m"
        med = {s: statistics.median(r["mibps" if mb else "iops"] for r in res[(s, i)]) for s in setups}
        cells = [f"{med[s]:,.1f}" if mb else f"{med[s]:,.0f}" for s in setups]
        ratios = [f"{med[f'vdm {f}'] / med[f'qsd {f}']:.2f}" for f in formats]
        unit = "MiB/s" if mb else "IOPS"
        print(f"| {mode} {bs} qd{qd} ({unit}) | " + " | ".join(cells + ratios) + " |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
