"""The KVM lab: an L2 guest under QEMU TCG (-cpu max) with kvm_amd, running host code over 9p."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import vdm_lab
from vdm_lab.pytest_support import LAB_GUEST_RERUN

pytestmark = [pytest.mark.realguest, pytest.mark.kvmlab, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]

PROBE = r"""
set -e
echo "kvm_amd_module=$(test -d /sys/module/kvm_amd && echo yes || echo no)"
echo "kvm_pvm_module=$(test -d /sys/module/kvm_pvm && echo yes || echo no)"
echo scratch >/mnt/probe && echo "scratch=$(cat /mnt/probe)"
python3 - <<'PY'
import fcntl, os, time
t0 = time.monotonic()
import vdm
print("vdm_file=" + vdm.__file__)
print("import_vdm_s=%.2f" % (time.monotonic() - t0))
KVM_GET_API_VERSION, KVM_CREATE_VM, KVM_CHECK_EXTENSION, KVM_CAP_IRQFD = 0xAE00, 0xAE01, 0xAE03, 32
kvm = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
print("kvm_api=%d" % fcntl.ioctl(kvm, KVM_GET_API_VERSION, 0))
print("kvm_cap_irqfd=%d" % fcntl.ioctl(kvm, KVM_CHECK_EXTENSION, KVM_CAP_IRQFD))
vm = fcntl.ioctl(kvm, KVM_CREATE_VM, 0)
print("kvm_create_vm=%s" % ("ok" if vm >= 0 else "fail"))
PY
"""


def test_kvm_lab_has_kvm_amd_and_runs_host_python(kvm_lab) -> None:
    """L2 boots, its /dev/kvm is kvm_amd (not kvm_pvm), and the host's Python imports vdm."""
    r: vdm_lab.LabResult = kvm_lab(PROBE, timeout=600)
    r.assert_ok()
    assert r.init is not None, r.describe()
    assert r.init["kvm_amd"] == "yes" and r.init["devkvm"] == "yes", r.describe()
    assert int(r.init["svm"]) >= 1, r.describe()
    values = vdm_lab.parse_keyvalues(r.output)
    assert values.get("kvm_amd_module") == "yes" and values.get("kvm_pvm_module") == "no", r.describe()
    assert values.get("scratch") == "scratch", r.describe()
    assert values.get("vdm_file") == str(REPO / "core" / "src" / "vdm" / "__init__.py"), r.describe()
    assert values.get("kvm_api") == "12", r.describe()
    assert int(values.get("kvm_cap_irqfd", "0")) > 0, r.describe()
    assert values.get("kvm_create_vm") == "ok", r.describe()


L3_SCRIPT = """#!/usr/bin/env python3
import hashlib, json
import vdm_lab
img = "/mnt/l3.img"
with open(img, "wb") as f:
    f.truncate(16 << 20)
r = vdm_lab.run_qemu(vdm_lab.virtio_blk_args(img, cache="writeback"), ["smp", "blk"], {"mib": 2},
                     timeout=240, accel="kvm")
with open(img, "rb") as f:
    host_md5 = hashlib.md5(f.read(2 << 20)).hexdigest()
print("L3JSON " + json.dumps({"rc": r.returncode, "wall_s": r.elapsed_s, "init": r.init, "host_md5": host_md5,
                              "results": {x.name: dict(x.values, status=x.status) for x in r.results},
                              "command": r.command, "log_tail": r.log[-3000:]}))
"""


@LAB_GUEST_RERUN  # QEMU's own guest: when it dies in the nested lab, the lab is at fault
def test_kvm_lab_l3_peer_baseline_qemu_kvm_boots_the_kit(kvm_lab) -> None:
    """QEMU -accel kvm inside the lab boots the kit at L3 (the peer baseline for vdm's KVM VMM)."""
    r: vdm_lab.LabResult = kvm_lab(L3_SCRIPT % {"repo": str(REPO)}, timeout=600)
    r.assert_ok()
    lines = [ln for ln in r.output.splitlines() if ln.startswith("L3JSON ")]
    assert lines, r.describe()
    l3 = json.loads(lines[-1][len("L3JSON ") :])
    detail = json.dumps(l3, indent=1)
    assert "kvm" in l3["command"], detail
    assert l3["rc"] == 0 and l3["init"] is not None, detail
    assert l3["results"]["smp"]["status"] == "ok", detail
    blk = l3["results"]["blk"]
    assert blk["status"] == "ok" and blk["readback"] == "match", detail
    assert blk["md5"] == l3["host_md5"], detail
