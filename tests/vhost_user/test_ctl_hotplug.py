"""`vdm ctl add` / `vdm ctl remove` under ``vdm vhost-user`` (issue 16 item 4: devices at run time).

A running ``vdm vhost-user --control`` serves one disk; ``vdm ctl add -s PATH --disk IMG`` (the
real CLI, options parsed as on vdm's own command line) serves a second disk on a new socket, which
the test frontend reads and writes; ``vdm ctl remove`` closes that frontend's connection, removes
the socket and closes the disk, whose image lock is released (the same image is added again; while
it was served, a second vdm and a second add were refused with the lock's message).
Bad requests change nothing and vdm keeps serving; ``vdm dm-only``/``vdm run`` answer that adding
is not supported there (shown on the ControlServer they build, without a hot-plug handler).
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from vdm.cli.ctl import request
from vdm.control import ControlServer
from vdm.errors import UserError
from vdm_blk.device import S_OK, T_IN, T_OUT

from tests.realguest.conftest import kit, qemu  # noqa: F401 - the session fixtures
from tests.vhost_user.frontend import Frontend
from tests.vhost_user.test_multi_device import hdr, make_image, read0
from tests.vhost_user.vdmproc import VdmProcess

VDM = [sys.executable, "-m", "vdm.cli.main"]


def ctl(control: str, *words: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*VDM, "ctl", "--control", control, *words], capture_output=True, text=True, timeout=60
    )


def ids(control: str) -> list[str]:
    return [d["id"] for d in request(control, "list")["devices"]]


def image_locked(path: str, tmp_path: Path) -> bool:
    """True when a second vdm cannot open the image for writing (the write lock someone holds)."""
    probe = subprocess.Popen([*VDM, "vhost-user", "-s", str(tmp_path / "probe.sock"), "--disk", path],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        _, err = probe.communicate(timeout=30)
    except subprocess.TimeoutExpired:  # it opened the image and serves it: no lock held
        probe.terminate()
        probe.communicate()
        return False
    return probe.returncode != 0 and "lock" in err


@pytest.fixture
def vdm_one_disk(tmp_path: Path):
    a_img = make_image(tmp_path / "a.img", 0x11)
    control = str(tmp_path / "vdm.ctl")
    vdm = VdmProcess(str(tmp_path / "a.sock"), "--disk", a_img, "--control", control)
    yield vdm, control
    assert vdm.stop() == 0, vdm.output


def test_add_serves_a_new_disk_and_remove_releases_it(vdm_one_disk, tmp_path: Path) -> None:
    vdm, control = vdm_one_disk
    b_img, b_sock = make_image(tmp_path / "b.img", 0x22), str(tmp_path / "b.sock")
    r = ctl(control, "add", "-s", b_sock, "--disk", f"{b_img},cache=writeback")
    assert r.returncode == 0, r.stderr + vdm.output
    assert r.stdout.strip() == f"blk1: serving on {b_sock}"
    assert ids(control) == ["blk0", "blk1"]

    fe = Frontend(b_sock)
    fe.start(queues={0: 64})
    assert read0(fe) == b"\x22" * 512
    assert fe.request(0, [hdr(T_OUT, 1), b"\x5a" * 512], [1]).data == bytes([S_OK])
    u = fe.request(0, [hdr(T_IN, 1)], [512, 1])
    assert u.data == b"\x5a" * 512 + bytes([S_OK])
    # taken when the device started; the in-process add of the same image is refused as well
    assert image_locked(b_img, tmp_path), "the added disk holds its image lock"
    r = ctl(control, "add", "-s", str(tmp_path / "c.sock"), "--disk", b_img)
    assert r.returncode == 1 and "lock" in r.stderr, r.stderr

    r = ctl(control, "remove", "blk1")
    assert r.returncode == 0, r.stderr
    assert fe.closed_by_backend(), "the frontend sees its socket close, as when a backend exits"
    fe.close()
    fe.ram.close()
    assert not os.path.exists(b_sock)
    assert ids(control) == ["blk0"]
    with open(b_img, "rb") as f:
        f.seek(512)
        assert f.read(512) == b"\x5a" * 512
    # the first disk served throughout
    a = Frontend(str(tmp_path / "a.sock"))
    a.start(queues={0: 16})
    assert read0(a) == b"\x11" * 512
    a.close()
    a.ram.close()
    # added again (the image opens again: its lock was released), under a new id
    r = ctl(control, "add", "--socket-path", b_sock, "--disk", b_img)
    assert r.returncode == 0, r.stderr
    assert ids(control) == ["blk0", "blk2"]
    assert vdm.alive


@pytest.mark.parametrize(
    "words, message",
    [
        (["-s", "{dir}/c.sock", "--frobnicate", "x"], "unrecognized arguments: --frobnicate"),
        (["-s", "{dir}/c.sock", "--disk", "{dir}/b.img,bogus=1"], "bogus"),
        (["-s", "{dir}/c.sock", "--disk", "{dir}/missing.img"], "missing.img"),
        (["-s", "{dir}/a.sock", "--disk", "{dir}/b.img"], "blk0 is served there already"),
        (["-s", "{dir}/c.sock", "--disk", "{dir}/a.img"], "lock"),
        (["-s", "{dir}/c.sock"], "0 devices given"),
        (["-s", "{dir}/c.sock", "--disk", "{dir}/b.img", "--control", "{dir}/x"], "--control is for"),
        (["-s", "{dir}/nodir/c.sock", "--disk", "{dir}/b.img"], "no such folder"),
    ],
)
def test_a_bad_add_changes_nothing(vdm_one_disk, tmp_path: Path, words: list[str], message: str) -> None:
    vdm, control = vdm_one_disk
    make_image(tmp_path / "b.img", 0x22)
    r = ctl(control, "add", *(w.format(dir=tmp_path) for w in words))
    assert r.returncode == 1 and message in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert ids(control) == ["blk0"]
    assert not os.path.exists(tmp_path / "c.sock")
    assert os.path.exists(tmp_path / "a.sock") and vdm.alive
    fe = Frontend(str(tmp_path / "a.sock"))
    fe.start(queues={0: 16})
    assert read0(fe) == b"\x11" * 512
    fe.close()
    fe.ram.close()


def test_a_socket_another_process_listens_on_is_refused(vdm_one_disk, tmp_path: Path) -> None:
    vdm, control = vdm_one_disk
    other = VdmProcess(str(tmp_path / "o.sock"), "--disk", make_image(tmp_path / "o.img", 0x33))
    try:
        r = ctl(control, "add", "-s", str(tmp_path / "o.sock"), "--disk", make_image(tmp_path / "b.img", 1))
        assert r.returncode == 1 and "another process is listening" in r.stderr, r.stderr
        assert ids(control) == ["blk0"] and vdm.alive
        # the refused add left b.img closed: adding it elsewhere works
        r = ctl(control, "add", "-s", str(tmp_path / "b.sock"), "--disk", str(tmp_path / "b.img"))
        assert r.returncode == 0, r.stderr
    finally:
        assert other.stop() == 0


def test_remove_unknown_device_and_the_original_one(vdm_one_disk, tmp_path: Path) -> None:
    vdm, control = vdm_one_disk
    r = ctl(control, "remove", "blk7")
    assert r.returncode == 1 and "no device 'blk7' (devices: blk0)" in r.stderr, r.stderr
    assert ids(control) == ["blk0"]
    r = ctl(control, "remove", "blk0")  # the command line's own disk can go too
    assert r.returncode == 0, r.stderr
    assert ids(control) == [] and not os.path.exists(tmp_path / "a.sock") and vdm.alive
    r = ctl(control, "add", "-s", str(tmp_path / "a.sock"), "--disk", str(tmp_path / "a.img"))
    assert r.returncode == 0, r.stderr


def test_add_is_not_supported_without_a_hotplug_handler(tmp_path: Path) -> None:
    """vdm run and vdm dm-only build their control socket through DeviceSet.serve_control, which
    gives it no hot-plug handler: add/remove answer that they are not supported there."""
    server = ControlServer(str(tmp_path / "c.ctl"), lambda: []).start()
    try:
        with pytest.raises(UserError, match=r"add: not supported under this command \(only vdm vhost-user"):
            request(server.path, "add", {"argv": ["--disk", "x.img"]})
        with pytest.raises(UserError, match="remove: not supported under this command"):
            request(server.path, "remove", {"device": "blk0"})
        assert server.dropped == 0
    finally:
        server.close()


HOTPLUG_WORKLOAD = r"""
echo "VDMTEST STEP hotplug ready"
i=0; while [ ! -e /dev/vdb ] && [ $i -lt 1800 ]; do sleep 0.1; i=$((i+1)); done
[ -e /dev/vdb ] || { result fail reason=no_vdb; return; }
m=$(dd if=/dev/vdb bs=512 count=1 2>/dev/null | head -c 12)
result ok marker=$m sectors=$(cat /sys/block/vdb/size)
"""


@pytest.mark.realguest
@pytest.mark.slow
def test_qemu_device_add_on_an_added_socket(kit, tmp_path: Path) -> None:  # noqa: F811
    """QEMU 7.2 TCG: once the guest runs, `vdm ctl add` serves a second disk, QMP's chardev-add and
    device_add vhost-user-blk-pci plug it into a PCIe root port, and the guest reads /dev/vdb."""
    import vdm_lab

    a_img = make_image(tmp_path / "a.img", 0x11)
    b_img = tmp_path / "b.img"
    with open(b_img, "wb") as f:
        f.write(b"VDMHOTPLUG42")
        f.truncate(8 << 20)
    control, qmp_path = str(tmp_path / "vdm.ctl"), tmp_path / "qemu.qmp"
    b_sock = str(tmp_path / "b.sock")
    vdm = VdmProcess(str(tmp_path / "a.sock"), "--disk", a_img, "--control", control)
    plugged: list[object] = []

    def plug() -> None:
        try:
            r = ctl(control, "add", "-s", b_sock, "--disk", str(b_img))
            assert r.returncode == 0, r.stderr
            qmp = vdm_lab.Qmp(qmp_path)
            backend = {
                "type": "socket",
                "data": {"addr": {"type": "unix", "data": {"path": b_sock}}, "server": False},
            }
            qmp.execute("chardev-add", id="vub1", backend=backend)
            qmp.execute("device_add", driver="vhost-user-blk-pci", chardev="vub1", bus="rp1", id="hot1")
            qmp.close()
            plugged.append(True)
        except BaseException as e:
            plugged.append(e)

    def on_line(line: str) -> None:
        if "VDMTEST STEP hotplug ready" in line:
            threading.Thread(target=plug, daemon=True).start()

    try:
        r = vdm_lab.run_qemu(
            [*vdm_lab.vhost_user_blk_args(tmp_path / "a.sock"), "-device", "pcie-root-port,id=rp1,chassis=1",
             "-qmp", f"unix:{qmp_path},server=on,wait=off"],
            ["hotplug"], {}, timeout=400, kit=kit, on_line=on_line,
            guest=vdm_lab.GuestSpec(workloads={"hotplug": HOTPLUG_WORKLOAD}),
        )  # fmt: skip
    finally:
        rc = vdm.stop()
    assert plugged == [True], f"{plugged}\n{vdm.output}"
    r.assert_ok("hotplug")
    assert r["hotplug"]["marker"] == "VDMHOTPLUG42" and r["hotplug"]["sectors"] == str(8 << 11), r.describe()
    assert rc == 0, vdm.output
