"""vdm-balloon with a real Linux guest under ``vdm run`` in the KVM lab.

``vdm run -m 256 --balloon target_mib=64,deflate_on_oom=off``: the guest's virtio_balloon driver
binds the device, reads the 64 MiB target from its configuration space and inflates towards it;
without DEFLATE_ON_OOM Linux takes the pages it gives out of MemTotal, so the guest's own
/proc/meminfo shows the balloon.

``vdm run -m 256 --balloon deflate_on_oom=off,reporting=off --control PATH``: once the guest has
touched and freed ~120 MiB (a dd buffer) and the host sees vdm's RSS grow by it, ``vdm ctl balloon
balloon0 64M`` sets the target; the guest's MemTotal follows, and the host reads vdm's VmRSS before
and after (printed: a measurement for BENCHMARKS.md, not asserted; free page reporting is off so
that only the balloon releases pages).
"""

from __future__ import annotations

import sys

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
    # KiB: the RAM minus the balloon minus 32 MiB. The kernel keeps ~45 MiB of 256 for itself (this
    # guest's MemTotal is 210,884 KiB without a balloon, 145,348 with 64 MiB out: the vdm ctl test),
    # so RAM - 64 MiB alone would pass with a balloon of 14 MiB.
    below = (256 - 64 - 32) * 1024
    r = vdm_lab.run_vdm(["--balloon", "target_mib=64,deflate_on_oom=off"], ["boot", "balloon"],
                        {"below": below}, kit=kit, guest=spec, memory_mib=256, where="kvmlab", timeout=900)
    r.assert_ok("boot", "balloon")
    res = r["balloon"]
    print(f"\nballoon: {res.line}")  # the guest's MemTotal with the balloon inflated
    assert res["bound"] == "1", r.describe()
    assert int(res["memtotal_kb"]) <= below, r.describe()
    assert r.returncode == 0, r.describe()


CTL_WORKLOAD = r"""
mt() { awk '/MemTotal/ {print $2}' /proc/meminfo; }
m0=$(mt)
dd if=/dev/zero of=/dev/null bs=120M count=1 2>/dev/null; touched=$?
i=0; m=$m0; want=$((m0 - P_balloon_kb))
while [ "$i" -lt 600 ] && [ "$m" -gt "$want" ]; do sleep 0.5; i=$((i+1)); m=$(mt); done
sleep 10  # the host reads vdm's RSS after the balloon has inflated
result ok memtotal_kb=$m before_kb=$m0 dd=$touched
"""

#: the host side, run in the lab next to vdm: wait for the guest's touch, set the target, read VmRSS
RSS_PROBE = r"""
import os, subprocess, sys, time
from vdm.cli.ctl import request
CTL = "/mnt/tmp/vdm.ctl"
def vdm_pid():
    for p in filter(str.isdigit, os.listdir("/proc")):
        try:
            argv = open(f"/proc/{p}/cmdline", "rb").read().split(b"\0")
        except OSError:
            continue
        if b"vdm.cli.main" in argv and b"run" in argv and b"timeout" not in os.path.basename(argv[0]):
            return int(p)
def rss_kb(pid):
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
def show():
    try:
        return request(CTL, "balloon", {"device": "balloon0"}, timeout=5)
    except Exception:
        return None
end = time.monotonic() + 600
while time.monotonic() < end and not (show() or {}).get("running"):
    time.sleep(0.5)
pid = vdm_pid()
base = rss_kb(pid)
print(f"rss-probe running base_kb={base}", flush=True)
while time.monotonic() < end and rss_kb(pid) < base + 90 * 1024:
    time.sleep(0.5)
time.sleep(2)
before = rss_kb(pid)
print(f"rss-probe touched before_kb={before}", flush=True)
ctl = [sys.executable, "-m", "vdm.cli.main", "ctl", "--control", CTL]
rc = subprocess.run([*ctl, "balloon", "balloon0", "64M"]).returncode
print(f"balloon-rc={rc}", flush=True)
while time.monotonic() < end and (show() or {}).get("actual_bytes", 0) < 64 << 20:
    time.sleep(0.5)
time.sleep(1)
after = rss_kb(pid)
print(f"rss-probe base_kb={base} before_kb={before} after_kb={after} {show()}", flush=True)
"""


@LAB_GUEST_RERUN
def test_vdm_ctl_balloon_sets_the_target_and_memtotal_follows(kit: vdm_lab.GuestKit) -> None:
    spec = vdm_lab.GuestSpec(modules=["virtio_balloon"], workloads={"ctlballoon": CTL_WORKLOAD})
    setup = f"cat > /mnt/tmp/rss.py <<'EOF'\n{RSS_PROBE}\nEOF\n{sys.executable} /mnt/tmp/rss.py &\n"
    r = vdm_lab.run_vdm(["--balloon", "deflate_on_oom=off,reporting=off", "--control", "/mnt/tmp/vdm.ctl"],
                        ["boot", "ctlballoon"], {"balloon_kb": 64 * 1024}, kit=kit, guest=spec,
                        memory_mib=256, where="kvmlab", setup=setup, timeout=900)
    r.assert_ok("boot", "ctlballoon")
    res = r["ctlballoon"]
    probe = [line for line in r.log.splitlines() if "rss-probe" in line]
    print(f"\nballoon via vdm ctl: {res.line}\n{probe}")  # the RSS figure for BENCHMARKS.md
    assert "balloon-rc=0" in r.log, r.describe()
    # without DEFLATE_ON_OOM Linux takes every page it gives out of MemTotal: 64 MiB of it
    assert int(res["before_kb"]) - int(res["memtotal_kb"]) >= 64 * 1024, r.describe()
    assert r.returncode == 0, r.describe()
