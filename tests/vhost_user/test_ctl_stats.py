"""`vdm ctl stats` agrees with what a real guest did (issue 16 item 4).

A QEMU TCG guest (the guest kit with fio) on a ``vdm vhost-user --control`` disk runs one fio job
of random 16 KiB reads and writes. The test takes `vdm ctl stats` when the guest says fio is about
to start and again when the guest is done; the difference in requests and bytes must be within 1%
of fio's own report (read and write ``total_ios`` and ``io_bytes``). vdm's bytes include each
request's 16-byte header and status byte, about 0.1% at 16 KiB.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import vdm_lab
from vdm.cli.ctl import request

from tests.realguest.conftest import kit, qemu  # noqa: F401 - the session fixtures
from tests.vhost_user.vdmproc import VdmProcess

pytestmark = [pytest.mark.realguest, pytest.mark.slow]

MIB = 1 << 20

# fio's JSON report: the first two "total_ios" / "io_bytes" are the read and write directions
FIO_WORKLOAD = r"""
waitfor "$P_dev" || { result fail reason=no_dev; return; }
echo "VDMTEST STEP fioctl ready"
sleep 4
o=$(fio --name=c --filename="$P_dev" --rw=randrw --bs=16k --size="${P_fiomib}M" --iodepth=8 \
    --ioengine=libaio --direct=1 --output-format=json 2>&1)
echo "VDMTEST STEP fioctl done"
ios=$(echo "$o" | grep '"total_ios"' | head -2 | tr -dc '0-9\n' | tr '\n' ' ')
bytes=$(echo "$o" | grep '"io_bytes"' | head -2 | tr -dc '0-9\n' | tr '\n' ' ')
set -- $ios $bytes
[ -n "$4" ] || { result fail reason=fio out="$(echo "$o" | tail -3 | tr ' ' _)"; return; }
result ok read_ios=$1 write_ios=$2 read_bytes=$3 write_bytes=$4
"""


def _totals(ctl: str) -> tuple[int, int, int, int]:
    (dev,) = request(ctl, "stats")["devices"]
    (q,) = dev["queues"]
    return q["requests"], q["bytes_read"] + q["bytes_written"], q["errors"], q["completed"]


def test_ctl_stats_match_fio(kit: vdm_lab.GuestKit, tmp_path: Path) -> None:  # noqa: F811
    image = tmp_path / "vda.img"
    with open(image, "wb") as f:
        f.truncate(64 * MIB)
    sock, ctl = tmp_path / "vda.sock", str(tmp_path / "vdm.ctl")
    proc = VdmProcess(str(sock), "--disk", str(image), "--control", ctl)
    before: list[tuple[int, int, int, int]] = []

    def on_line(line: str) -> None:
        if "VDMTEST STEP fioctl ready" in line:
            before.append(_totals(ctl))

    try:
        r = vdm_lab.run_qemu(
            ["-chardev", f"socket,id=vub0,path={sock}", "-device", "vhost-user-blk-pci,chardev=vub0"],
            ["fioctl"],
            {"dev": "/dev/vda", "fiomib": 24},
            timeout=300,
            kit=kit,
            initrd="fio",
            on_line=on_line,
            guest=vdm_lab.GuestSpec(workloads={"fioctl": FIO_WORKLOAD}),
        )
        after = _totals(ctl)
        listing = request(ctl, "list")["devices"]
    finally:
        rc = proc.stop()
    r.assert_ok("fioctl")
    assert rc == 0, proc.output
    assert len(before) == 1, r.describe()
    fio = r["fioctl"]
    fio_ios = int(fio["read_ios"]) + int(fio["write_ios"])
    fio_bytes = int(fio["read_bytes"]) + int(fio["write_bytes"])
    requests = after[0] - before[0][0]
    nbytes = after[1] - before[0][1]
    print(f"fio: {fio_ios} requests, {fio_bytes} bytes; vdm ctl stats: {requests} requests, {nbytes} bytes")
    assert fio_ios >= 24 * MIB // (16 << 10) * 0.99
    assert abs(requests - fio_ios) <= fio_ios * 0.01, (requests, fio_ios)
    assert abs(nbytes - fio_bytes) <= fio_bytes * 0.01, (nbytes, fio_bytes)
    assert after[2] == 0, "no errors"
    assert after[3] == after[0], "every request completed"
    assert [d["id"] for d in listing] == ["blk0"] and listing[0]["type"] == "blk"
