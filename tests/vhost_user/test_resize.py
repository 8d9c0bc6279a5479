"""`vdm ctl resize` (issue 16 item 3): a disk grows while the guest runs and the guest sees it.

Guest-free: a vdm-blk disk on the virtio-mmio transport of vdm.testing, resized through a real
control socket: the capacity in its config space changes, the config-change interrupt is raised,
the image file grows; a size re-read after ``truncate -s``; what cannot be resized says why.
Real guest (QEMU 7.2 and 10.0 TCG, vhost-user-blk): vdm sends CONFIG_CHANGE_MSG on the backend channel
and the guest's ``/sys/block/vda/size`` changes without a reboot.
"""

from __future__ import annotations

import logging
import os
import socket
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import vdm_lab
from vdm.cli.ctl import request
from vdm.errors import UserError
from vdm.registry import DeviceContext, DeviceType
from vdm.session import DeviceSet
from vdm.testing import VirtioTestDriver
from vdm_blk.config import BlkConfig
from vdm_blk.plugin import create
from vdm_vhost_user import protocol as p
from vdm_vhost_user.protocol import ProtocolFeature, Req

from tests.realguest.conftest import kit, qemu, qemu_frontend  # noqa: F401 - the session fixtures
from tests.vhost_user.vdmproc import VdmProcess

MIB = 1 << 20
BLK = DeviceType(name="blk", config=BlkConfig, create=create)
CONFIG_CHANGED = 2  # virtio-mmio InterruptStatus bit 1


def _image(path: Path, size: int) -> Path:
    with open(path, "wb") as f:
        f.truncate(size)
    return path


def _capacity(drv: VirtioTestDriver) -> int:
    return drv.config_read(0, 8)


def test_resize_raises_the_config_interrupt(tmp_path: Path) -> None:
    image = _image(tmp_path / "a.img", 1 * MIB)
    ctl = str(tmp_path / "vdm.ctl")
    with DeviceSet() as devices:
        dev = devices.create(BLK, BlkConfig(path=str(image)), DeviceContext())
        devices.serve_control(ctl)
        drv = VirtioTestDriver(dev)
        drv.init()
        drv.ack_interrupts()
        assert _capacity(drv) == 2048

        assert request(ctl, "resize", {"device": "blk0", "size": 3 * MIB}) == {
            "device": "blk0",
            "size": 3 * MIB,
        }
        assert _capacity(drv) == 6144
        assert drv.ack_interrupts() & CONFIG_CHANGED
        assert os.path.getsize(image) == 3 * MIB

        os.truncate(image, 5 * MIB)  # grown on the host: re-read its size
        assert request(ctl, "resize", {"device": "blk0", "size": None})["size"] == 5 * MIB
        assert _capacity(drv) == 10240
        assert drv.ack_interrupts() & CONFIG_CHANGED

        with pytest.raises(UserError, match="shrinking would cut off"):
            request(ctl, "resize", {"device": "blk0", "size": 1 * MIB})
        with pytest.raises(UserError, match="not a multiple of 512"):
            request(ctl, "resize", {"device": "blk0", "size": 5 * MIB + 1})
        assert _capacity(drv) == 10240 and not drv.ack_interrupts()
        # the grown disk is usable to its new end
        assert drv.reg_read(0x70) & 0x4  # DRIVER_OK


def test_what_cannot_be_resized_says_why(tmp_path: Path) -> None:
    ro = _image(tmp_path / "ro.img", 1 * MIB)
    qcow = tmp_path / "q.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(qcow), "1M"], check=True)
    ctl = str(tmp_path / "vdm.ctl")
    with DeviceSet() as devices:
        devices.create(BLK, BlkConfig(path=str(ro), ro=True), DeviceContext())
        devices.create(BLK, BlkConfig(path=str(qcow)), DeviceContext())
        devices.serve_control(ctl)
        with pytest.raises(UserError, match="blk0: the disk is read-only"):
            request(ctl, "resize", {"device": "blk0", "size": 2 * MIB})
        with pytest.raises(UserError, match=r"blk1: .*cannot change size while it is served"):
            request(ctl, "resize", {"device": "blk1", "size": 2 * MIB})
        listing = request(ctl, "list")["devices"]
        assert [d.get("resizable") for d in listing] == [True, True]
    assert os.path.getsize(ro) == 1 * MIB


RESIZE_WORKLOAD = r"""
waitfor "$P_dev" || { result fail reason=no_dev; return; }
b=/sys/block/${P_dev#/dev/}/size
old=$(cat $b)
echo "VDMTEST STEP resize ready sectors=$old"
i=0
while [ "$(cat $b)" = "$old" ] && [ $i -lt 600 ]; do sleep 0.1; i=$((i+1)); done
new=$(cat $b)
# the new end is usable: write and read back the last sector
echo resized | dd of="$P_dev" bs=512 seek=$((new - 1)) conv=notrunc,fsync 2>/dev/null
tail=$(dd if="$P_dev" bs=512 skip=$((new - 1)) count=1 iflag=direct 2>/dev/null | head -c 7)
result ok old=$old new=$new tail=$tail
"""


@pytest.mark.realguest
@pytest.mark.slow
def test_guest_sees_the_new_size(
    kit: vdm_lab.GuestKit,  # noqa: F811
    qemu_frontend: vdm_lab.QemuFrontend,  # noqa: F811
    tmp_path: Path,
) -> None:
    image = _image(tmp_path / "vda.img", 16 * MIB)
    sock, ctl = tmp_path / "vda.sock", str(tmp_path / "vdm.ctl")
    proc = VdmProcess(str(sock), "--disk", str(image), "--control", ctl)
    replies: list[object] = []

    def on_line(line: str) -> None:
        if "VDMTEST STEP resize ready" in line:
            replies.append(request(ctl, "resize", {"device": "blk0", "size": 24 * MIB}))

    try:
        r = vdm_lab.run_qemu(
            ["-chardev", f"socket,id=vub0,path={sock}", "-device", "vhost-user-blk-pci,chardev=vub0"],
            ["resize"],
            {"dev": "/dev/vda"},
            timeout=180,
            kit=kit,
            on_line=on_line,
            guest=vdm_lab.GuestSpec(workloads={"resize": RESIZE_WORKLOAD}),
            qemu=qemu_frontend,
            visible=[tmp_path],
        )
    finally:
        rc = proc.stop()
    assert replies == [{"device": "blk0", "size": 24 * MIB}], r.describe()
    r.assert_ok("resize")
    res = r["resize"]
    assert (res["old"], res["new"]) == (str(16 * MIB // 512), str(24 * MIB // 512)), r.describe()
    assert res["tail"] == "resized"
    assert rc == 0, proc.output
    assert proc.count("configuration change sent to the frontend") == 1, proc.output
    with open(image, "rb") as f:
        f.seek(24 * MIB - 512)
        assert f.read(7) == b"resized"


# ---- the backend channel, guest-free (the test frontend of tests/vhost_user/frontend.py) --------

BACKEND_CONFIG = (
    1 << ProtocolFeature.BACKEND_REQ | 1 << ProtocolFeature.CONFIG | 1 << ProtocolFeature.REPLY_ACK
)


def test_config_change_msg_on_the_backend_channel(blk_server, frontends) -> None:
    _server, path, device = blk_server
    fe = frontends(path)
    assert fe.get_protocol_features() & BACKEND_CONFIG == BACKEND_CONFIG
    ours, theirs = socket.socketpair()
    with ours:
        fe.set_protocol_features(BACKEND_CONFIG)
        fe.call(Req.SET_BACKEND_REQ_FD, b"", [theirs.fileno()])
        theirs.close()
        fe.start(protocol=BACKEND_CONFIG)
        before = struct.unpack("<Q", fe.get_config(0, 8))[0]
        assert device.resize(before * 512 + MIB) == before * 512 + MIB
        ours.settimeout(5)
        assert ours.recv(64) == p.HEADER.pack(p.BackendReq.CONFIG_CHANGE_MSG, p.VERSION, 0)
        assert struct.unpack("<Q", fe.get_config(0, 8))[0] == before + MIB // 512
        assert fe.request(0, [struct.pack("<IIQ", 0, 0, before)], [512, 1]).data[-1] == 0, "the new end reads"


def test_a_backend_channel_that_is_no_socket_closes_that_connection(blk_server, frontends, caplog) -> None:
    _server, path, _device = blk_server
    fe = frontends(path)
    fe.set_protocol_features(BACKEND_CONFIG)
    r, w = os.pipe()
    with caplog.at_level(logging.WARNING):
        fe.send(Req.SET_BACKEND_REQ_FD, b"", [r])
        assert fe.closed_by_backend()
    os.close(r)
    os.close(w)
    assert (
        [m for m in caplog.messages if "SET_BACKEND_REQ_FD" in m]
        == [m for m in caplog.messages if "not a socket" in m]
        != []
    )
    fe2 = frontends(path)
    fe2.start()  # the next frontend is served


def test_resize_without_a_backend_channel_is_one_line(blk_server, frontends, caplog) -> None:
    _server, path, device = blk_server
    fe = frontends(path)
    fe.start()
    with caplog.at_level(logging.WARNING):
        device.resize(None)
    assert [m for m in caplog.messages if "configuration changed" in m] == [
        "vhost-user: virtio-blk: configuration changed, but the frontend gave no backend channel "
        "(BACKEND_REQ): the guest sees it after a reset"
    ]
    assert fe.request(0, [struct.pack("<IIQ", 0, 0, 0)], [512, 1]).data[-1] == 0, "still serving"


# ---- vdm run in the KVM lab: the virtio-pci transport's config interrupt ----------------------

RUN_WORKLOAD = r"""
waitfor "$P_dev" || { result fail reason=no_dev; return; }
b=/sys/block/${P_dev#/dev/}/size
old=$(cat $b)
# tell the host we have read the old size: a marker in the first sector, which vdm writes through
echo "READY $old" | dd of="$P_dev" bs=512 count=1 conv=sync,fsync 2>/dev/null
i=0
while [ "$(cat $b)" = "$old" ] && [ $i -lt 1200 ]; do sleep 0.1; i=$((i+1)); done
result ok old=$old new=$(cat $b)
"""


@pytest.mark.realguest
@pytest.mark.kvmlab
@pytest.mark.slow
def test_vdm_run_guest_sees_the_new_size(kit: vdm_lab.GuestKit) -> None:  # noqa: F811
    """vdm run in the KVM lab: the resize, made once the guest has read the old size (a marker it
    writes to the disk), reaches it through the virtio-pci config-change interrupt (MSI-X)."""
    ctl = f"{sys.executable} -m vdm.cli.main ctl --control /mnt/tmp/vdm.ctl"
    resizer = (
        "truncate -s 8M /mnt/tmp/d.img\n"
        "( i=0; while [ $i -lt 1200 ]; do head -c 5 /mnt/tmp/d.img | grep -q READY && break; "
        "sleep 0.5; i=$((i+1)); done; "
        f"{ctl} resize blk0 12M; echo resize-rc=$? ) >/mnt/tmp/resize.out 2>&1 &\n"
    )  # (its lines are shown after vdm exits: printed meanwhile they split the guest's RESULT line)
    r = vdm_lab.run_vdm(
        ["-d", "/mnt/tmp/d.img", "--control", "/mnt/tmp/vdm.ctl"],
        ["resizerun"],
        {"dev": "/dev/vda"},
        kit=kit,
        guest=vdm_lab.GuestSpec(workloads={"resizerun": RUN_WORKLOAD}),
        where="kvmlab",
        setup=resizer,
        after="cat /mnt/tmp/resize.out",
        timeout=900,
    )
    r.assert_ok("resizerun")
    res = r["resizerun"]
    assert (res["old"], res["new"]) == (str(8 << 11), str(12 << 11)), r.describe()
    assert "blk0: 12582912 bytes" in r.log and "resize-rc=0" in r.log, r.describe()
