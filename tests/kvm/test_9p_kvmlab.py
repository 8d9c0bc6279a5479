"""vdm-9p with a real Linux guest: ``vdm run --9p DIR,TAG`` in the KVM lab (QEMU 7.2 has no
vhost-user-9p frontend, so ``vdm run`` is the only way a real guest meets the device here).

The guest kit's ``9p`` workload mounts the share with ``9pnet_virtio`` and does create, write,
read back, rename, hard and symbolic links, chmod, truncate, fsync, a 300-entry readdir, and an
8 MiB file each way: the guest writes ``large`` (the host checks its md5) and reads the host's
``hostbig`` (the guest reports its md5). A second share is read-only (``--9p DIR,TAG,ro``) and
must refuse every change; a host symlink pointing outside the share must not lead there.

The same lab boot then runs kvmtool's sandbox: ``vdm run`` with no disk and ``--9p DIR,/dev/root``,
DIR holding the kit's initramfs unpacked. vdm puts ``root=/dev/root rootfstype=9p ...`` on the
kernel command line, the kit's /init mounts the share and ``switch_root``s to it, and the
workloads run from the host directory: the guest's / is 9p, it reads what the host put there
and writes a file the host then reads.

Sizes: each guest step costs round trips through a nested VM (a create ~0.15-0.3 s, the large files
1-7 MiB/s), so they are as small as still proves the path. 300 entries and 1000 both come back in one
Rreaddir at the mount's msize (256 KiB; ~30 bytes an entry), then one empty Rreaddir ends the listing:
the guest lists everything it made either way (paging at a small count is tests/9p's
test_readdir_of_a_big_directory). 8 MiB is 32 Twrite/Tread of the 256 KiB msize each way, so every
message is a full-size multi-descriptor one, as with 64 MiB (vdm-9p has no size-dependent path).
"""

from __future__ import annotations

import re
import shlex

import pytest
import vdm_lab

pytestmark = [pytest.mark.kvmlab, pytest.mark.realguest, pytest.mark.slow]

MIB = 8
FILES = 300  # the big directory's entries
SANDBOX_FILES = 50  # files the sandbox guest makes in its 9p root


@pytest.fixture(scope="module")
def lab_run(kit: vdm_lab.GuestKit, kvm_lab) -> vdm_lab.LabResult:
    k = shlex.quote(str(kit.dir))
    t = "/mnt/tmp"
    w = f"{t}/share/wl"  # where the guest's workload works
    lines = [
        f"mkdir -p {t}/share {t}/ro {t}/outside",
        f"echo outside-secret >{t}/outside/secret",
        f"ln -s {t}/outside/secret {t}/share/esc",
        f"echo keep >{t}/ro/keep",
        f"dd if=/dev/urandom of={t}/share/hostbig bs=1M count={MIB} 2>/dev/null",
        f'echo "=== HOSTBIG md5=$(md5sum {t}/share/hostbig | cut -c1-32)"',
        "echo '=== BEGIN 9p'",
        # the log streams to the output as it comes (tail -f); a vdm still running after 720 s
        # prints its Python stacks (SIGUSR1) and is killed, so a hang shows where it waits
        "for attempt in 1 2; do",  # as in test_vdm_run_kvmlab: an L3 that dies before /init, once more
        f"  : >{t}/9p.log; tail -f {t}/9p.log & tp=$!",
        f"  vdm run -k {k}/vmlinux -i {k}/initrd.cpio.gz -m 512 -c 1 "
        f"--9p {t}/share,hostshare --9p {t}/ro,roshare,ro --console serial "
        f"-p 'quiet vdmtest=boot,9p vdmtest.9pmib={MIB} vdmtest.9pfiles={FILES} vdmtest.9pro=roshare "
        f"vdmtest.9psecret=outside-secret vdmtest.exit=reboot' >{t}/9p.log 2>&1 </dev/null &",
        "  pid=$!; i=0",
        "  while kill -0 $pid 2>/dev/null && [ $i -lt 7200 ]; do sleep 0.1; i=$((i+1)); done",
        "  if kill -0 $pid 2>/dev/null; then echo '=== vdm stuck: stacks'; kill -USR1 $pid; sleep 5; "
        "kill -KILL $pid; fi",
        "  wait $pid; rc=$?; sleep 1; kill $tp",
        f"  if [ $rc = 0 ] || grep -q 'VDMTEST INIT' {t}/9p.log; then break; fi",
        '  echo "=== RETRY 9p: attempt $attempt failed before /init (rc=$rc)"',
        "done",
        'echo "=== END 9p rc=$rc"',
        f'echo "=== LARGE md5=$(md5sum {w}/large | cut -c1-32) size=$(stat -c %s {w}/large)"',
        f'echo "=== BIGDIR n=$(ls {w}/big | wc -l)"',
        f'echo "=== LINKS $(stat -c %h {w}/b) $(readlink {w}/s) $(stat -c %a {w}/b) $(stat -c %s {w}/b)"',
        f'echo "=== RO $(ls {t}/ro | tr "\\n" " ")$(cat {t}/ro/keep)"',
        f'echo "=== OUTSIDE $(ls {t}/outside | tr "\\n" " ")$(cat {t}/outside/secret)"',
        *_sandbox_lines(k, f"{t}/root"),
    ]
    r = kvm_lab("\n".join(lines), timeout=1500)
    r.assert_ok()
    return r


#: the sandbox guest's workload (in the 9p root): what / is, the host's marker, a file for the host
SANDBOX_WORKLOAD = r"""fs=$(awk '$2 == "/" {s = $1; t = $3} END {print s ":" t}' /proc/mounts)
mkdir -p /made && i=0 && while [ $i -lt NFILES ]; do echo $i >/made/f$i; i=$((i+1)); done
n=$(ls /made | wc -l); rm -r /made
echo "sandbox $(cat /hostmarker) $(md5sum /bin/busybox | cut -c1-32)" >/guestmade && sync
[ "$fs" = /dev/root:9p ] && [ "$n" = NFILES ] && st=ok || st=fail
result $st root=$fs marker=$(cat /hostmarker) files=$n
""".replace("NFILES", str(SANDBOX_FILES))


def _sandbox_lines(k: str, root: str) -> list[str]:
    """The lab script's lines for kvmtool's sandbox: vdm run, no disk, the root a host directory."""
    log = f"{root}.log"
    return [
        f"mkdir -p {root}/workloads && (cd {root} && gzip -dc {k}/initrd.cpio.gz | cpio -idm --quiet)",
        f"echo marker-$$ >{root}/hostmarker",
        f"cat >{root}/workloads/sandbox <<'VDM_EOF'\n{SANDBOX_WORKLOAD}VDM_EOF",
        "echo '=== BEGIN root9p'",
        "for attempt in 1 2; do",
        f"  timeout -k 10 600 vdm run -k {k}/vmlinux -i {k}/initrd.cpio.gz -m 256 -c 1 --9p {root},/dev/root "
        f"--console serial -p 'quiet vdmtest=boot,sandbox vdmtest.exit=reboot' >{log} 2>&1 </dev/null; rc=$?",
        f"  cat {log}",
        f"  if [ $rc = 0 ] || grep -q 'VDMTEST INIT' {log}; then break; fi",
        '  echo "=== RETRY root9p: attempt $attempt failed before /init (rc=$rc)"',
        "done",
        'echo "=== END root9p rc=$rc"',
        f'echo "=== GUESTMADE $(cat {root}/guestmade 2>&1)"',
        f'echo "=== HOSTSIDE marker-$$ $(md5sum {root}/bin/busybox | cut -c1-32)"',
    ]


def _field(out: str, name: str) -> str:
    m = re.search(f"^=== {name} (.*)$", out, re.M)
    assert m, f"no '=== {name}' line"
    return m.group(1).strip()


def test_guest_works_on_the_share(lab_run: vdm_lab.LabResult) -> None:
    out = lab_run.output
    m = re.search("=== BEGIN 9p\n(.*?)=== END 9p rc=(\\d+)", out, re.S)
    assert m, lab_run.describe()
    log, rc = m.group(1), int(m.group(2))
    for retry in re.findall("^=== RETRY 9p: .*$", out, re.M):
        print(f"\nKVM lab: {retry}")
    _, results, done = vdm_lab.parse_results(log)
    assert rc == 0 and done, log[-3000:]
    r = {x.name: x for x in results}["9p"]
    assert r.ok, r.line
    assert "Traceback" not in log, log[-3000:]
    # the guest's file, checked on the host; the host's file, checked in the guest
    large = dict(kv.split("=") for kv in _field(out, "LARGE").split())
    assert large == {"md5": r["large_md5"], "size": str(MIB << 20)}, r.line
    assert _field(out, "HOSTBIG") == f"md5={r['hostbig_md5']}", r.line
    assert _field(out, "BIGDIR") == f"n={FILES}"
    assert _field(out, "LINKS") == "2 b 640 2"  # hard link count, symlink target, chmod, truncate
    assert r["escape"] == "blocked" and r["ro"] == "refused", r.line
    assert _field(out, "RO") == "keep keep"  # nothing was created in the read-only share
    assert _field(out, "OUTSIDE") == "secret outside-secret"
    steps = re.findall(r"VDMTEST STEP 9p (\w+) uptime_s=([\d.]+)", log)
    ends = [*steps[1:], ("end", r["uptime_s"])]
    took = ", ".join(f"{a} {float(t2) - float(t1):.0f} s" for (a, t1), (_, t2) in zip(steps, ends))
    print(
        f"\nvdm run --9p, {MIB} MiB: guest write {r['write_MiBps']} MiB/s, "
        f"read back {r['read_MiBps']} MiB/s, host file {r['hostbig_read_MiBps']} MiB/s; steps: {took}"
    )


def test_vdm_run_boots_a_guest_whose_root_is_a_host_directory(lab_run: vdm_lab.LabResult) -> None:
    """kvmtool's sandbox: ``vdm run --9p DIR,/dev/root`` with no disk; the workloads run from DIR."""
    out = lab_run.output
    m = re.search("=== BEGIN root9p\n(.*?)=== END root9p rc=(\\d+)", out, re.S)
    assert m, lab_run.describe()
    log, rc = m.group(1), int(m.group(2))
    for retry in re.findall("^=== RETRY root9p: .*$", out, re.M):
        print(f"\nKVM lab: {retry}")
    _, results, done = vdm_lab.parse_results(log)
    assert rc == 0 and done, log[-3000:]
    # the kit's /init found root=/dev/root rootfstype=9p, which only vdm run put on the command line
    assert "VDMTEST ROOT9P tag=/dev/root init=/init" in log, log[-3000:]
    r = {x.name: x for x in results}["sandbox"]
    assert r.ok, r.line
    assert r["root"] == "/dev/root:9p" and r["files"] == str(SANDBOX_FILES), r.line
    # the guest read the host's marker and busybox from the root, and the host reads what it wrote
    host_marker, host_md5 = _field(out, "HOSTSIDE").split()
    assert r["marker"] == host_marker, r.line
    assert _field(out, "GUESTMADE") == f"sandbox {host_marker} {host_md5}"
