"""Live migration of a guest with a vdm vhost-user disk between two QEMUs (issue 16 item 2).

Two ``vdm vhost-user`` processes serve one raw or qcow2 image with ``lock=start``; the source QEMU boots
the guest kit, whose ``blkloop`` workload writes fresh random data to the disk and reads it back
in rounds; in the middle the source is told to ``migrate`` to a destination QEMU started with
``-incoming``. QEMU must accept the migration (no "vhost lacks VHOST_F_LOG_ALL" blocker), it must
complete, and the guest must finish its rounds on the destination with zero verify errors; the
image then holds the last round's data, and a qcow2 image is clean for ``qemu-img check`` (the
source allocated the clusters, the destination must have read its metadata again when its device
started, and the source written all of it back when its device stopped). Both QEMUs run under TCG
on this machine.
"""

from __future__ import annotations

import hashlib
import subprocess
import threading
import time
from pathlib import Path

import pytest
import vdm_lab
from vdm_lab.pytest_support import LAB_GUEST_RERUN

from tests.realguest.conftest import _frontend_id, kit, qemu, qemu_frontend  # noqa: F401 - session fixtures
from tests.vhost_user.vdmproc import VdmProcess

pytestmark = [pytest.mark.realguest, pytest.mark.slow]

MIB = 1 << 20
#: the (qemu_frontend, image format) pairs the disk migration runs (see the test)
FRONTEND_FORMATS = (("host", "raw"), ("debian13", "qcow2"))


class _Qemu:
    """One QEMU in the background, its serial output collected line by line."""

    def __init__(self, cmd: list[str]) -> None:
        self.cmd = cmd
        self.lines: list[str] = []
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            self.lines.append(raw.decode("utf-8", "replace").rstrip("\r\n"))

    @property
    def output(self) -> str:
        return "\n".join(self.lines)

    def wait_line(self, text: str, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any(text in line for line in self.lines):
                return True
            if self.proc.poll() is not None:
                time.sleep(0.2)
                return any(text in line for line in self.lines)
            time.sleep(0.1)
        return False

    def stop(self, timeout: float = 10) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._reader.join(5)


def _md5_head(path: Path, length: int, fmt: str = "raw") -> str:
    if fmt != "raw":  # the guest's view of the image, as QEMU reads it
        raw = path.with_suffix(".raw")
        subprocess.run(["qemu-img", "convert", "-f", fmt, "-O", "raw", str(path), str(raw)],
                       check=True, timeout=120)
        path = raw
    with open(path, "rb") as f:
        return hashlib.md5(f.read(length)).hexdigest()


# One rerun: QEMU 7.2's own TCG migration corrupted guest memory in 1 of 3 runs with its built-in
# virtio-blk and no vdm at all (75a4a04), and this session saw one guest oops after migration on
# [qemu7.2] that passed on its rerun; a vdm fault (lost write, missed dirty page) fails both runs,
# and test_dirty_log.py holds the marking itself without QEMU.
#
# Two of the four QEMU x format pairs: each QEMU and each format migrates once. The format is the
# device's side (the destination reads qcow2 metadata again when its device starts, the source
# writes it back when its device stops) and does not depend on the frontend; the QEMU version is
# the frontend's side (dirty log, vring bases, the handover's messages), the same for either format.
# The other two pairs (45 s each under TCG) proved nothing these do not.
@LAB_GUEST_RERUN
@pytest.mark.parametrize(
    ("qemu_frontend", "fmt"),
    [pytest.param(fe, fmt, id=f"{_frontend_id(fe)}-{fmt}") for fe, fmt in FRONTEND_FORMATS],
    indirect=["qemu_frontend"],
)
def test_guest_writes_and_verifies_across_live_migration(kit: vdm_lab.GuestKit,  # noqa: F811
                                                        qemu_frontend: vdm_lab.QemuFrontend,  # noqa: F811
                                                        tmp_path: Path, fmt: str) -> None:
    fe = qemu_frontend
    # the guest's rounds last `seconds`: ~5 s on the source, the migration (1.5-2.1 s measured, 3 Dec,
    # load 5-7), then ~6 rounds of ~2 s on the destination that read back what was written before it
    mib, seconds = 4, 20
    image = tmp_path / f"vda.{fmt}"
    if fmt == "raw":
        with open(image, "wb") as f:
            f.truncate(32 * MIB)
    else:  # empty: the guest's first round allocates every cluster (on the source)
        subprocess.run(["qemu-img", "create", "-q", "-f", fmt, str(image), "32M"], check=True, timeout=60)
    src_sock, dst_sock = tmp_path / "src.sock", tmp_path / "dst.sock"
    mig = tmp_path / "mig.sock"
    vdms = [VdmProcess(str(s), "--disk", f"{image},lock=start") for s in (src_sock, dst_sock)]
    qemus: list[_Qemu] = []
    qmps: list[vdm_lab.Qmp] = []
    try:
        params = {"mib": mib, "time": seconds, "dev": "/dev/vda", "exit": "poweroff"}
        prefix = fe.argv([kit.dir, tmp_path])
        for name, sock, extra in (("src", src_sock, []), ("dst", dst_sock, ["-incoming", f"unix:{mig}"])):
            cmd = vdm_lab.qemu_command(
                [*vdm_lab.vhost_user_blk_args(sock), "-qmp", f"unix:{tmp_path / name}.qmp,server=on,wait=off",
                 *extra],
                ["blkloop"], params, kit=kit, qemu=prefix,
            )
            qemus.append(_Qemu(cmd))
        src, dst = qemus
        qmps = [vdm_lab.Qmp(tmp_path / "src.qmp"), vdm_lab.Qmp(tmp_path / "dst.qmp")]
        assert src.wait_line("VDMTEST STARTED blkloop", 120), f"{fe}: the guest did not start\n{src.output}"
        time.sleep(5)  # a few rounds on the source
        # (uncapped: QEMU 7.2's own TCG migration corrupted guest memory in 1 of 3 runs capped at
        # 16 MiB/s with its built-in virtio-blk and no vdm at all; the dirty log's marking is held
        # by test_dirty_log.py)
        started = time.monotonic()
        qmps[0].execute("migrate", uri=f"unix:{mig}")  # a blocker would be a QmpError here
        status: dict = {}
        while time.monotonic() - started < 120:
            status = qmps[0].execute("query-migrate")  # type: ignore[assignment]
            if status.get("status") in ("completed", "failed", "cancelled"):
                break
            time.sleep(0.5)
        took = time.monotonic() - started
        assert status.get("status") == "completed", f"{fe}: migration {status}\n{src.output}\n{dst.output}"
        qmps[0].execute("quit")
        assert dst.wait_line("VDMTEST DONE", seconds + 120), f"{fe}: the guest did not finish\n{dst.output}"
        dst.proc.wait(30)
    finally:
        for q in qmps:
            try:
                q.close()
            except OSError:
                pass
        for q in qemus:
            q.stop()
        rcs = [v.stop() for v in vdms]
    _, results, _ = vdm_lab.parse_results(dst.output)
    result = {r.name: r for r in results}.get("blkloop")
    assert result is not None, f"{fe}: no result from the guest on the destination\n{dst.output}"
    assert result["errors"] == "0" and result.ok, f"{fe}: {result.line}"
    assert int(result["rounds"]) >= 2
    assert _md5_head(image, mib * MIB, fmt) == result["md5"], f"{fe}: the image does not hold the last round"
    if fmt != "raw":
        check = subprocess.run(["qemu-img", "check", str(image)], capture_output=True, text=True, timeout=120)
        assert check.returncode == 0, f"{fe}: qemu-img check: {check.stdout}{check.stderr}"
    assert rcs == [0, 0], "\n".join(v.output for v in vdms)
    src_vdm, dst_vdm = vdms
    for v in vdms:
        assert v.count("closing the connection") == 0, f"{fe}\n{v.output}"
        assert v.count("device marked broken") == 0, f"{fe}\n{v.output}"
    assert src_vdm.count("dirty logging on") >= 1, f"{fe}: the source never logged\n{src_vdm.output}"
    assert dst_vdm.count("queue 0 starts") >= 1, f"{fe}: the destination never started\n{dst_vdm.output}"
    print(f"vhost-user migration ({fe.name}, {fmt}): completed in {took:.1f} s "
          f"(QEMU: total {status.get('total-time')} ms, downtime {status.get('downtime')} ms); "
          f"guest: {result['rounds']} rounds of {mib} MiB, {result['errors']} verify errors")


def test_guest_keeps_pinging_across_live_migration(kit: vdm_lab.GuestKit,  # noqa: F811
                                                   qemu_frontend: vdm_lab.QemuFrontend,  # noqa: F811
                                                   tmp_path: Path) -> None:
    """virtio-net: source and destination vdm each on a tap, both taps in one bridge with the host
    address; the guest pings the host through the migration. A few packets may be lost (the
    bridge learns the guest's new port from its next packet); the count is printed."""
    from tests.net.netns import NetNs, netns_unavailable
    from tests.vhost_user.test_qemu_net import HOST_IP, vhost_user_net_args

    why = netns_unavailable()
    if why:
        pytest.skip(why)
    fe = qemu_frontend
    # 15 s of pings from eth0 up (20 s until the suite had to get shorter): the migration starts 6 s
    # after the guest's init and completes in ~1 s, so the pings still go on for seconds after it
    # (asserted > 3 s below); passed 4 of 4 on QEMU 7.2 and 10.0 at load 5-7, 0 lost
    count, interval = 150, 0.1
    src_sock, dst_sock, mig = tmp_path / "src.sock", tmp_path / "dst.sock", tmp_path / "mig.sock"
    with NetNs() as ns:
        ns.run(["ip", "link", "add", "br0", "type", "bridge"])
        ns.up("br0", address=f"{HOST_IP}/24")
        for tap in ("vdmtapS", "vdmtapD"):
            ns.create_tap(tap)
            ns.run(["ip", "link", "set", tap, "master", "br0"])
            ns.up(tap)
        vdms = [
            VdmProcess(str(sock), "--network", f"mode=tap,tapif={tap}", wrap=ns.argv([]))
            for sock, tap in ((src_sock, "vdmtapS"), (dst_sock, "vdmtapD"))
        ]
        qemus: list[_Qemu] = []
        qmps: list[vdm_lab.Qmp] = []
        status: dict = {}
        try:
            params = {"count": count, "interval": interval, "ip": HOST_IP, "exit": "poweroff"}
            prefix = fe.argv([kit.dir, tmp_path])
            for name, sock, extra in (("src", src_sock, []), ("dst", dst_sock, ["-incoming", f"unix:{mig}"])):
                cmd = vdm_lab.qemu_command(
                    [*vhost_user_net_args(fe, sock), "-qmp", f"unix:{tmp_path / name}.qmp,server=on,wait=off",
                     *extra],
                    ["net"], params, kit=kit, qemu=prefix,
                )
                qemus.append(_Qemu(cmd))
            src, dst = qemus
            qmps = [vdm_lab.Qmp(tmp_path / "src.qmp"), vdm_lab.Qmp(tmp_path / "dst.qmp")]
            assert src.wait_line("VDMTEST INIT", 120), f"{fe}: the guest did not start\n{src.output}"
            time.sleep(6)  # eth0 up, pings under way on the source
            qmps[0].execute("migrate", uri=f"unix:{mig}")
            started = time.monotonic()
            while time.monotonic() - started < 120:
                status = qmps[0].execute("query-migrate")  # type: ignore[assignment]
                if status.get("status") in ("completed", "failed", "cancelled"):
                    break
                time.sleep(0.5)
            assert status.get("status") == "completed", f"{fe}: {status}\n{src.output}\n{dst.output}"
            qmps[0].execute("quit")
            completed = time.monotonic()
            assert dst.wait_line("VDMTEST DONE", count * interval + 120), f"{fe}: no end\n{dst.output}"
            # the pings (15 s from eth0 up, a few s before migrate) went on well after it completed
            assert time.monotonic() - completed > 3, f"{fe}: the pings ended before the migration did"
        finally:
            for q in qmps:
                try:
                    q.close()
                except OSError:
                    pass
            for q in qemus:
                q.stop()
            rcs = [v.stop() for v in vdms]
    _, results, _ = vdm_lab.parse_results(dst.output)
    result = {r.name: r for r in results}.get("net")
    assert result is not None, f"{fe}: no result from the guest on the destination\n{dst.output}"
    rx = int(result["rx"].split("/")[0])
    lost = count - rx
    assert result.ok and lost <= count // 4, f"{fe}: {result.line}"
    assert rcs == [0, 0], "\n".join(v.output for v in vdms)
    for v in vdms:
        assert v.count("closing the connection") == 0, f"{fe}\n{v.output}"
    assert vdms[0].count("dirty logging on") >= 1, vdms[0].output
    assert vdms[1].count("queue 1 starts") >= 1, f"{fe}: the destination never started\n{vdms[1].output}"
    print(f"vhost-user net migration ({fe.name}): completed (QEMU: total {status.get('total-time')} ms, "
          f"downtime {status.get('downtime')} ms); guest ping: {rx}/{count} answered, {lost} lost")
