"""``--user NAME``: after set-up, ``vdm vhost-user`` and ``vdm run`` really run as that user.

Each test starts vdm as root with ``--user nobody`` and a disk image only root may open (mode
0600), reads the process's credentials from /proc/PID/status while it serves, and checks that
the device still works -- proof that the image was opened before the change and that nothing
after it needs root.
"""

from __future__ import annotations

import os
import pwd
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="dropping to another user needs root")

NOBODY = "nobody"


def _nobody() -> tuple[int, int]:
    try:
        pw = pwd.getpwnam(NOBODY)
    except KeyError:
        pytest.skip("no user 'nobody' here")
    return pw.pw_uid, pw.pw_gid


def _status(pid: int) -> dict[str, str]:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        out[key] = value.strip()
    return out


def _creds(pid: int) -> tuple[list[int], list[int], str, str]:
    st = _status(pid)
    uids = [int(x) for x in st["Uid"].split()]
    return uids, [int(x) for x in st["Gid"].split()], st["Groups"], st["NoNewPrivs"]


def _root_only_image(tmp_path, size: int = 4 << 20) -> str:
    img = tmp_path / "root-only.img"
    with open(img, "wb") as f:
        f.write(os.urandom(4096))
        f.truncate(size)
    os.chmod(img, 0o600)
    return str(img)


def test_vhost_user_serves_as_the_given_user(tmp_path):
    from vdm_blk.device import S_OK, T_IN, T_OUT

    from tests.vhost_user.frontend import Frontend
    from tests.vhost_user.vdmproc import VdmProcess

    uid, gid = _nobody()
    img = _root_only_image(tmp_path)
    sock = str(tmp_path / "vu.sock")
    vdm = VdmProcess(sock, "--user", NOBODY, "--disk", img)
    try:
        uids, gids, groups, nnp = _creds(vdm.proc.pid)
        assert uids == [uid] * 4 and gids == [gid] * 4, (uids, gids)
        assert groups == "" and nnp == "1", (groups, nnp)
        fe = Frontend(sock)
        try:
            fe.start(queues={0: 16})
            data = os.urandom(4096)
            u = fe.request(0, [struct_hdr(T_OUT, 8), data], [1])
            assert u.data[-1] == S_OK
            u = fe.request(0, [struct_hdr(T_IN, 8)], [4096, 1])
            assert u.data[-1] == S_OK and u.data[:4096] == data
        finally:
            fe.close()
            fe.ram.close()
        with open(img, "rb") as f:
            f.seek(8 * 512)
            assert f.read(4096) == data
    finally:
        rc = vdm.stop()
    assert rc == 0, vdm.output
    assert "running as user nobody" in vdm.output, vdm.output


def struct_hdr(rtype: int, sector: int) -> bytes:
    import struct

    return struct.pack("<IIQ", rtype, 0, sector)


def test_vhost_user_unknown_user_is_one_clear_error(tmp_path):
    img = _root_only_image(tmp_path)
    proc = subprocess.run(
        [sys.executable, "-m", "vdm.cli.main", "vhost-user", "--user", "no-such-user-vdm", "-s",
         str(tmp_path / "s.sock"), "--disk", img],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode != 0
    assert "no-such-user-vdm: no such user" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr


def _kit() -> Path:
    import vdm_lab

    d = vdm_lab.kit_dir()
    if not all((d / f).is_file() for f in ("vmlinuz", "initrd.cpio.gz")):
        pytest.skip(f"no guest kit in {d} (tests/realguest builds it)")
    return d


def test_vdm_run_boots_the_guest_as_the_given_user(tmp_path):
    from vdm_kvm.plugin import check

    why = check()
    if why:
        pytest.skip(f"vdm run is unavailable here: {why}")
    uid, gid = _nobody()
    kit = _kit()
    img = _root_only_image(tmp_path, 64 << 20)
    log = tmp_path / "vdm.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "vdm.cli.main", "-v", "run", "--user", NOBODY, "-k", str(kit / "vmlinuz"),
             "-i", str(kit / "initrd.cpio.gz"), "-m", "256", "-d", img, "--console-backend", "null",
             "-p", "quiet vdmtest=boot,blk vdmtest.mib=2 vdmtest.exit=poweroff"],
            stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip
        seen = None
        deadline = time.monotonic() + 300
        try:
            while proc.poll() is None and time.monotonic() < deadline:
                try:
                    creds = _creds(proc.pid)
                except (FileNotFoundError, ProcessLookupError):
                    break
                if creds[0][0] != 0:
                    seen = creds
                time.sleep(0.01)
            rc = proc.wait(max(1, deadline - time.monotonic()))
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    text = log.read_text(errors="replace")
    assert seen is not None, f"never saw vdm run as another user:\n{text[-3000:]}"
    uids, gids, groups, nnp = seen
    assert uids == [uid] * 4 and gids == [gid] * 4 and groups == "" and nnp == "1", seen
    assert rc == 0, text[-3000:]
    assert "running as user nobody" in text
    assert re.search(r"blk.*ok|readback=match", text) or "vdmtest" not in text, text[-3000:]
