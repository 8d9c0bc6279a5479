"""``vdm run --user nobody`` in the KVM lab: the guest boots and uses its disk while vdm runs as
nobody, no supplementary groups, NoNewPrivs -- read from /proc/PID/status during the boot. The
image is root-only (0600), so the guest's I/O proves it was opened before the change.
"""

from __future__ import annotations

import re
import shlex

import pytest
import vdm_lab
from vdm_lab.pytest_support import LAB_GUEST_RERUN

pytestmark = [pytest.mark.kvmlab, pytest.mark.realguest, pytest.mark.slow, LAB_GUEST_RERUN]


def test_vdm_run_as_nobody_in_the_kvm_lab(kit: vdm_lab.GuestKit, kvm_lab) -> None:
    k = shlex.quote(str(kit.dir))
    script = f"""
img=/mnt/tmp/root-only.img
truncate -s 64M $img && chmod 600 $img
vdm -v run --user nobody -k {k}/vmlinuz -i {k}/initrd.cpio.gz -m 256 -d $img --console serial \\
    -p 'quiet vdmtest=boot,blk vdmtest.mib=2 vdmtest.exit=poweroff' >/mnt/tmp/vdm.log 2>&1 &
pid=$!
seen=""
while kill -0 $pid 2>/dev/null; do
    st=$(grep -E '^(Uid|Gid|Groups|NoNewPrivs):' /proc/$pid/status 2>/dev/null | tr '\\t\\n' '  ')
    case "$st" in "Uid: 0"*|"") ;; *) seen="$st" ;; esac
    sleep 0.05
done
wait $pid
echo "=== RC $?"
echo "=== SEEN $seen"
echo "=== NOBODY $(id -u nobody) $(id -g nobody)"
cat /mnt/tmp/vdm.log
"""
    r = kvm_lab(script, timeout=900)
    r.assert_ok()
    out = r.output
    rc = re.search(r"=== RC (\d+)", out)
    seen = re.search(r"=== SEEN (.*)", out)
    ids = re.search(r"=== NOBODY (\d+) (\d+)", out)
    assert rc and seen and ids, r.describe()
    uid, gid = ids.groups()
    creds = " ".join(seen.group(1).split())
    assert f"Uid: {uid} {uid} {uid} {uid}" in creds, creds or out[-3000:]
    assert f"Gid: {gid} {gid} {gid} {gid}" in creds and "Groups: NoNewPrivs: 1" in creds, creds
    assert int(rc.group(1)) == 0, out[-3000:]
    _init, results, done = vdm_lab.parse_results(out)
    by = {x.name: x for x in results}
    assert done and by["boot"].ok and by["blk"].ok and by["blk"]["readback"] == "match", out[-3000:]
