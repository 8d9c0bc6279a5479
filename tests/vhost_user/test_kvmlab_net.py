"""vhost-user virtio-net with MSI-X: QEMU ``-accel kvm`` in the KVM lab, on ``vdm vhost-user --network``.

Under TCG QEMU 7.2 crashes when a vhost-user virtio-net uses MSI-X (no irqfd, a NULL
``vector_irqfd``; plugins/vhost-user/README.md), so test_qemu_net.py runs with ``vectors=0``. With
KVM the irqfd path exists and MSI-X must work: this boots the guest kit under QEMU ``-accel kvm``
inside the KVM lab (a throw-away L2 VM, its root namespace plays the namespace), with QEMU's
default vectors, twice on one vdm; the guest pings 10.0.2.2 and moves 2 MiB each way over TCP.

QEMU 7.2 only (the host's, which the lab shares read-only over 9p). QEMU 10.0 runs MSI-X under TCG
already (test_qemu_net.py[qemu10.0] has no ``vectors=0``), so the reason for this test is 7.2's;
a QEMU 10 run here would add one more lab boot (measured 270 s for this test on 2 cores) for the
irqfd path alone, and its Debian 13 root would need mount points made for the lab's /mnt/tmp.
"""

from __future__ import annotations

import re
import textwrap
from pathlib import Path

import pytest
import vdm_lab
from vdm_lab.pytest_support import LAB_GUEST_RERUN

from tests.realguest.conftest import kit, kvm_lab, qemu  # noqa: F401  (session fixtures)

pytestmark = [pytest.mark.realguest, pytest.mark.kvmlab, pytest.mark.slow, LAB_GUEST_RERUN]

MIB = 2

SCRIPT = r'''
import hashlib, os, re, subprocess, sys, time
sys.path.insert(0, {repo!r})
from tests.net.tcp_peer import TcpPeer, listen
import vdm_lab
kit = vdm_lab.guestkit()
subprocess.run("ip tuntap add dev vdmtap0 mode tap vnet_hdr && ip addr add 10.0.2.2/24 dev vdmtap0 "
               "&& ip link set vdmtap0 up", shell=True, check=True)
os.makedirs("/mnt/tmp", exist_ok=True)
sock = "/mnt/tmp/net.sock"
vdm = subprocess.Popen([sys.executable, "-m", "vdm.cli.main", "-v", "vhost-user", "--socket-path", sock,
                        "--network", "mode=tap,tapif=vdmtap0"], stdout=subprocess.PIPE,
                       stderr=subprocess.STDOUT, text=True)
for _ in range(150):
    if os.path.exists(sock):
        break
    time.sleep(0.2)
payload = os.urandom({mib} << 20)
print("PEER sent_md5=" + hashlib.md5(payload).hexdigest(), flush=True)

args = ["-chardev", "socket,id=c0,path=" + sock, "-netdev", "vhost-user,id=n0,chardev=c0",
        "-device", "virtio-net-pci,netdev=n0,mac=52:54:00:12:34:56"]
for boot in (1, 2):
    peer = TcpPeer(payload, 200, listen("10.0.2.2", 5555, 200))
    r = vdm_lab.run_qemu(args, ["net", "nettcp"], {{"ip": "10.0.2.2", "peer": "10.0.2.2:5555", "tcp": "both",
                         "tcpmib": {mib}, "exit": "poweroff"}}, timeout=200, kit=kit, accel="kvm")
    peer.close(30)
    for w in ("net", "nettcp"):
        res = r.get(w)
        print(f"BOOT {{boot}} rc={{r.returncode}} " + (res.line if res else f"VDMTEST RESULT {{w}} missing"))
    if "tx_peer_md5" in peer.result:
        print(f"BOOT {{boot}} PEER recv_bytes={{peer.result['tx_peer_bytes']}} "
              f"recv_md5={{peer.result['tx_peer_md5']}}")
    for line in r.log.splitlines():
        if re.search(r"\b(?:input|output)\.\d+:", line):
            print(f"BOOT {{boot}} RING {{line}}")
    print(f"BOOT {{boot}} vdm_alive={{vdm.poll() is None}}", flush=True)
vdm.terminate()
out = vdm.communicate(timeout=30)[0]
print(out)
print(f"VDM rc={{vdm.returncode}}")
'''


def test_msix_guest_under_kvm_twice_on_one_vdm(kvm_lab, tmp_path: Path) -> None:  # noqa: F811
    tmp_path.chmod(0o755)
    script = tmp_path / "kvm_net.py"
    repo = str(Path(__file__).resolve().parents[2])
    script.write_text(textwrap.dedent(SCRIPT.format(repo=repo, mib=MIB)))
    script.chmod(0o644)
    r: vdm_lab.LabResult = kvm_lab(f"python3 {script}\n", timeout=600)
    r.assert_ok()
    out = r.output
    sent = re.search(r"^PEER sent_md5=(\w+)", out, re.M)
    assert sent, r.describe()
    for boot in (1, 2):
        lines = {m.group(1): m.group(0) for m in re.finditer(rf"^BOOT {boot} rc=0 VDMTEST RESULT (\w+) ok.*$",
                                                             out, re.M)}
        assert set(lines) == {"net", "nettcp"}, r.describe()
        net = vdm_lab.parse_keyvalues(lines["net"])
        tcp = vdm_lab.parse_keyvalues(lines["nettcp"])
        assert net["rx"] == "5/5", lines["net"]
        assert tcp["rx_bytes"] == str(MIB << 20) and tcp["rx_md5"] == sent.group(1), lines["nettcp"]
        got = re.search(rf"^BOOT {boot} PEER recv_bytes=(\d+) recv_md5=(\w+)", out, re.M)
        assert got and got.group(1) == str(MIB << 20) and got.group(2) == tcp["tx_md5"], r.describe()
        assert f"BOOT {boot} RING" not in out, r.describe()
        assert f"BOOT {boot} vdm_alive=True" in out, r.describe()
    assert "VDM rc=0" in out, r.describe()
    assert out.count("frontend connected") == 2, r.describe()
    assert "closing the connection" not in out, r.describe()
