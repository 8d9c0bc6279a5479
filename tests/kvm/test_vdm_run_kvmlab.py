"""``vdm run`` end to end in the KVM lab: the guest kit boots with 2 vCPUs, a virtio-blk disk over
virtio-mmio (described by our DSDT) and over virtio-pci, and the serial console; the guest writes
random data to the disk, the host checks the image afterwards, vdm exits 0: the mmio guest reboots,
the pci one, done and left at its shell, is stopped with SIGTERM (vdm stops the VM, closes its
devices). Two L3 boots: SIGTERM had a boot of its own until the pci guest took it on.
"""

from __future__ import annotations

import re
import shlex

import pytest
import vdm_lab

pytestmark = [pytest.mark.kvmlab, pytest.mark.realguest, pytest.mark.slow]

MIB = 8


#: the pci guest is not rebooted: once it is done vdm gets SIGTERM, as a user stops a guest that
#: sits at its shell (one L3 boot for both: the reboot's exit is the mmio guest's)
ALIVE = "alive() { [ -r /proc/$1/status ] && ! grep -q '^State:.Z' /proc/$1/status 2>/dev/null; }"


def _sigterm_lines(log: str) -> list[str]:
    """Lines run with vdm in the background as $pid: SIGTERM once the guest is done, rc its exit code."""
    return [
        "  pid=$!; i=0",
        f"  while alive $pid && ! grep -q 'VDMTEST DONE' {log} && [ $i -lt 3000 ]; do",
        "    sleep 0.1; i=$((i+1)); done",
        "  if ! alive $pid; then wait $pid; rc=$?",
        "  else",
        "    kill -TERM $pid; i=0",
        "    while alive $pid && [ $i -lt 600 ]; do sleep 0.1; i=$((i+1)); done",
        "    if alive $pid; then",  # still there 60 s after SIGTERM: say where it waits, then end it
        "      echo '=== vdm still runs 60 s after SIGTERM; its threads (name, kernel wait channel):'",
        '      for t in /proc/$pid/task/*; do echo "  $(cat $t/comm) $(cat $t/wchan)"; done',
        "      kill -USR1 $pid; sleep 2; kill -KILL $pid; wait $pid; rc=hung",
        "    else wait $pid; rc=$?; fi",
        "  fi",
    ]


@pytest.fixture(scope="module")
def lab_run(kit: vdm_lab.GuestKit, kvm_lab) -> vdm_lab.LabResult:
    k = shlex.quote(str(kit.dir))
    lines = ["mkdir -p /mnt/tmp", ALIVE]
    for transport, ending in (("mmio", "reboot"), ("pci", "none")):
        img, log = f"/mnt/tmp/{transport}.img", f"/mnt/tmp/{transport}.log"
        md5 = f"$(dd if={img} bs=1M count={MIB} 2>/dev/null | md5sum | cut -c1-32)"
        run = (f"vdm run -k {k}/vmlinux -i {k}/initrd.cpio.gz -m 256 -c 2 -d {img} "
               f"--console serial --virtio-transport {transport} "
               f"-p 'quiet vdmtest=boot,smp,blk vdmtest.mib={MIB} vdmtest.exit={ending}' "
               f">{log} 2>&1 </dev/null")
        lines += [
            f"truncate -s 64M {img}",
            f"echo '=== BEGIN {transport}'",
            # the nested lab's guests (QEMU's too) now and then die in early boot: one more try
            # when the guest never reached /init, said in the output (the test prints it)
            "for attempt in 1 2; do",
            *([f"  timeout 300 {run}", "  rc=$?"] if ending == "reboot"
              else [f"  {run} &", *_sigterm_lines(log)]),
            f"  if [ $rc = 0 ] || grep -q 'VDMTEST INIT' {log}; then break; fi",
            f'  echo "=== RETRY {transport}: attempt $attempt failed before /init (rc=$rc): '
            f'$(tail -3 {log} | tr "\\n" " ")"',
            "done",
            f"grep -v 'plugin.*failed' {log}",
            f'echo "=== END {transport} rc=$rc"',
            f'echo "=== IMAGE {transport} md5={md5}"',
        ]
    r = kvm_lab("\n".join(lines), timeout=1200)
    r.assert_ok()
    return r


@pytest.mark.parametrize("transport", ["mmio", "pci"])
def test_vdm_run_boots_with_a_disk(lab_run: vdm_lab.LabResult, transport: str) -> None:
    out = lab_run.output
    m = re.search(f"=== BEGIN {transport}\n(.*?)=== END {transport} rc=(\\w+)", out, re.S)
    assert m, lab_run.describe()
    log, rc = m.group(1), m.group(2)
    for retry in re.findall(f"^=== RETRY {transport}: .*$", out, re.M):
        print(f"\nKVM lab: {retry}")
    init, results, done = vdm_lab.parse_results(log)
    assert rc == "0" and done, log[-3000:]
    by = {r.name: r for r in results}
    assert by["boot"].ok and by["smp"].ok and by["smp"]["cpus"] == "2", log[-3000:]
    assert by["blk"].ok and by["blk"]["readback"] == "match", by["blk"].line
    image = re.search(f"=== IMAGE {transport} md5=([0-9a-f]{{32}})", out)
    assert image and image.group(1) == by["blk"]["md5"], "the image does not hold what the guest wrote"
    print(f"\nvdm run, virtio-{transport}, 2 vCPUs: /init at {init['init_uptime_s']} s, "
          f"blk write {by['blk'].get('seq_write_MiBps')} MiB/s, read {by['blk'].get('seq_read_MiBps')} MiB/s")


def test_vdm_run_ends_cleanly_on_sigterm(lab_run: vdm_lab.LabResult) -> None:
    """The pci guest, done and sitting at its shell (vdmtest.exit=none), is stopped with SIGTERM."""
    m = re.search("=== BEGIN pci\n(.*?)=== END pci rc=(\\w+)", lab_run.output, re.S)
    assert m, lab_run.describe()
    assert m.group(2) != "hung", m.group(1)[-6000:]
    log, rc = m.group(1), int(m.group(2))
    assert "VDMTEST RESULT boot ok" in log, log[-3000:]
    assert rc == 0 and "terminating on SIGTERM" in log, log[-3000:]
    assert "Traceback" not in log, log[-3000:]
