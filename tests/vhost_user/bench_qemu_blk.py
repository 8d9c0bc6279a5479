"""Guest-measured disk figures: vdm vhost-user against QEMU's own virtio-blk, same guest and image.

Run by hand (not collected by pytest): ``python3 tests/vhost_user/bench_qemu_blk.py [--mib 64]``.
The guest kit's ``blk`` workload gives sequential MiB/s (1 MiB O_DIRECT dd), ``blkrand`` (fio,
initrd-fio) 4k random-read IOPS at queue depth 32. QEMU runs under TCG, so absolute numbers are
low; the comparison is what matters.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import vdm_lab

from tests.vhost_user.vdmproc import VdmProcess


def run(kind: str, image: Path, tmp: Path, mib: int, seconds: int, kit: vdm_lab.GuestKit) -> dict[str, str]:
    vdm = None
    if kind == "qemu virtio-blk (cache=none,aio=native)":
        extra = vdm_lab.virtio_blk_args(image, 0, cache="none")
    else:
        opts = str(image) + (",direct" if "direct" in kind else "")
        sock = tmp / "b.sock"
        vdm = VdmProcess(str(sock), "--disk", opts)
        extra = vdm_lab.vhost_user_blk_args(sock)
    try:
        r = vdm_lab.run_qemu(
            extra,
            ["blk", "blkrand"],
            {"mib": mib, "time": seconds},
            timeout=300,
            kit=kit,
            initrd="fio",
            memory_mib=512,
        )
    finally:
        if vdm is not None:
            vdm.stop()
    r.assert_ok("blk", "blkrand")
    return {**r["blk"].values, **r["blkrand"].values}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mib", type=int, default=64)
    ap.add_argument("--time", type=int, default=10)
    a = ap.parse_args()
    kit = vdm_lab.guestkit()
    kinds = ["vdm vhost-user", "vdm vhost-user (direct)", "qemu virtio-blk (cache=none,aio=native)"]
    rows = []
    with tempfile.TemporaryDirectory(dir="/var/tmp") as d:
        tmp = Path(d)
        image = tmp / "bench.img"
        with open(image, "wb") as f:
            f.truncate(256 << 20)
        for kind in kinds:
            v = run(kind, image, tmp, a.mib, a.time, kit)
            rows.append((kind, v["seq_write_MiBps"], v["seq_read_MiBps"], v["randread_4k_qd32_iops"]))
            print(rows[-1], flush=True)
    print("\n| backend | seq write MiB/s | seq read MiB/s | 4k randread qd32 IOPS |\n|---|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
