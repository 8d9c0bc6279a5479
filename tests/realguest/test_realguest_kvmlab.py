"""The KVM lab: an L2 guest under QEMU TCG (-cpu max) with kvm_amd, running host code over 9p."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.realguest import harness

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
    r: harness.LabResult = kvm_lab(PROBE, timeout=600)
    r.assert_ok()
    assert r.init is not None, r.describe()
    assert r.init["kvm_amd"] == "yes" and r.init["devkvm"] == "yes", r.describe()
    assert int(r.init["svm"]) >= 1, r.describe()
    values = harness.parse_keyvalues(r.output)
    assert values.get("kvm_amd_module") == "yes" and values.get("kvm_pvm_module") == "no", r.describe()
    assert values.get("scratch") == "scratch", r.describe()
    assert values.get("vdm_file") == str(REPO / "core" / "src" / "vdm" / "__init__.py"), r.describe()
    assert values.get("kvm_api") == "12", r.describe()
    assert int(values.get("kvm_cap_irqfd", "0")) > 0, r.describe()
    assert values.get("kvm_create_vm") == "ok", r.describe()
