#!/usr/bin/env python3
"""vhost-user-blk without a guest: vdm and qemu-storage-daemon driven by the same libblkio client.

The client (``scripts/frontends/blkio_frontend.c`` on libblkio; what runs it is shared with the other
guest-free benchmarks in ``vhost_user_client.py``) costs far less per request than either backend,
so the backend's own per-request cost shows.

Rows: sequential 1 MiB read and write at queue depth 8, 4 KiB random read and write at queue depth
1 and 32 (the rows of table 1 in BENCHMARKS.md). Setups: vdm raw, qsd raw, vdm qcow2, qsd qcow2,
each backend on its own copy of one image (``--mib`` MiB of random data, so reads hit data; the
qcow2 is ``qemu-img convert`` of the raw), page cache on both sides
(``qemu-storage-daemon ... cache.direct=off``, vdm's default). Each backend runs for the whole
benchmark; the rows are interleaved (for every run, for every row, every setup, the setups' order
rotating per run). Figures: median over ``--runs`` of IOPS (MiB/s for 1 MiB rows) and of the
client's p50/p99 latency; ratio vdm/qsd (IOPS: higher is better for vdm; p99: lower is better);
and each backend's CPU time per request (``proc_cost``: all its threads, over the whole client run).

    python3 benchmarks/vhost_user_blk_free.py [--runs 3] [--time 3] [--mib 256] [--formats raw,qcow2]
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from vhost_user_client import (
    Backend,
    arguments,
    client,
    header,
    interleaved,
    make_images,
    median,
    ratio,
    vdm_base,
)

ROWS = [("read", "1m", 8), ("write", "1m", 8), ("randread", "4k", 1), ("randread", "4k", 32),
        ("randwrite", "4k", 1), ("randwrite", "4k", 32)]  # fmt: skip


def vdm_cmd(image: Path, fmt: str, sock: Path) -> list[str]:
    return [*vdm_base(), "vhost-user", "--socket-path", str(sock), "--disk", f"path={image},format={fmt}"]


def qsd_cmd(image: Path, fmt: str, sock: Path) -> list[str]:
    return [
        "qemu-storage-daemon",
        "--blockdev", f"driver=file,node-name=f,filename={image},cache.direct=off",
        "--blockdev", f"driver={fmt},node-name=d,file=f",
        "--export", f"type=vhost-user-blk,id=e,node-name=d,addr.type=unix,addr.path={sock},writable=on",
    ]  # fmt: skip


def main() -> int:
    a = arguments(__doc__, mib=256, more=lambda ap: ap.add_argument("--formats", default="raw,qcow2"))
    formats = a.formats.split(",")
    root, binary = client()
    setups = [f"{who} {fmt}" for fmt in formats for who in ("vdm", "qsd")]
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
            res, loads = interleaved(root, binary, {b.name: b.sock for b in backends}, ROWS, a,
                                     {b.name: b.proc.pid for b in backends})
        finally:
            for b in backends:
                b.stop()
    print(header(root, a, loads))
    print("| row | " + " | ".join(f"{s}" for s in setups) + " | "
          + " | ".join(f"vdm/qsd {fmt}" for fmt in formats) + " | "
          + " | ".join(f"p50/p99 µs {s}" for s in setups) + " | "
          + " | ".join(f"p99 vdm/qsd {fmt}" for fmt in formats) + " | "
          + " | ".join(f"CPU µs/req {s}" for s in setups) + " |")  # fmt: skip
    print("| --- " * (1 + 3 * len(setups) + 2 * len(formats)) + "|")
    for i, (mode, bs, qd) in enumerate(ROWS):
        mb = bs == "1m"
        med = {s: median(res[(s, i)], "mibps" if mb else "iops") for s in setups}
        p50 = {s: median(res[(s, i)], "p50") for s in setups}
        p99 = {s: median(res[(s, i)], "p99") for s in setups}
        cells = [f"{med[s]:,.1f}" if mb else f"{med[s]:,.0f}" for s in setups]
        ratios = [ratio(med[f"vdm {f}"], med[f"qsd {f}"]) for f in formats]
        lats = [f"{p50[s]:,.0f} / {p99[s]:,.0f}" for s in setups]
        lratios = [ratio(p99[f"vdm {f}"], p99[f"qsd {f}"]) for f in formats]
        cpu = [f"{median(res[(s, i)], 'cpu_us'):.1f}" if all("cpu_us" in r for r in res[(s, i)]) else "-"
               for s in setups]  # fmt: skip
        unit = "MiB/s" if mb else "IOPS"
        print(
            f"| {mode} {bs} qd{qd} ({unit}) | " + " | ".join(cells + ratios + lats + lratios + cpu) + " |",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
