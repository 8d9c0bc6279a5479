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


def nbd_server(image: Path, sock: Path, log: Path) -> Backend:
    argv = ["qemu-nbd", "-f", "raw", "-t", "-e", "8", "--cache=writeback", "-k", str(sock), str(image)]
    return Backend(f"qemu-nbd {image.name}", argv, sock, log)


def vdm_cmd(uri: str, fmt: str, sock: Path) -> list[str]:
    return [*vdm_base(), "vhost-user", "--socket-path", str(sock), "--disk", f"path={uri},format={fmt}"]


def qsd_nbd(nbd_sock: Path, fmt: str, sock: Path) -> list[str]:
    return qsd_cmd(f"driver=nbd,server.type=unix,server.path={nbd_sock}", fmt, sock)


def main() -> int:
    a = arguments(__doc__, mib=256, more=lambda ap: ap.add_argument("--formats", default="raw,qcow2"))
    formats = a.formats.split(",")
    root, binary = client()
    setups = [f"{who} {fmt}" for fmt in formats for who in ("vdm", "qsd")]
    procs: list[Backend] = []
    with tempfile.TemporaryDirectory(dir="/var/tmp", prefix="vdm-blknbd-") as d:
        tmp = Path(d)
        images = make_images(tmp, a.mib, formats)
        try:
            socks = {}
            for s in setups:
                who, fmt = s.split()
                nsock = tmp / f"nbd-{who}-{fmt}.sock"
                procs.append(nbd_server(images[s], nsock, tmp / f"nbd-{who}-{fmt}.log"))
                sock = tmp / f"{who}-{fmt}.sock"
                uri = f"nbd+unix:///?socket={nsock}"
                argv = vdm_cmd(uri, fmt, sock) if who == "vdm" else qsd_nbd(nsock, fmt, sock)
                procs.append(Backend(s, argv, sock, tmp / f"{who}-{fmt}.log"))
                socks[s] = sock
            res, loads = interleaved(root, binary, socks, ROWS, a)
        finally:
            for p in reversed(procs):
                p.stop()
    print(header(root, a, loads, ", qemu-nbd per backend"))
    ratio_table("row (NBD)", res, formats, ROWS)
    return 0


if __name__ == "__main__":
    sys.exit(main())
