#!/usr/bin/env python3
"""vhost-user-blk on a Ceph RBD image, without a guest: vdm and qemu-storage-daemon on the same
single-node Ceph, driven by the same libblkio client (issue 17 item 5).

Like ``benchmarks/vhost_user_blk_nbd.py`` (the client, rows and interleaving of
``vhost_user_blk_free.py``), but each backend reads its own RBD image in one cluster started for
the benchmark (``tests/blk/backends/cephcluster.py``: one mon, one OSD on ``memstore`` by default
or ``--objectstore bluestore`` on a sparse file, cephx, pool size 1). The images are the same
random data, ``rbd import``-ed (qcow2: converted first). vdm opens ``rbd:rbd/IMAGE:conf=...:id=admin``
(librbd through cffi), qsd a ``driver=rbd`` blockdev with the same conf and user; both leave librbd's
cache settings at Ceph's defaults, and put the format on top. Setups are interleaved per run;
figures are medians over ``--runs``; ratio vdm/qsd. qsd's rbd driver is Debian's
``qemu-block-extra``.

    python3 benchmarks/vhost_user_blk_rbd.py [--runs 3] [--time 3] [--mib 128] [--formats raw]
        [--objectstore memstore|bluestore] [--iothreads 4]
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from vhost_user_blk_free import ROWS
from vhost_user_client import (
    Backend,
    arguments,
    client,
    header,
    interleaved,
    make_images,
    qsd_cmd,
    ratio_table,
    vdm_base,
)

from tests.blk.backends.cephcluster import CephCluster, missing


def vdm_cmd(name: str, fmt: str, sock: Path, iothreads: int) -> list[str]:
    disk = f"path={name},format={fmt},iothreads={iothreads}"
    return [*vdm_base(), "vhost-user", "--socket-path", str(sock), "--disk", disk]


def qsd_rbd(ceph: CephCluster, image: str, fmt: str, sock: Path) -> list[str]:
    return qsd_cmd(f"driver=rbd,pool=rbd,image={image},conf={ceph.conf},user=admin", fmt, sock)


def main() -> int:
    def more(ap):
        ap.add_argument("--formats", default="raw")
        ap.add_argument("--objectstore", default="memstore", choices=("memstore", "bluestore"))
        ap.add_argument("--iothreads", type=int, default=4, help="vdm's iothreads (its default: 4)")

    a = arguments(__doc__, mib=128, more=more)
    why = missing()
    if why is not None:
        print(f"cannot run: {why}", file=sys.stderr)
        return 2
    formats = a.formats.split(",")
    root, binary = client()
    setups = [f"{who} {fmt}" for fmt in formats for who in ("vdm", "qsd")]
    procs: list[Backend] = []
    with tempfile.TemporaryDirectory(dir="/var/tmp", prefix="vdm-blkrbd-") as d:
        tmp = Path(d)
        images = make_images(tmp, a.mib, formats)
        store = max(1 << 30, 3 * len(setups) * a.mib << 20)
        ceph = CephCluster(tmp / "ceph", objectstore=a.objectstore, store_bytes=store)
        try:
            ceph.start()
            print(f"# Ceph ({a.objectstore}) up in {ceph.startup_seconds:.1f} s", file=sys.stderr)
            socks = {}
            for s in setups:
                who, fmt = s.split()
                image = f"{who}-{fmt}"
                ceph.rbd("import", str(images[s]), f"rbd/{image}", timeout=300)
                images[s].unlink()
                sock = tmp / f"{who}-{fmt}.sock"
                name = ceph.disk_name(image)
                if who == "vdm":
                    argv = vdm_cmd(name, fmt, sock, a.iothreads)
                else:
                    argv = qsd_rbd(ceph, image, fmt, sock)
                procs.append(Backend(s, argv, sock, tmp / f"{who}-{fmt}.log"))
                socks[s] = sock
            res, loads = interleaved(root, binary, socks, ROWS, a)
        finally:
            for p in reversed(procs):
                p.stop()
            ceph.stop()
    librbd = subprocess.run(
        ["dpkg-query", "-W", "-f", "${Version}", "librbd1"], capture_output=True, text=True
    )
    note = f", librbd {librbd.stdout.strip() or '?'}, one-node Ceph ({a.objectstore} OSD)"
    note += f", vdm iothreads={a.iothreads}"
    print(header(root, a, loads, note))
    ratio_table("row (RBD)", res, formats, ROWS)
    return 0


if __name__ == "__main__":
    if shutil.which("qemu-storage-daemon") is None:
        sys.exit("cannot run: qemu-storage-daemon not found (apt install qemu-system-x86)")
    sys.exit(main())
