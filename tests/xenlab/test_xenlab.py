"""The Xen lab: a real Xen domU's own virtio-blk driver on a disk served by ``vdm dm-only``.

Builds (cached in ``$VDM_XENLAB_DIR`` or ``~/.cache/vdm/xenlab``) and boots arm64 Xen 4.17 with
CONFIG_IOREQ_SERVER under QEMU TCG (scripts/xenlab/); dom0 starts ``vdm dm-only`` from xenstore,
``xl create``s a domU whose disk is dom0's /dev/vda (this test's image file), relays the domU's
``VDMTEST`` lines, ``xl destroy``s it and reports vdm's exit status. The host then checks the image.
Set ``VDM_XENLAB=0`` to skip (about 1.5 min with the cache, 4-5 min cold).
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
LAB = REPO / "scripts" / "xenlab"
MIB = 4

pytestmark = pytest.mark.xenlab


def _lab_dir() -> Path:
    return Path(os.environ.get("VDM_XENLAB_DIR", Path.home() / ".cache" / "vdm" / "xenlab"))


def _skip_reason() -> str | None:
    if os.environ.get("VDM_XENLAB", "1") == "0":
        return "VDM_XENLAB=0"
    if shutil.which("apt-get") is None or shutil.which("dpkg") is None:
        return "the Xen lab is built from Debian packages: needs apt-get and dpkg"
    built = all((_lab_dir() / f).is_file() for f in ("xen", "Image", "dom0.cpio"))
    if os.geteuid() != 0 and not (built and shutil.which("qemu-system-aarch64")):
        return "the first Xen lab build needs root (arm64 packages, deb-src, cross gcc, qemu-system-arm)"
    return None


@pytest.fixture(scope="module")
def lab() -> Path:
    why = _skip_reason()
    if why:
        pytest.skip(why)
    d = _lab_dir()
    r = subprocess.run([str(LAB / "build.sh"), str(d)], capture_output=True, text=True, timeout=1500)
    if r.returncode != 0:
        pytest.fail(f"xenlab build failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
    return d


def test_real_xen_domu_reads_and_writes_a_disk_served_by_vdm_dm_only(lab: Path, tmp_path: Path) -> None:
    img = tmp_path / "disk.img"
    with open(img, "wb") as f:
        f.truncate(64 << 20)
    env = dict(os.environ, XENLAB_DIR=str(lab))
    r = subprocess.run(
        [str(LAB / "run.sh"), str(img), f"xenlab.mib={MIB}", "xenlab.timeout=150"],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    out = r.stdout + r.stderr
    lines = [ln.strip() for ln in out.splitlines() if ln.startswith("XENLAB ")]
    report = "\n".join(lines[-60:])
    assert "XENLAB END done" in out, f"the lab did not finish:\n{report}\n{out[-2000:]}"
    results = dict(re.findall(r"XENLAB DOMU VDMTEST RESULT (\S+) (.*)", out))
    assert results.get("boot", "").startswith("ok"), report
    blk = results.get("blk", "")
    assert blk.startswith("ok"), f"domU blk workload: {blk!r}\n{report}"
    kv = dict(re.findall(r"(\w+)=(\S+)", blk))
    assert kv["readback"] == "match" and kv["dev"] == "/dev/vda"
    # the host reads what the domU wrote through vdm: same bytes at offset 0
    with open(img, "rb") as f:
        assert hashlib.md5(f.read(MIB << 20)).hexdigest() == kv["md5"]
    # vdm served the device from xenstore and exited cleanly after `xl destroy`
    assert re.search(r"XENLAB VDM .*ioreq server \d+, 1 vCPU", out), report
    assert re.search(r"XENLAB VDM .*virtio-blk at 0x2000000, irq 33", out), report
    assert "XENLAB VDM-EXIT rc=0" in out, report
    assert "XENLAB DOMU-DESTROYED" in out
