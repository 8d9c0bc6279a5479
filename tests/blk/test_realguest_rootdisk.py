"""A real Linux guest (QEMU TCG, the guest kit) whose ROOT filesystem is a networked disk served by vdm.

The test makes an ext4 image holding the kit unpacked, a random marker and a ``rootdisk`` workload
(:mod:`tests.blk.rootdisk`), puts it behind a real server it starts in its tmp directory -- qemu-nbd
for ``nbd+unix:///?socket=...``, a single-node Ceph (:mod:`tests.blk.backends.cephcluster`) for
``rbd:rbd/root:...`` -- and serves it with ``vdm vhost-user --disk NAME``. The guest boots with
``root=/dev/vda rootfstype=ext4``: the kit's /init mounts the disk and switch_roots to the /init on
it, which runs ``rootdisk`` from the disk. The test asserts the guest's / was /dev/vda (ext4), that it
read the marker only the disk holds, and reads the file the guest wrote back from the image with
debugfs after vdm is gone (for RBD: ``rbd export`` first).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import vdm_lab
from vdm_blk.backends import libnbd, librbd
from vdm_lab.pytest_support import LAB_GUEST_RERUN

from tests.blk import rootdisk
from tests.blk.backends.cephcluster import CephCluster, missing
from tests.blk.backends.nbd_servers import qemu_nbd
from tests.realguest.conftest import kit, on_frontend, qemu, qemu_frontend  # noqa: F401 - session fixtures
from tests.vhost_user.vdmproc import VdmProcess

pytestmark = [pytest.mark.realguest, pytest.mark.slow]

MIB = 1 << 20


def _boot_from(sock: Path, guestkit: vdm_lab.GuestKit, frontend: vdm_lab.QemuFrontend,
               tmp_path: Path) -> vdm_lab.GuestResult:
    return vdm_lab.run_qemu(
        ["-chardev", f"socket,id=vub0,path={sock}", "-device", "vhost-user-blk-pci,chardev=vub0"],
        ["boot", "rootdisk"],
        {},
        timeout=240,
        kit=guestkit,
        qemu=frontend,
        visible=[tmp_path],
        append=rootdisk.ROOT_PARAMS,
    )


def _assert_booted_from_the_disk(r: vdm_lab.GuestResult, marker: str, image: Path, tree: Path) -> None:
    # the kit's /init switched to the disk, and the workload ran from there: it exists only on the disk
    assert rootdisk.rootdisk_line(r.log) == "VDMTEST ROOTDISK dev=/dev/vda fs=ext4 init=/init", r.describe()
    r.assert_ok("boot", "rootdisk")
    assert r["rootdisk"]["root"] == "/dev/vda:ext4", r["rootdisk"].line
    assert r["rootdisk"]["marker"] == marker, r["rootdisk"].line
    # what the guest wrote on its root, read from the image on the host
    assert rootdisk.guestmade(image) == f"rootdisk {marker} {rootdisk.host_busybox_md5(tree)}"


@pytest.mark.skipif(libnbd.probe() is not None, reason=f"{libnbd.probe()}: the nbd protocol cannot run here")
@LAB_GUEST_RERUN  # a TCG guest on this loaded machine now and then dies in early boot
@on_frontend("debian13")  # each protocol with one QEMU here, with the other in test_realguest_nbd/rbd
def test_guest_root_on_an_nbd_export(
    kit: vdm_lab.GuestKit,  # noqa: F811
    qemu_frontend: vdm_lab.QemuFrontend,  # noqa: F811
    tmp_path: Path,
) -> None:
    image, marker = rootdisk.make_root_image(kit.dir, tmp_path)
    srv = qemu_nbd(tmp_path, str(image)).start()
    sock = tmp_path / "root.sock"
    vdm = VdmProcess(str(sock), "--disk", srv.uri)
    try:
        r = _boot_from(sock, kit, qemu_frontend, tmp_path)
    finally:
        rc = vdm.stop()
        srv.stop()
    assert rc == 0, vdm.output
    _assert_booted_from_the_disk(r, marker, image, tmp_path / "roottree")
    print(f"\nroot on {srv.uri}: rootdisk result at {r['rootdisk']['uptime_s']} s of guest uptime")


@pytest.mark.skipif(
    librbd.probe() is not None or missing() is not None,
    reason=f"{librbd.probe() or missing()}: no Ceph cluster can run here",
)
@LAB_GUEST_RERUN
@on_frontend("host")
def test_guest_root_on_an_rbd_image(
    kit: vdm_lab.GuestKit,  # noqa: F811
    qemu_frontend: vdm_lab.QemuFrontend,  # noqa: F811
    tmp_path: Path,
) -> None:
    image, marker = rootdisk.make_root_image(kit.dir, tmp_path)
    ceph = CephCluster(tmp_path / "ceph")
    vdm = None
    try:
        ceph.start()
        print(f"\nCeph cluster up in {ceph.startup_seconds:.1f} s")
        ceph.rbd("import", str(image), "rbd/root", timeout=120)
        sock = tmp_path / "root.sock"
        vdm = VdmProcess(str(sock), "--disk", ceph.disk_name("root"))
        r = _boot_from(sock, kit, qemu_frontend, tmp_path)
        rc = vdm.stop()
        vdm_out, vdm = vdm.output, None
        assert rc == 0, vdm_out
        after = tmp_path / "root.after"
        ceph.rbd("export", "rbd/root", str(after), timeout=120)
    finally:
        if vdm is not None:
            vdm.kill()
        ceph.stop()
    _assert_booted_from_the_disk(r, marker, after, tmp_path / "roottree")
    print(f"root on rbd:rbd/root: rootdisk result at {r['rootdisk']['uptime_s']} s of guest uptime")
