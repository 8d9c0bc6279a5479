"""A real Linux guest (QEMU TCG, the guest kit) on ``vdm vhost-user`` disks.

QEMU owns virtio-pci and hands vdm its guest RAM (memfd), rings and eventfds; vdm-blk serves the
requests. The guest writes random data and reads it back (``blk``), builds and checks an ext2
file system (``fs``); the host then checks the image bytes itself. The last test kills vdm with
SIGKILL while the guest writes and starts it again; QEMU reconnects (``reconnect=1``) and hands
the new vdm the inflight region, and the guest must notice nothing.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import threading
from pathlib import Path

import pytest
import vdm_lab

from tests.realguest.conftest import kit, on_frontend, qemu, qemu_frontend  # noqa: F401 - session fixtures
from tests.vhost_user.vdmproc import VdmProcess, wait_allocated

pytestmark = [pytest.mark.realguest, pytest.mark.slow]

MIB = 1 << 20


def _md5_head(path: Path, length: int) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        h.update(f.read(length))
    return h.hexdigest()


def _raw(path: Path, mib: int) -> Path:
    with open(path, "wb") as f:
        f.truncate(mib * MIB)
    return path


def _qcow2(path: Path, mib: int) -> Path:
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), f"{mib}M"], check=True)
    return path


def _chardev_args(sock: Path, index: int, reconnect: bool = False) -> list[str]:
    opt = ",reconnect=1" if reconnect else ""
    return [
        "-chardev", f"socket,id=vub{index},path={sock}{opt}",
        "-device", f"vhost-user-blk-pci,chardev=vub{index}",
    ]  # fmt: skip


def _e2fsck_ok(image: Path) -> None:
    e2fsck = shutil.which("e2fsck") or shutil.which("fsck.ext2")
    if e2fsck is None:
        return
    p = subprocess.run([e2fsck, "-fn", str(image)], capture_output=True, text=True)
    assert p.returncode == 0, p.stdout + p.stderr


def _boot_blk_and_fs(kit: vdm_lab.GuestKit, fe: vdm_lab.QemuFrontend, tmp: Path, vda: Path,  # noqa: F811
                     vdb: Path) -> vdm_lab.GuestResult:
    procs = [
        VdmProcess(str(tmp / "vda.sock"), "--disk", str(vda)),
        VdmProcess(str(tmp / "vdb.sock"), "--disk", str(vdb)),
    ]
    try:
        r = vdm_lab.run_qemu(
            _chardev_args(tmp / "vda.sock", 0) + _chardev_args(tmp / "vdb.sock", 1),
            ["blk", "fs"],
            {"mib": 8, "dev": "/dev/vda", "fsdev": "/dev/vdb", "fsmib": 4, "fsfiles": 16},
            timeout=150,
            kit=kit,
            qemu=fe,
            visible=[tmp],
        )
    finally:
        rcs = [p.stop() for p in procs]
    assert "memory-backend=mem" in " ".join(r.command)  # guest RAM shared with vdm
    r.assert_ok("blk", "fs")
    assert rcs == [0, 0], f"{fe}\n" + "\n".join(p.output for p in procs)
    for p in procs:
        assert p.count("closing the connection") == 0, f"{fe}\n{p.output}"
        assert not Path(p.socket_path).exists(), "SIGTERM removes the socket"
    blk, fs = r["blk"], r["fs"]
    assert blk["readback"] == "match"
    assert fs["fsck_rc"] == "0" and fs["verify_rc"] == "0" and fs["files"] == "17"
    return r


# raw images with QEMU 7.2, qcow2 with QEMU 10.0: the format is vdm's side and the same for either
# frontend, and each QEMU's vhost-user-blk is used once (the other two pairs proved nothing more)
@on_frontend("host")
def test_guest_blk_and_fs_on_raw_images(kit: vdm_lab.GuestKit, qemu_frontend: vdm_lab.QemuFrontend,  # noqa: F811
                                        tmp_path: Path) -> None:
    vda, vdb = _raw(tmp_path / "vda.img", 32), _raw(tmp_path / "vdb.img", 32)
    r = _boot_blk_and_fs(kit, qemu_frontend, tmp_path, vda, vdb)
    assert r["blk"]["md5"] == _md5_head(vda, 8 * MIB), (
        f"{qemu_frontend}: the image does not hold what the guest wrote")
    _e2fsck_ok(vdb)


@on_frontend("debian13")
def test_guest_blk_and_fs_on_qcow2_images(kit: vdm_lab.GuestKit, qemu_frontend: vdm_lab.QemuFrontend,  # noqa: F811
                                          tmp_path: Path) -> None:
    vda, vdb = _qcow2(tmp_path / "vda.qcow2", 32), _qcow2(tmp_path / "vdb.qcow2", 32)
    r = _boot_blk_and_fs(kit, qemu_frontend, tmp_path, vda, vdb)
    for image in (vda, vdb):
        check = subprocess.run(["qemu-img", "check", str(image)], capture_output=True, text=True)
        assert check.returncode == 0, check.stdout + check.stderr
    flat = tmp_path / "vda.raw"
    subprocess.run(["qemu-img", "convert", "-f", "qcow2", "-O", "raw", str(vda), str(flat)], check=True)
    assert r["blk"]["md5"] == _md5_head(flat, 8 * MIB), (
        f"{qemu_frontend}: the qcow2 image does not hold what the guest wrote")
    fsflat = tmp_path / "vdb.raw"
    subprocess.run(["qemu-img", "convert", "-f", "qcow2", "-O", "raw", str(vdb), str(fsflat)], check=True)
    _e2fsck_ok(fsflat)


def test_sigkill_and_restart_during_guest_writes(kit: vdm_lab.GuestKit, qemu_frontend: vdm_lab.QemuFrontend,  # noqa: F811
                                                 tmp_path: Path) -> None:
    fe = qemu_frontend
    mib, kills = 32, 2
    image = _raw(tmp_path / "vda.img", 64)
    sock = tmp_path / "vda.sock"
    procs = [VdmProcess(str(sock), "--disk", str(image))]
    done = threading.Event()
    killed: list[int] = []

    def killer() -> None:
        # kill when the guest's writes have reached 1/3 and 2/3 of the data, start again at once
        for k in range(kills):
            if not wait_allocated(str(image), (k + 1) * mib * MIB // (kills + 1), 120, done):
                return
            procs[-1].kill()
            killed.append(k)
            procs.append(VdmProcess(str(sock), "--disk", str(image)))

    th = threading.Thread(target=killer, daemon=True)
    th.start()
    try:
        r = vdm_lab.run_qemu(
            _chardev_args(sock, 0, reconnect=True), ["blk"], {"mib": mib}, timeout=150, kit=kit,
            qemu=fe, visible=[tmp_path],
        )
    finally:
        done.set()
        th.join(30)
        rc = procs[-1].stop()
    r.assert_ok("blk")
    assert len(killed) == kills, f"{fe}: the guest's writes never reached the kill points"
    assert rc == 0, f"{fe}\n{procs[-1].output}"
    assert r["blk"]["readback"] == "match", f"{fe}: {r['blk'].line}"
    assert r["blk"]["md5"] == _md5_head(image, mib * MIB), f"{fe}: an acknowledged write was lost"
    restarted = procs[1:]
    assert all(p.count("frontend connected") >= 1 for p in restarted), f"{fe}: QEMU did not reconnect"
    resubmitted = sum(p.count("served again") for p in restarted)
    print(f"vhost-user SIGKILL test ({fe.name}): {kills} kills, {resubmitted} restart(s) served in-flight "
          "requests again")
