"""vdm_lab.labsession: scripts share one KVM lab boot, each in namespaces of its own with its own result.

A user of the shared lab checks that a script sees nothing another left (taps, processes, files
in /mnt/tmp), that each gets its own output and exit code, and that a script that hangs costs
only its own result: the next one gets a lab booted again.
"""

from __future__ import annotations

import pytest
import vdm_lab
from vdm_lab import labsession
from vdm_lab.kvmlab import retry_stalls

from tests.realguest.conftest import kit, qemu  # noqa: F401 - the session fixtures

pytestmark = [pytest.mark.realguest, pytest.mark.kvmlab, pytest.mark.slow]

LEAVE = """ip tuntap add dev left0 mode tap && ip link show left0 >/dev/null && echo tap-made
sleep 1000 &
echo hello > /mnt/tmp/left-behind
echo "cwd=$(pwd) color=$COLOR"
exit 7
"""
LOOK = """ip link show left0 >/dev/null 2>&1 && echo tap-seen
pgrep -x sleep >/dev/null && echo sleeper-seen
[ -e /mnt/tmp/left-behind ] && echo file-seen
[ -w /mnt/tmp ] && [ -c /dev/kvm ] && echo ready
echo "color=${COLOR-unset}"
"""


@pytest.fixture
def lab(kit):  # noqa: F811
    if not kit.lab_initrd.exists():
        pytest.skip(f"{kit.lab_initrd} is missing")
    shared = labsession.current(kit, 2048, 2, vdm_lab.QEMU)
    own = shared is None  # VDM_LAB_SHARED=0: a shared lab for this test alone
    lab = shared or labsession.SharedLab(kit)
    yield lab
    if own:
        lab.close()


def test_scripts_share_one_boot_and_see_nothing_the_last_one_left(lab):
    first = retry_stalls(lambda: lab.run(LEAVE, 600, env={"COLOR": "blue"}, cwd="/tmp"))
    assert first.returncode == 7, first.describe()
    assert "tap-made" in first.output and "cwd=/tmp color=blue" in first.output, first.describe()
    boots = lab.boots
    second = lab.run(LOOK, 600)
    assert second.returncode == 0, second.describe()
    assert lab.boots == boots and second.shared_job == first.shared_job + 1, "the second script booted a lab"
    assert second.init and second.init["devkvm"] == "yes", second.describe()
    assert "ready" in second.output and "color=unset" in second.output, second.describe()
    for left in ("tap-seen", "sleeper-seen", "file-seen"):
        assert left not in second.output, f"{left}: the second script saw the first's\n{second.output}"
    assert "tap-made" not in second.output and "cwd=" not in second.output  # each its own output
    print(f"first script {first.elapsed_s:.1f} s (boot included if it booted), 2nd {second.elapsed_s:.1f} s")


def test_a_script_that_hangs_times_out_alone_and_the_next_gets_a_new_lab(lab):
    # a script's timeout counts from run(), a boot included: the lab is up first, so the hung script
    # surely started and the timeout is its own (20 s waited instead of 45 in the suite)
    # (an L2 stall is the lab's own failure, not the session's: booted again as run_in_kvm_lab does)
    up = retry_stalls(lambda: lab.run("true\n", 600))
    assert up.returncode == 0, up.describe()
    hung = lab.run("echo started; sleep 1000\n", 20)
    assert hung.timed_out and hung.returncode is None, hung.describe()
    assert "started" in hung.output, hung.describe()
    assert not lab.alive(), "the lab of a timed-out script was kept"
    boots = lab.boots
    after = retry_stalls(lambda: lab.run("echo fine\n", 600))
    assert after.returncode == 0 and after.output.strip() == "fine", after.describe()
    assert lab.boots == boots + 1 + len(after.earlier_stalls)
