"""vdm-balloon with a real Linux guest under ``vdm run`` in the KVM lab.

``vdm run -m 256 --balloon target_mib=64,deflate_on_oom=off``: the guest's virtio_balloon driver
binds the device, reads the 64 MiB target from its configuration space and inflates towards it;
without DEFLATE_ON_OOM Linux takes the pages it gives out of MemTotal, so the guest's own
/proc/meminfo shows the balloon. (The target set later, through ``vdm ctl``, is not there yet.)
"""

from __future__ import annotations

import pytest
import vdm_lab
from vdm_lab.pytest_support import LAB_GUEST_RERUN

pytestmark = [pytest.mark.kvmlab, pytest.mark.realguest, pytest.mark.slow]

WORKLOAD = r"""
mt() { awk '/MemTotal/ {print $2}' /proc/meminfo; }
i=0; m=$(mt)
while [ "$i" -lt 120 ] && [ "$m" -gt "$P_below" ]; do sleep 0.5; i=$((i+1)); m=$(mt); done
bound=$(ls /sys/bus/virtio/drivers/virtio_balloon 2>/dev/null | grep -c '^virtio')
result ok memtotal_kb=$m bound=$bound
"""


@LAB_GUEST_RERUN  # a lab guest now and then dies in early boot, before any device work
def test_guest_inflates_to_the_target_and_memtotal_follows(kit: vdm_lab.GuestKit) -> None:
    spec = vdm_lab.GuestSpec(modules=["virtio_balloon"], workloads={"balloon": WORKLOAD})
    below = (256 - 64) * 1024  # KiB: less than the RAM minus the balloon
    r = vdm_lab.run_vdm(["--balloon", "target_mib=64,deflate_on_oom=off"], ["boot", "balloon"],
                        {"below": below}, kit=kit, guest=spec, memory_mib=256, where="kvmlab", timeout=900)
    r.assert_ok("boot", "balloon")
    res = r["balloon"]
    print(f"\nballoon: {res.line}")  # the guest's MemTotal with the balloon inflated
    assert res["bound"] == "1", r.describe()
    assert int(res["memtotal_kb"]) <= below, r.describe()
    assert r.returncode == 0, r.describe()
