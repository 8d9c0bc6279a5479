#!/usr/bin/env python3
"""vdm's virtio-blk (``vdm dm-only``) next to Xen's own PV block backend, in one Xen lab boot.

The Xen lab (scripts/xenlab: arm64 Xen 4.20 under QEMU TCG, Debian 13 dom0/domU) boots with two
QEMU disks for dom0, each a file of ``--disk-mib`` MiB in a temporary folder here. One domU gets
both: ``/dev/vda``, virtio-blk over libxl's generic virtio device served by ``vdm dm-only`` (its
defaults: through dom0's page cache; ``--vdm-blk cache=none`` fails every request on Xen, EFAULT:
O_DIRECT cannot pin privcmd-mapped guest pages), and ``/dev/xvda``, Xen's PV block (xen-blkfront in
the domU, the dom0 kernel's xen-blkback, ``disk = [ '..., backendtype=phy, script=/lab/pv-hotplug'
]``, which bypasses dom0's page cache). The domU (scripts/xenlab/domu-bench.sh) first writes
1 MiB of random bytes to each and reads it back, then runs ``--rounds`` rounds, the two devices in
alternating order each round: sequential write and read of ``--mib`` MiB in 1 MiB O_DIRECT
requests, ``--ops`` 4 KiB O_DIRECT writes and reads one at a time (consecutive offsets: busybox dd
is all the domU has; no fio, so no random offsets nor queue depths). With ``--net MIB``, the domU
also has vdm's virtio-net (dom0's tap 10.0.2.2/24) and a PV vif (xen-netfront, dom0's xen-netback
vif 10.0.3.2/24), and each round then moves MIB MiB over TCP from dom0 and MIB MiB to dom0 on each
(busybox nc to ``peer.py serve`` in dom0), again in alternating order.

Output: one line per round and device, then the median of each figure per device and the ratio
vdm/PV (higher is better for vdm). Everything runs under TCG: absolute numbers mean nothing; the
ratios, measured in the same boot and interleaved, are what to read.

    python3 benchmarks/xenlab_pv.py [--rounds 3] [--mib 16] [--ops 256] [--net 1] [--json out.json]

Needs the lab's cache (``scripts/xenlab/build.sh``; root for its first build).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LAB = REPO / "scripts" / "xenlab"
FIGURES = ("seqw_MiBps", "seqr_MiBps", "w4k_iops", "r4k_iops")
NET_FIGURES = ("rx_MiBps", "tx_MiBps")
DEVICES = {"vda": "vdm virtio-blk", "xvda": "Xen PV blkback"}
NET_DEVICES = {"vdm": "vdm virtio-net", "pv": "Xen PV netback"}
ROW = re.compile(r"XENLAB R1 DOMU XENBENCH R=(\d+) dev=(\w+) (.*)")
NET_ROW = re.compile(r"XENLAB R1 DOMU XENBENCH NET R=(\d+) dev=(\w+) (.*)")


def lab_dir() -> Path:
    return Path(os.environ.get("VDM_XENLAB_DIR", Path.home() / ".cache" / "vdm" / "xenlab"))


def run_lab(args: argparse.Namespace, work: Path) -> str:
    """Build (cached) and boot the lab once in bench mode; its whole output."""
    lab = lab_dir()
    if not args.no_build:
        r = subprocess.run([str(LAB / "build.sh"), str(lab)], capture_output=True, text=True, timeout=2400)
        if r.returncode != 0:
            sys.exit(f"xenlab_pv: scripts/xenlab/build.sh failed:\n{r.stderr[-2000:]}")
    disks = [work / "vdm.img", work / "pv.img"]
    for d in disks:
        with open(d, "wb") as f:
            f.truncate(args.disk_mib << 20)
    env = dict(os.environ, XENLAB_DIR=str(lab), XENLAB_DISK2=str(disks[1]))
    cmdline = [
        f"xenlab.bench={args.rounds}",
        f"xenlab.benchmib={args.mib}",
        f"xenlab.benchops={args.ops}",
        f"xenlab.benchnet={args.net}",
        f"xenlab.timeout={args.timeout}",
    ]
    if args.vdm_blk:
        cmdline.append(f"xenlab.benchblk={args.vdm_blk}")  # fmt: skip
    t0 = time.monotonic()
    log = work / "xenlab.log"  # written as the lab runs: `tail -f` it; kept when the boot overruns
    with open(log, "w") as f:
        cmd = [str(LAB / "run.sh"), str(disks[0]), *cmdline]
        p = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env)
        try:
            p.wait(timeout=args.timeout + 900)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
            print(f"xenlab_pv: the lab overran {args.timeout + 900} s and was stopped", file=sys.stderr)
    print(f"lab boot: {time.monotonic() - t0:.0f} s, log {log}", file=sys.stderr)
    return log.read_text(errors="replace")


Rows = dict[str, dict[str, list[float]]]


def _rows(out: str, pattern: re.Pattern[str], devices: dict[str, str], figures: tuple[str, ...]) -> Rows:
    rows: Rows = {d: {f: [] for f in figures} for d in devices}
    for _rnd, dev, rest in pattern.findall(out):
        kv = dict(re.findall(r"(\w+)=(\S+)", rest))
        for f in figures:
            rows[dev][f].append(float(kv[f]))
    return rows


def parse(out: str, net: bool) -> tuple[Rows, Rows | None]:
    """{device: {figure: [one value per round]}} for blk (and net); exits with the reason if the lab
    did not finish or a device did not work."""
    if "XENLAB END done" not in out:
        tail = "\n".join(ln for ln in out.splitlines() if ln.startswith("XENLAB "))[-3000:]
        sys.exit(f"xenlab_pv: the lab did not finish:\n{tail}")
    for dev in DEVICES:
        if f"XENBENCH CHECK dev={dev} readback=match" not in out:
            sys.exit(f"xenlab_pv: /dev/{dev}'s write/read-back check failed or is missing")
    blk = _rows(out, ROW, DEVICES, FIGURES)
    if not all(blk[d][FIGURES[0]] for d in DEVICES):
        sys.exit("xenlab_pv: no XENBENCH rows for one of the disks")
    if not net:
        return blk, None
    nets = _rows(out, NET_ROW, NET_DEVICES, NET_FIGURES)
    expect = str(args_net_bytes(out))
    bad = [m for m in re.findall(r"XENBENCH NET .*rx_bytes=(\d+)", out) if m != expect]
    if not all(nets[d][NET_FIGURES[0]] for d in NET_DEVICES) or bad:
        print(f"xenlab_pv: net rows missing or short (rx_bytes {bad}, expected {expect})", file=sys.stderr)
        return blk, None
    return blk, nets


def args_net_bytes(out: str) -> int:
    m = re.search(r"XENLAB BENCH .*net=(\d+)", out)
    return int(m.group(1)) << 20 if m else -1


def table(rows: Rows, a: str, b: str, figures: tuple[str, ...]) -> dict[str, dict[str, float]]:
    med = {d: {f: statistics.median(v) for f, v in figs.items()} for d, figs in rows.items()}
    print(f"{'figure':<12} {'vdm':>10} {'PV':>10} {'vdm/PV':>7}   per round: vdm | PV")
    for f in figures:
        v, p = med[a][f], med[b][f]
        ratio = v / p if p else float("nan")
        print(f"{f:<12} {v:>10.2f} {p:>10.2f} {ratio:>7.2f}   {rows[a][f]} | {rows[b][f]}")
    return med


def report(blk: Rows, net: Rows | None, args: argparse.Namespace) -> dict:
    print(f"rounds={args.rounds} mib={args.mib} ops={args.ops} net_mib={args.net} (TCG: ratios only)")
    result = {"blk": {"median": table(blk, "vda", "xvda", FIGURES), "rounds": blk}}
    if net:
        result["net"] = {"median": table(net, "vdm", "pv", NET_FIGURES), "rounds": net}
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--mib", type=int, default=16, help="MiB per sequential write/read")
    ap.add_argument("--ops", type=int, default=256, help="4 KiB requests per small-block figure")
    ap.add_argument("--net", type=int, default=0, help="MiB each way over TCP per round (0: no net)")
    ap.add_argument("--disk-mib", type=int, default=64)
    ap.add_argument("--vdm-blk", default="", help="vdm's disk options in dom0 (default: its defaults)")
    ap.add_argument("--timeout", type=int, default=900, help="seconds dom0 waits for the domU")
    ap.add_argument("--json", type=Path, help="write the figures here")
    ap.add_argument("--no-build", action="store_true", help="boot the lab as it is in the cache")
    ap.add_argument("--keep", type=Path, help="folder for the images and the lab log (default: temporary)")
    args = ap.parse_args()
    if args.mib > args.disk_mib or args.ops * 4 > args.disk_mib << 10:
        sys.exit("xenlab_pv: --mib and --ops*4 KiB must fit in --disk-mib")
    if args.keep:
        args.keep.mkdir(parents=True, exist_ok=True)
        out = run_lab(args, args.keep)
    else:
        with tempfile.TemporaryDirectory(prefix="xenlab-pv-") as d:
            out = run_lab(args, Path(d))
    result = report(*parse(out, args.net > 0), args)
    if args.json:
        result["params"] = {k: str(v) for k, v in vars(args).items()}
        args.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
