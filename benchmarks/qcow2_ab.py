#!/usr/bin/env python3
"""qcow2 before/after A/B: vdm at an older commit, vdm as checked out, and qemu-storage-daemon, in one run.

The same libblkio client and rows as ``vhost_user_blk_free.py`` (sequential 1 MiB read and write at
queue depth 8, 4 KiB random read and write at queue depth 1 and 32), on qcow2 only. Setups:
``vdm-before`` runs vdm with vdm-blk's qcow2 modules (``backends/qcow2*.py``) as at ``--before``
and everything else as checked out (a copy of the package first on PYTHONPATH), ``vdm`` the
checked-out tree, ``qsd`` qemu-storage-daemon: the A/B is of the qcow2 code alone.
Each backend has its own copy of one image of ``--mib`` MiB: ``--layout convert`` (the default, as
``vhost_user_blk_free.py`` makes it: random data, ``qemu-img convert`` to qcow2, every cluster
allocated in guest order) or ``qemu-img create -o preallocation=LAYOUT`` (``metadata``: clusters
allocated with the zero flag; ``falloc``/``full``: plain allocated clusters reading zeros). The rows are
interleaved (every run, every row, every setup, the order rotating per run). Figures: medians
over ``--runs``; ratios after/before and after/qsd.

    python3 benchmarks/qcow2_ab.py --before <commit> [--runs 3] [--time 2] [--mib 256]
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from vhost_user_client import (
    REPO,
    Backend,
    arguments,
    client,
    header,
    interleaved,
    median,
    random_image,
    ratio,
    vdm_base,
)

ROWS = [("read", "1m", 8), ("write", "1m", 8), ("randread", "4k", 1), ("randread", "4k", 32),
        ("randwrite", "4k", 1), ("randwrite", "4k", 32)]  # fmt: skip
SETUPS = ["vdm-before", "vdm", "qsd"]


def images(tmp: Path, mib: int, layout: str) -> dict[str, Path]:
    """One copy of one image per setup (``layout``: see the module documentation)."""
    out = {}
    if layout == "convert":
        raw = random_image(tmp / "seed.raw", mib)
        first = tmp / "first.qcow2"
        subprocess.run(["qemu-img", "convert", "-O", "qcow2", str(raw), str(first)], check=True)
        raw.unlink()
    else:
        first = tmp / "first.qcow2"
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", f"preallocation={layout}",
                        str(first), f"{mib}M"], check=True)  # fmt: skip
    for s in SETUPS:
        out[s] = tmp / f"{s}.qcow2"
        shutil.copyfile(first, out[s])
    first.unlink()
    return out


def before_pkg(commit: str, dest: Path) -> None:
    """vdm-blk as checked out, with its qcow2 modules (``backends/qcow2*.py``) as at ``commit``:
    only the qcow2 code differs between ``vdm-before`` and ``vdm``."""
    pkg = REPO / "plugins/blk/src/vdm_blk"
    out = dest / "vdm_blk"
    shutil.copytree(pkg, out, ignore=shutil.ignore_patterns("__pycache__"))
    for f in (out / "backends").glob("qcow2*.py"):
        f.unlink()
    names = subprocess.run(
        ["git", "-C", str(REPO), "ls-tree", "--name-only", commit, "plugins/blk/src/vdm_blk/backends/"],
        check=True, capture_output=True, text=True,
    ).stdout.split()  # fmt: skip
    for name in names:
        if Path(name).name.startswith("qcow2") and name.endswith(".py"):
            text = subprocess.run(["git", "-C", str(REPO), "show", f"{commit}:{name}"],
                                  check=True, capture_output=True).stdout  # fmt: skip
            (out / "backends" / Path(name).name).write_bytes(text)


def argv(setup: str, image: Path, sock: Path, before_src: Path) -> list[str]:
    if setup == "qsd":
        return [
            "qemu-storage-daemon",
            "--blockdev", f"driver=file,node-name=f,filename={image},cache.direct=off",
            "--blockdev", "driver=qcow2,node-name=d,file=f",
            "--export", f"type=vhost-user-blk,id=e,node-name=d,addr.type=unix,addr.path={sock},writable=on",
        ]  # fmt: skip
    env = ["env", f"PYTHONPATH={before_src}"] if setup == "vdm-before" else []
    return [
        *env,
        *vdm_base(),
        "vhost-user",
        "--socket-path",
        str(sock),
        "--disk",
        f"path={image},format=qcow2",
    ]


def main() -> int:
    def more(ap) -> None:
        ap.add_argument("--before", required=True, help="the commit whose vdm-blk is 'before'")
        ap.add_argument("--layout", default="convert", choices=["convert", "metadata", "falloc", "full"])

    a = arguments(__doc__, mib=256, more=more)
    root, binary = client()
    backends: list[Backend] = []
    with tempfile.TemporaryDirectory(dir="/var/tmp", prefix="vdm-qcow2ab-") as d:
        tmp = Path(d)
        before_src = tmp / "before"
        before_src.mkdir()
        before_pkg(a.before, before_src)
        imgs = images(tmp, a.mib, a.layout)
        try:
            for s in SETUPS:
                sock = tmp / f"{s}.sock"
                backends.append(Backend(s, argv(s, imgs[s], sock, before_src), sock, tmp / f"{s}.log"))
            res, loads = interleaved(root, binary, {b.name: b.sock for b in backends}, ROWS, a)
        finally:
            for b in backends:
                b.stop()
    print(header(root, a, loads, note=f", before = {a.before}, layout {a.layout}"))
    print("| row | " + " | ".join(SETUPS) + " | after/before | after/qsd | before/qsd | "
          + " | ".join(f"p50/p99 µs {s}" for s in SETUPS) + " |")  # fmt: skip
    print("| --- " * (1 + 2 * len(SETUPS) + 3) + "|")
    for i, (mode, bs, qd) in enumerate(ROWS):
        mb = bs == "1m"
        med = {s: median(res[(s, i)], "mibps" if mb else "iops") for s in SETUPS}
        cells = [f"{med[s]:,.1f}" if mb else f"{med[s]:,.0f}" for s in SETUPS]
        ratios = [ratio(med["vdm"], med["vdm-before"]), ratio(med["vdm"], med["qsd"]),
                  ratio(med["vdm-before"], med["qsd"])]  # fmt: skip
        lats = [f"{median(res[(s, i)], 'p50'):,.0f} / {median(res[(s, i)], 'p99'):,.0f}" for s in SETUPS]
        unit = "MiB/s" if mb else "IOPS"
        print(f"| {mode} {bs} qd{qd} ({unit}) | " + " | ".join(cells + ratios + lats) + " |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
