"""A real Linux guest (QEMU TCG, the guest kit) on a ``vdm vhost-user`` disk that is an NBD export.

qemu-nbd (started by the test in its tmp directory) exports a qcow2 image byte for byte; vdm opens
``nbd+unix:///?socket=...`` as qcow2 through libnbd. The guest writes random data and reads it
back (the kit's ``blk`` workload); the host then checks the image with ``qemu-img check`` and
compares what the guest wrote with the image's content. While the guest writes, qemu-nbd is killed
and started again: the guest notices nothing (vdm's requests wait and reconnect).
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import threading
import time
from pathlib import Path

import pytest
import vdm_lab
from vdm_blk.backends.libnbd import probe

from tests.blk.backends.nbd_servers import qemu_nbd
from tests.realguest.conftest import kit, on_frontend, qemu, qemu_frontend  # noqa: F401 - session fixtures
from tests.vhost_user.vdmproc import VdmProcess

pytestmark = [
    pytest.mark.realguest,
    pytest.mark.slow,
    pytest.mark.skipif(probe() is not None, reason=f"{probe()}: the nbd protocol cannot run here"),
]

MIB = 1 << 20


def _chardev_args(sock: Path) -> list[str]:
    return ["-chardev", f"socket,id=vub0,path={sock}", "-device", "vhost-user-blk-pci,chardev=vub0"]


# QEMU 7.2 only: the NBD protocol and its reconnect are vdm's side, the same for either frontend;
# QEMU 10.0 meets an NBD disk in test_realguest_rootdisk (and RBD here 10.0, there 7.2)
@on_frontend("host")
def test_guest_blk_on_a_qcow2_nbd_export_survives_a_server_restart(
    kit: vdm_lab.GuestKit,  # noqa: F811
    qemu_frontend: vdm_lab.QemuFrontend,  # noqa: F811
    tmp_path: Path,
) -> None:
    image = tmp_path / "vda.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(image), "32M"], check=True)
    os.truncate(image, 48 * MIB)  # room to allocate in: the export cannot grow
    srv = qemu_nbd(tmp_path, str(image)).start()
    vdm = VdmProcess(str(tmp_path / "vda.sock"), "--disk", f"{srv.uri},reconnect_timeout=60")
    restarted: list[float] = []

    at_start = _allocated(image)

    def restart_when_the_guest_writes() -> None:
        # once the guest's writes reach the image, kill qemu-nbd and start it again 1 s later
        deadline = time.monotonic() + 150
        while time.monotonic() < deadline:
            if _allocated(image) > at_start + 2 * MIB:
                srv.kill()
                time.sleep(1)
                srv.start()
                restarted.append(time.monotonic())
                return
            time.sleep(0.05)

    chaos = threading.Thread(target=restart_when_the_guest_writes, daemon=True)
    chaos.start()
    try:
        r = vdm_lab.run_qemu(
            _chardev_args(tmp_path / "vda.sock"),
            ["blk"],
            {"mib": 8, "dev": "/dev/vda"},
            timeout=180,
            kit=kit,
            qemu=qemu_frontend,
            visible=[tmp_path],
        )
    finally:
        rc = vdm.stop()
        chaos.join(5)
        srv.stop()
    r.assert_ok("blk")
    assert rc == 0, vdm.output
    assert r["blk"]["readback"] == "match"
    assert restarted, "the server was not restarted while the guest wrote"
    assert vdm.count("NBD connection lost") == 1, vdm.output
    check = subprocess.run(["qemu-img", "check", str(image)], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    flat = tmp_path / "vda.raw"
    subprocess.run(["qemu-img", "convert", "-f", "qcow2", "-O", "raw", str(image), str(flat)], check=True)
    with open(flat, "rb") as f:
        written = hashlib.md5(f.read(8 * MIB)).hexdigest()
    assert r["blk"]["md5"] == written, "the image does not hold what the guest wrote"


def _allocated(path: Path) -> int:
    return os.stat(path).st_blocks * 512
