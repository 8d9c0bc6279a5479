"""The harness itself: result parsing, command lines, the lab wrapper (no guest boots here except
the timeout test, which kills QEMU before the kernel is up)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import vdm_lab

LOG = "\r\n".join(
    [
        "[    0.000000] Linux version 6.1.0",
        "VDMTEST INIT workloads=boot,blk kernel=6.1.0-56-amd64 init_uptime_s=2.81 modules_done_s=3.50",
        "garbage before VDMTEST RESULT boot ok  uptime_s=3.54",
        "VDMTEST RESULT blk fail dev=/dev/vda mib=16 md5=abc readback=mismatch uptime_s=5.22",
        "VDMTEST RESULT net maybe rx=1/5",
        "VDMTEST DONE uptime_s=5.3",
        "[   11.973632] reboot: Restarting system",
    ]
)


def _fake_kit(tmp_path: Path) -> vdm_lab.GuestKit:
    return vdm_lab.GuestKit(
        dir=tmp_path,
        vmlinuz=tmp_path / "vmlinuz",
        vmlinux=tmp_path / "vmlinux",
        initrd=tmp_path / "initrd.cpio.gz",
        initrd_fio=tmp_path / "initrd-fio.cpio",
        lab_initrd=tmp_path / "lab-initrd.cpio.gz",
        info={},
    )


def test_parse_results_reads_init_results_and_done_through_noise() -> None:
    init, results, done = vdm_lab.parse_results(LOG)
    assert init is not None and init["kernel"] == "6.1.0-56-amd64" and init["init_uptime_s"] == "2.81"
    assert [(r.name, r.status) for r in results] == [("boot", "ok"), ("blk", "fail")]
    assert results[1]["md5"] == "abc" and results[1]["readback"] == "mismatch"
    assert results[1].values["uptime_s"] == "5.22"
    assert done


def test_guest_result_assert_ok_names_the_failure_and_shows_the_log() -> None:
    init, results, done = vdm_lab.parse_results(LOG)
    r = vdm_lab.GuestResult(["qemu"], LOG, 0, False, 1.0, init, results, done)
    r.assert_ok("boot")
    with pytest.raises(AssertionError, match="blk: VDMTEST RESULT blk fail") as e:
        r.assert_ok("boot", "blk")
    assert "reboot: Restarting system" in str(e.value)  # the log tail is in the message
    with pytest.raises(AssertionError, match="net: no RESULT line"):
        r.assert_ok("net")
    with pytest.raises(AssertionError):
        r.assert_ok()  # all printed results: blk failed
    with pytest.raises(KeyError, match="no RESULT line for 'fs'"):
        r["fs"]
    empty = vdm_lab.GuestResult(["qemu"], "", None, True, 9.0, None, [], False)
    with pytest.raises(AssertionError, match="timed out"):
        empty.assert_ok()


@pytest.mark.parametrize(
    "params",
    [{"dev": "/dev/vda x"}, {"dev": "a'b"}, {"Bad": "1"}, {"k-e-y": "1"}, {"dev": "$(reboot)"}],
)
def test_kernel_cmdline_rejects_values_that_would_split_or_inject(params: dict[str, str]) -> None:
    with pytest.raises(ValueError):
        vdm_lab.kernel_cmdline(["blk"], params)


def test_kernel_cmdline_format() -> None:
    mmio = "virtio_mmio.device=4K@0xd0000000:5"
    line = vdm_lab.kernel_cmdline(["blk", "fs"], {"mib": 8, "peer": "10.0.2.2:5555"}, mmio)
    assert line.split() == [
        "console=ttyS0", "panic=-1", "quiet", "vdmtest=blk,fs", "vdmtest.mib=8", "vdmtest.peer=10.0.2.2:5555",
        mmio,
    ]
    with pytest.raises(ValueError):
        vdm_lab.kernel_cmdline(["blk;reboot"])


def test_qemu_command_shares_guest_ram_for_vhost_user(tmp_path: Path) -> None:
    kit = _fake_kit(tmp_path)
    cmd = vdm_lab.qemu_command(vdm_lab.vhost_user_blk_args("/s.sock"), ["blk"], kit=kit, memory_mib=384)
    joined = " ".join(cmd)
    assert "memory-backend-memfd,id=mem,size=384M,share=on" in joined
    assert cmd[cmd.index("-M") + 1] == "q35,memory-backend=mem"
    assert cmd[cmd.index("-m") + 1] == "384M"
    assert "socket,id=vub0,path=/s.sock" in cmd and "vhost-user-blk-pci,chardev=vub0" in cmd
    assert cmd[cmd.index("-kernel") + 1] == str(kit.vmlinux)

    net = vdm_lab.qemu_command(vdm_lab.vhost_user_net_args("/n.sock", mac="52:54:00:12:34:56"), kit=kit)
    assert "vhost-user,id=vun0,chardev=vunc0" in net and "memory-backend=mem" in " ".join(net)
    assert "virtio-net-pci,netdev=vun0,mac=52:54:00:12:34:56" in net

    plain = vdm_lab.qemu_command(vdm_lab.virtio_blk_args("/d.img"), kit=kit)
    assert "memory-backend" not in " ".join(plain) and plain[plain.index("-M") + 1] == "q35"
    assert plain[plain.index("-m") + 1] == "256M"

    fio = vdm_lab.qemu_command(["-M", "pc"], initrd="fio", kit=kit)
    assert fio.count("-M") == 1 and fio[fio.index("-M") + 1] == "pc"  # the caller's machine wins
    assert fio[fio.index("-initrd") + 1] == str(kit.initrd_fio) and fio[fio.index("-m") + 1] == "512M"

    kvm = vdm_lab.qemu_command(kit=kit, accel="kvm")
    assert kvm[kvm.index("-accel") + 1] == "kvm" and kvm[kvm.index("-cpu") + 1] == "host"


def test_lab_command_and_out_share(tmp_path: Path) -> None:
    kit = _fake_kit(tmp_path)
    cmd = vdm_lab.lab_command(tmp_path / "run", tmp_path / "out.txt", kit=kit, outdir=tmp_path / "share")
    append = cmd[cmd.index("-append") + 1]
    assert f"vdmlab.cmd={tmp_path / 'run'}" in append.split() and "vdmlab.out=1" in append.split()
    assert f"local,path={tmp_path / 'share'},mount_tag=labout,security_model=none,multidevs=remap" in cmd
    assert any("mount_tag=hostroot" in a and "readonly=on" in a for a in cmd)
    assert cmd[cmd.index("-serial") + 1] == "stdio" and f"file:{tmp_path / 'out.txt'}" in cmd
    with pytest.raises(ValueError):
        vdm_lab.lab_command(tmp_path / "a,b", tmp_path / "o", kit=kit)
    # L2's init runs kvmhold.py with this very interpreter; the HMP monitor is there when asked for
    assert f"vdmlab.py={os.path.realpath(sys.executable)}" in append.split()
    assert "-monitor" not in cmd
    mon = vdm_lab.lab_command(tmp_path / "run", tmp_path / "out.txt", kit=kit, monitor=tmp_path / "m")
    assert mon[mon.index("-monitor") + 1] == f"unix:{tmp_path / 'm'},server=on,wait=off"


def test_parse_lab_console_markers_and_garbage() -> None:
    console = "\r\n".join(
        [
            "[    1.0] kvm: Nested Virtualization enabled",
            "VDMLAB INIT kernel=6.1.0-56-amd64 cpus=2 svm=2 npt=2 kvm_amd=yes devkvm=yes uptime_s=5.13",
            "VDMLAB START uptime_s=5.41",
            "VDMLAB RC=3 uptime_s=18.45",
        ]
    )
    init, start, end, rc = vdm_lab.parse_lab_console(console)
    assert init is not None and init["kvm_amd"] == "yes" and init["devkvm"] == "yes"
    assert (start, end, rc) == (5.41, 18.45, 3)
    nothing = (None, None, None, None)
    assert vdm_lab.parse_lab_console("VDMLAB START uptime_s=x\nVDMLAB RC=zz uptime_s=") == nothing
    assert vdm_lab.parse_lab_console("[ 2.0] Kernel panic") == nothing


@pytest.mark.parametrize("shebang", [False, True])
def test_lab_wrapper_runs_the_script_with_env_cwd_and_exit_code(tmp_path: Path, shebang: bool) -> None:
    """The wrapper the L2 init runs in the chroot works the same on the host."""
    body = 'echo "cwd=$(pwd) tmp=$TMPDIR lab=$VDM_IN_KVM_LAB x=$X"; exit 7\n'
    script = ("#!/bin/sh\n" + body) if shebang else body
    work = tmp_path / "w"
    work.mkdir()
    wrapper = vdm_lab.kvmlab.lab_wrapper(script, work, str(tmp_path), {"X": "it's quoted"})
    p = subprocess.run([str(wrapper)], capture_output=True, text=True, env={"PATH": os.environ["PATH"]})
    assert p.returncode == 7, p.stderr
    assert p.stdout.strip() == f"cwd={tmp_path} tmp=/mnt/tmp lab=1 x=it's quoted"
    with pytest.raises(ValueError):
        vdm_lab.lab_command(wrapper, tmp_path / "bad out", kit=_fake_kit(tmp_path))


@pytest.mark.realguest
def test_run_qemu_kills_the_guest_on_timeout(kit: vdm_lab.GuestKit) -> None:
    r = vdm_lab.run_qemu([], ["boot"], timeout=1.5, kit=kit)
    assert r.timed_out and r.returncode is None
    assert r.elapsed_s < 10
    with pytest.raises(AssertionError, match="timed out"):
        r.assert_ok("boot")


@pytest.mark.skipif(not __import__("shutil").which("cpio"), reason="GNU cpio is not installed")
def test_the_layer_archive_is_a_newc_cpio_that_cpio_unpacks(tmp_path: Path) -> None:
    archive = vdm_lab.layer.cpio_newc({"workloads/mine": (b"result ok\n", 0o755), "etc/x": (b"", 0o644)})
    out = tmp_path / "x"
    out.mkdir()
    proc = subprocess.run(["cpio", "-idm", "--quiet"], input=archive, cwd=out, capture_output=True)
    assert proc.returncode == 0, proc.stderr
    assert (out / "workloads" / "mine").read_bytes() == b"result ok\n"
    assert os.access(out / "workloads" / "mine", os.X_OK) and (out / "etc" / "x").read_bytes() == b""


def test_the_harness_module_is_a_deprecated_alias_and_still_a_command() -> None:
    repo = Path(__file__).resolve().parents[2]
    proc = subprocess.run([sys.executable, "-W", "error::DeprecationWarning", "-c",
                           "import tests.realguest.harness"], cwd=repo, capture_output=True, text=True)
    assert "tests.realguest.harness moved: import vdm_lab" in proc.stderr
    proc = subprocess.run([sys.executable, "tests/realguest/harness.py", "--help"], cwd=repo,
                          capture_output=True, text=True)
    assert proc.returncode == 0 and "usage: vdm-lab" in proc.stdout, proc.stderr
