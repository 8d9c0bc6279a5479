"""vdm_lab's author API: a GuestSpec's modules, workloads and files reach a real guest (QEMU TCG and
``vdm run`` in the KVM lab), and bad specs are refused before anything boots."""

from __future__ import annotations

import gzip
import sys

import pytest
import vdm_lab
from vdm_lab.pytest_support import LAB_GUEST_RERUN

from tests.realguest.conftest import kit, qemu  # noqa: F401 - the session fixtures

MINE = r"""
n=$(grep -c "^virtio_input " /proc/modules)
[ "$n" = 1 ] && [ "$(cat /etc/vdm-note)" = hello ] && st=ok || st=fail
result $st virtio_input=$n note=$(cat /etc/vdm-note) color=$P_color
"""
SPEC = vdm_lab.GuestSpec(modules=["virtio-input"], workloads={"mine": MINE, "silent": "echo quiet; exit 3"},
                         files={"/etc/vdm-note": "hello\n"})


def test_layer_is_reproducible_and_holds_the_modules_with_their_dependencies(kit):  # noqa: F811
    a = vdm_lab.layer_bytes(kit, SPEC)
    assert a == vdm_lab.layer_bytes(kit, SPEC)
    archive = gzip.decompress(a)
    for name in (b"workloads/mine", b"workloads/silent", b"etc/vdm-note", b"etc/modules.extra",
                 b"lib/modules/virtio_input.ko"):
        assert name + b"\0" in archive, name
    assert archive.rstrip(b"\0").endswith(b"TRAILER!!!")
    # virtio_input needs virtio and virtio_ring, which the kit already loads: not added twice
    assert [n for n, _ in vdm_lab.resolve_modules(kit, ["virtio_input"])] == ["virtio_input"]


@pytest.mark.parametrize("spec, message", [
    (vdm_lab.GuestSpec(modules=["no_such_module"]), "kernel module 'no_such_module' is not in the kit"),
    (vdm_lab.GuestSpec(workloads={"Bad-Name": "result ok"}), "workload name 'Bad-Name'"),
    (vdm_lab.GuestSpec(files={"/etc/../../x": b""}), "must be absolute, below / and without '..'"),
    (vdm_lab.GuestSpec(files={"relative": b""}), "must be absolute"),
])
def test_a_bad_spec_is_refused_with_what_is_wrong(kit, spec, message):  # noqa: F811
    with pytest.raises(vdm_lab.LayerError, match=message.replace("(", r"\(").replace(".", r"\.")):
        vdm_lab.layer_bytes(kit, spec)


@pytest.mark.realguest
def test_an_authors_modules_workloads_and_files_reach_the_guest(kit):  # noqa: F811
    r = vdm_lab.run_qemu([], ["boot", "mine", "silent"], {"color": "blue"}, kit=kit, guest=SPEC, timeout=120)
    r.assert_ok("boot", "mine")
    assert r["mine"].values["virtio_input"] == "1" and r["mine"]["color"] == "blue", r.describe()
    assert "VDMTEST WARN" not in r.log, r.describe()  # every module loaded
    # a workload that ends without calling result is reported, with its exit code
    assert (r["silent"].status, r["silent"]["reason"], r["silent"]["rc"]) == ("fail", "no_result", "3")
    assert r.done


@pytest.mark.realguest
@pytest.mark.kvmlab
@pytest.mark.slow
@LAB_GUEST_RERUN
def test_run_vdm_in_the_kvm_lab_boots_the_kit_with_an_authors_disk_and_workload(kit):  # noqa: F811
    spec = vdm_lab.GuestSpec(workloads={"disk": 'result ok size=$(cat /sys/block/vda/size)'})
    r = vdm_lab.run_vdm(["-d", "/mnt/tmp/d.img"], ["boot", "disk"], kit=kit, guest=spec, where="kvmlab",
                        setup="truncate -s 8M /mnt/tmp/d.img", timeout=900)
    r.assert_ok("boot", "disk")
    assert r["disk"]["size"] == str(8 << 11), r.describe()  # 512-byte sectors
    assert r.returncode == 0 and r.runner == "vdm run in the KVM lab", r.describe()


@pytest.mark.realguest
@pytest.mark.kvmlab
@pytest.mark.slow
@LAB_GUEST_RERUN
def test_qemu_with_kvm_in_the_lab_boots_against_a_backend_started_next_to_it(kit):  # noqa: F811
    """The way to test a QEMU device type that refuses TCG (vdm_lab.NEEDS_KVM): shown with
    vhost-user-blk, which this project has a backend for, and an author's workload."""
    sock = "/mnt/tmp/vu.sock"
    vdm = f"{sys.executable} -m vdm.cli.main vhost-user -s {sock} -d /mnt/tmp/d.img"
    spec = vdm_lab.GuestSpec(workloads={"size": "result ok sectors=$(cat /sys/block/vda/size)"})
    r = vdm_lab.run_qemu_in_kvm_lab(vdm_lab.vhost_user_device_args("vhost-user-blk-pci", sock),
                                    ["size", "blk"], {"mib": 2}, backend=["sh", "-c", f"truncate -s 16M "
                                                                          f"/mnt/tmp/d.img && exec {vdm}"],
                                    wait_for=sock, kit=kit, guest=spec, timeout=900)
    r.assert_ok("size", "blk")
    assert r["size"]["sectors"] == str(16 << 11) and r["blk"]["readback"] == "match", r.describe()
    assert r.returncode == 0 and "serving" in r.log, r.describe()  # QEMU ended, vdm's log came back
