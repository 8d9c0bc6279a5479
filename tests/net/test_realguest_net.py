"""virtio-net in a real Linux guest: ``vdm run`` in the KVM lab, the guest pings and moves files over TCP.

Inside the lab (a throw-away L2 VM, so no namespace is needed there) a tap with 10.0.2.2/24
is the host side; a Python peer on it sends the guest a file and receives one (busybox ``nc`` in
the guest, the guest kit's ``nettcp both``); MD5s are compared on both ends. The same guest runs twice:
with every offload and mergeable buffers on two queue pairs and two vCPUs (``VIRTIO_NET_F_MQ``, the
control queue after both pairs), and with no offloads and no mergeable buffers on one pair (no
``F_MQ``, the control queue after the first pair). Between them every feature value and both queue
layouts are used; a third run with offloads on one pair (dropped to shorten the suite) proved nothing
the two do not: each pair's rx/tx path is the same code whatever the pair count. Each run is a
guest boot in the nested lab (50-200 s under load).

A run whose guest dies before its /init started (no ``VDMTEST INIT``) is booted again, up to
``EARLY_RETRIES`` times, as ``tests/kvm/labboot.py --retries`` does: the nested lab's guests --
QEMU's as well as vdm's -- now and then triple-fault in early kernel boot (CI of 4 Dec 2026:
``VM exit: reset triple fault`` at ~8 s of guest time, in both attempts of the mq run, before the
virtio-net driver loaded, vdm's counters ``rx 0 packets``; 3 of 26 such boots in a lab loop, at
three different points of the kernel's boot). Each early death is printed; a guest that reached
/init is never booted again, so everything virtio-net does is still checked once.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import vdm_lab
from vdm_lab.pytest_support import LAB_GUEST_RERUN

from tests.realguest.conftest import kit, kvm_lab, qemu  # noqa: F401  (session fixtures)

pytestmark = [pytest.mark.realguest, pytest.mark.kvmlab, pytest.mark.slow, LAB_GUEST_RERUN]

TCP_PEER = Path(__file__).resolve().parent / "tcp_peer.py"

#: (tag, --network options, vCPUs)
RUNS = [
    ("mq", "mode=tap,tapif=vdmtap0,queues=2", 2),
    ("plain", "mode=tap,tapif=vdmtap0,offload=off,mrg_rxbuf=off", 1),
]
MIB = 2
#: Bound of one ``vdm run`` in the lab. Not a speed limit: on a loaded 2-core host the nested guest
#: is slow -- a failed attempt (full suite, 3 Dec) took 165 s from the script's start to the first
#: guest's early-boot MSR write, and the old bound (240 s) sent SIGTERM to the third run while its
#: guest was still probing virtio-pci (kernel at 90 s; vdm's counters "rx 0 packets": the guest never
#: reached the driver, no ring error). A run that hangs is still ended; the runs and the
#: lab's boot fit in the lab's timeout below.
RUN_S = 540
#: boots again of a run whose guest died before /init (module doc)
EARLY_RETRIES = 2
LAB_S = (len(RUNS) + 1) * RUN_S + 180


def lab_script() -> str:
    lines = [
        "set -u",
        "KIT=$VDM_GUESTKIT_DIR",
        "ip tuntap add dev vdmtap0 mode tap vnet_hdr multi_queue || exit 10",
        "ip addr add 10.0.2.2/24 dev vdmtap0 || exit 11",
        "ip link set vdmtap0 up || exit 12",
    ]
    for tag, net, cpus in RUNS:
        params = (f"vdmtest=net,nettcp vdmtest.tcp=both vdmtest.tcpmib={MIB} vdmtest.tcptimeout=300 "
                  "vdmtest.exit=poweroff")
        lines += [
            f"echo 'RUN {tag}'; T0=$(date +%s)",
            f"python3 {TCP_PEER} 10.0.2.2 5555 {MIB << 20} --tag {tag} --timeout {RUN_S + 60} & PEER=$!",
            "sleep 1",
            f"for A in $(seq 1 {EARLY_RETRIES + 1}); do",
            f"  ( timeout {RUN_S} vdm -v run -k $KIT/vmlinuz -i $KIT/initrd.cpio.gz -m 256 -c {cpus} "
            f"--console-backend stdio --network {net} -p '{params}' </dev/null 2>&1; rc=$?; "
            "echo; echo \"vdm-rc=$rc\" ) > $TMPDIR/run.out",
            # died before /init (and did not time out): its last lines, then boot it again
            f"  if [ $A -le {EARLY_RETRIES} ] && ! grep -q 'VDMTEST INIT' $TMPDIR/run.out "
            "&& ! grep -q '^vdm-rc=124' $TMPDIR/run.out; then",
            f"    tail -n 12 $TMPDIR/run.out | sed \"s/^/{tag} early death $A: /\"; continue",
            "  fi",
            f"  sed 's/^/{tag}: /' $TMPDIR/run.out; break",
            "done",
            f"echo \"RUNEND {tag} seconds=$(( $(date +%s) - T0 ))\"",
            "kill $PEER 2>/dev/null; wait $PEER 2>/dev/null",
        ]
    return "\n".join([*lines, "exit 0"]) + "\n"


def run_output(out: str, tag: str, lines: int = 120) -> str:
    """The last ``lines`` lines one run printed (its own, not the run after it that describe() ends with)."""
    starts = (f"{tag}: ", f"{tag} early death ", f"PEER {tag} ", f"RUN {tag}", f"RUNEND {tag} ")
    mine = [ln for ln in out.splitlines() if ln.startswith(starts)]
    return f"--- last {lines} lines of run {tag} ---\n" + "\n".join(mine[-lines:])


def test_linux_guest_pings_and_transfers_files_over_virtio_net(kvm_lab):  # noqa: F811
    r: vdm_lab.LabResult = kvm_lab(lab_script(), timeout=LAB_S)
    r.assert_ok()
    out = r.output
    # Linux's virtio_ring reports a broken ring as "<queue>:<what>" (e.g. "output.0:id 7 is not a
    # head!", issue 7) and stops using the queue
    bad_ring = re.findall(r"^.*\b(?:input|output)\.\d+:.*$", out, re.M)
    assert not bad_ring, f"the guest found the rings broken: {bad_ring}"
    for tag, _, _ in RUNS:
        results = {
            m.group(1): (m.group(2), vdm_lab.parse_keyvalues(m.group(3)))
            for m in re.finditer(rf"^{tag}: VDMTEST RESULT (\S+) (ok|fail|skip)\b(.*)$", out, re.M)
        }
        rc = re.search(rf"^{tag}: vdm-rc=(\d+)", out, re.M)
        took = re.search(rf"^RUNEND {tag} seconds=(\d+)", out, re.M)
        print(f"{tag}: vdm run exited {rc and rc.group(1)} after {took and took.group(1)} s")
        for n, why in re.findall(rf"^{tag} early death (\d+): (.*VM exit.*)$", out, re.M):
            print(f"{tag}: attempt {n} died before the guest's /init and was booted again: {why}")
        assert not (rc and rc.group(1) == "124"), f"{tag}: vdm run still ran after {RUN_S} s\n{r.describe()}"
        missing = f"{tag}: results missing\n{run_output(out, tag)}\n{r.describe()}"
        assert set(results) == {"net", "nettcp"}, missing
        status, net = results["net"]
        assert status == "ok" and net["rx"] == "5/5", f"{tag}: ping failed: {net}\n{r.describe()}"
        status, tcp = results["nettcp"]
        assert status == "ok", f"{tag}: nettcp failed: {tcp}\n{r.describe()}"
        sent = re.search(rf"^PEER {tag} listening sent_md5=(\w+)", out, re.M)
        got = re.search(rf"^PEER {tag} recv_bytes=(\d+) recv_md5=(\w+)", out, re.M)
        assert sent and got, f"{tag}: the peer did not finish\n{r.describe()}"
        assert tcp["rx_bytes"] == str(MIB << 20) and tcp["rx_md5"] == sent.group(1), f"{tag}: guest received"
        assert got.group(1) == str(MIB << 20) and got.group(2) == tcp["tx_md5"], f"{tag}: guest sent"
        summary = re.search(rf"^{tag}: .*virtio-net: (vdmtap0: rx .*)$", out, re.M)
        assert summary, f"{tag}: no counters logged at exit\n{r.describe()}"
        rate = f"tcp {tcp.get('rx_MiBps')} MiB/s in, {tcp.get('tx_MiBps')} MiB/s out"
        print(f"{tag}: {summary.group(1)}; {rate}")
        assert "dropped rx 0 tx 0" in summary.group(1), summary.group(1)
    assert re.search(r"^mq: .*driver uses 2 of 2 queue pairs", out, re.M), "the 2-vCPU guest kept one pair"
