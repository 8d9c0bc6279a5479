"""A real Linux guest (QEMU TCG, the guest kit) on ``vdm vhost-user --network``: vdm-net over vhost-user.

The test makes a network namespace with a tap (10.0.2.2/24) and runs ``vdm vhost-user`` inside it
on that tap; QEMU (outside) attaches a ``virtio-net-pci`` to it over a vhost-user netdev. The
guest's own virtio_net driver brings eth0 up as 10.0.2.15/24, pings 10.0.2.2 and moves a file each
way over TCP with busybox nc; a Python peer in the namespace sends and receives, and the MD5s of
both ends are compared here. Then the guest powers off and vdm must keep serving: the next QEMU
on the same socket gets a working network too.

QEMU under TCG segfaults when a vhost-user virtio-net uses MSI-X (a NULL ``vector_irqfd`` in
QEMU's virtio-pci, see plugins/vhost-user/README.md), so the device gets ``vectors=0`` (INTx).
"""

from __future__ import annotations

import re
import subprocess
import time
from pathlib import Path

import pytest
import vdm_lab

from tests.net.netns import NetNs, netns_unavailable
from tests.realguest.conftest import kit, qemu, qemu_frontend  # noqa: F401 - the session fixtures
from tests.vhost_user.vdmproc import VdmProcess

pytestmark = [pytest.mark.realguest, pytest.mark.slow]

TAP = "vdmtap0"
HOST_IP = "10.0.2.2"
PORT = 5555
MIB = 2
#: the guest's MAC (QEMU's virtio-net-pci owns the config space of a vhost-user netdev)
MAC = "52:54:00:12:34:56"

TCP_PEER = Path(__file__).resolve().parents[1] / "net" / "tcp_peer.py"


def needs_intx(fe: vdm_lab.QemuFrontend) -> bool:
    """QEMU 7.2 under TCG crashes on MSI-X with a vhost-user netdev (see the module doc)."""
    return fe.version.startswith("7.")


def vhost_user_net_args(fe: vdm_lab.QemuFrontend, sock: Path, index: int = 0) -> list[str]:
    """A virtio-net-pci on a vhost-user netdev; without MSI-X on QEMU 7.2 (TCG crashes with it)."""
    vectors = ",vectors=0" if needs_intx(fe) else ""
    return [
        "-chardev", f"socket,id=vunc{index},path={sock}",
        "-netdev", f"vhost-user,id=vun{index},chardev=vunc{index}",
        "-device", f"virtio-net-pci,netdev=vun{index},mac={MAC}{vectors}",
    ]  # fmt: skip


@pytest.fixture
def served(tmp_path: Path):
    """(namespace, vdm process, socket path): vdm vhost-user serving virtio-net on a tap in a namespace."""
    why = netns_unavailable()
    if why:
        pytest.skip(why)
    sock = tmp_path / "net.sock"
    with NetNs() as ns:
        ns.prepare_tap(TAP, address=f"{HOST_IP}/24")
        vdm = VdmProcess(str(sock), "--network", f"mode=tap,tapif={TAP}", wrap=ns.argv([]))
        try:
            yield ns, vdm, sock
        finally:
            rc = vdm.stop()
            assert rc == 0, vdm.output
            assert not sock.exists(), "SIGTERM removes the socket"


def _start_peer(ns: NetNs) -> tuple[subprocess.Popen, str]:
    """The TCP peer in the namespace; returns it and the MD5 of what it will send."""
    peer = ns.popen(
        ["python3", str(TCP_PEER), HOST_IP, str(PORT), str(MIB << 20), "--timeout", "60"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    assert peer.stdout is not None
    line = peer.stdout.readline()
    m = re.match(r"PEER listening sent_md5=(\w+)", line)
    assert m, f"the peer did not start: {line}{peer.stdout.read()}"
    return peer, m.group(1)


def _boot(kit: vdm_lab.GuestKit, fe: vdm_lab.QemuFrontend, sock: Path, workloads: list[str],  # noqa: F811
          **params: object) -> vdm_lab.GuestResult:
    p = {"addr": "10.0.2.15/24", "ip": HOST_IP, "peer": f"{HOST_IP}:{PORT}", "exit": "poweroff", **params}
    return vdm_lab.run_qemu(vhost_user_net_args(fe, sock), workloads, p, timeout=90, kit=kit, qemu=fe,
                            visible=[sock.parent])


def _ring_complaints(log: str) -> list[str]:
    """Linux virtio_ring's complaints about a broken ring ('output.0:id 7 is not a head!')."""
    return re.findall(r"^.*\b(?:input|output)\.\d+:.*$", log, re.M)


def _transfer(kit: vdm_lab.GuestKit, fe: vdm_lab.QemuFrontend, ns: NetNs, sock: Path) -> vdm_lab.GuestResult:  # noqa: F811
    """Boot a guest that pings and moves a file each way; check both ends' MD5s."""
    peer, sent_md5 = _start_peer(ns)
    r = _boot(kit, fe, sock, ["net", "nettcp"], tcp="both", tcpmib=MIB, tcptimeout=40)
    try:
        out, _ = peer.communicate(timeout=20)
    except subprocess.TimeoutExpired:
        peer.kill()
        out, _ = peer.communicate()
    r.assert_ok("net", "nettcp")
    assert r["net"]["rx"] == "5/5", f"{fe}: {r['net'].line}"
    assert not _ring_complaints(r.log), (str(fe), _ring_complaints(r.log))
    tcp = r["nettcp"]
    # namespace -> guest
    assert tcp["rx_bytes"] == str(MIB << 20) and tcp["rx_md5"] == sent_md5, f"{fe}: {tcp.line}"
    # guest -> namespace
    got = re.search(r"PEER recv_bytes=(\d+) recv_md5=(\w+)", out)
    assert got, f"{fe}: the peer did not receive the guest's file: {out}"
    assert got.group(1) == str(MIB << 20) and got.group(2) == tcp["tx_md5"], (str(fe), got.group(0), tcp.line)
    return r


def test_guest_pings_and_transfers_files_both_ways_and_vdm_serves_the_next_guest(
        kit: vdm_lab.GuestKit, qemu_frontend: vdm_lab.QemuFrontend, served) -> None:  # noqa: F811
    """A first guest pings and powers off; vdm keeps serving, and the next guest on the same socket
    pings and moves a file each way. (Two tests once: one guest's transfer, and a ping guest then a
    transfer guest -- the second test's transfer guest did all the first one did, so the first
    test's checks are made on it and one guest boot per QEMU is saved.)"""
    fe = qemu_frontend
    ns, vdm, sock = served
    first = _boot(kit, fe, sock, ["net"])
    first.assert_ok("net")
    assert first["net"]["rx"] == "5/5", f"{fe}: {first['net'].line}"
    assert first.returncode == 0, first.describe()  # powered off, QEMU exited by itself
    assert vdm.alive, f"{fe}\n{vdm.output}"
    assert sock.exists()
    r = _transfer(kit, fe, ns, sock)
    assert vdm.alive, f"{fe}\n{vdm.output}"
    assert "memory-backend=mem" in " ".join(r.command)  # guest RAM shared with vdm
    assert ("vectors=0" in " ".join(r.command)) == needs_intx(fe)  # MSI-X on QEMU 10 under TCG
    assert vdm.count("frontend connected") == 2, f"{fe}\n{vdm.output}"
    # each guest started both queues once
    assert vdm.count("queue 0 starts") == 2 and vdm.count("queue 1 starts") == 2, f"{fe}\n{vdm.output}"
    stats = ns.link_stats(TAP)
    # the tap saw the guest's file (host rx) and the peer's file (host tx), plus headers (the first
    # guest's pings add a few KiB, far below MIB)
    assert stats["rx_bytes"] > MIB << 20 and stats["tx_bytes"] > MIB << 20, (str(fe), stats)
    tcp = r["nettcp"]
    print(f"vhost-user net ({fe.name}): ping {r['net']['rtt_avg_ms']} ms, tcp {tcp['rx_MiBps']} MiB/s in, "
          f"{tcp['tx_MiBps']} MiB/s out")
    deadline = time.monotonic() + 10  # vdm logs the disconnect a moment after QEMU exits
    while vdm.count("the frontend closed the connection") < 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert vdm.count("the frontend closed the connection") == 2, f"{fe}\n{vdm.output}"
    assert vdm.count("closing the connection") == 0, f"{fe}\n{vdm.output}"


def test_two_queue_pairs_asked_for_serve_the_guest_with_one(kit: vdm_lab.GuestKit,  # noqa: F811
                                                            qemu_frontend: vdm_lab.QemuFrontend,  # noqa: F811
                                                            tmp_path: Path) -> None:
    """``queues=2`` on both sides: QEMU serves the control queue, so vdm offers no MQ (one pair)."""
    fe = qemu_frontend
    why = netns_unavailable()
    if why:
        pytest.skip(why)
    sock = tmp_path / "mq.sock"
    with NetNs() as ns:
        ns.prepare_tap(TAP, address=f"{HOST_IP}/24", multi_queue=True)
        vdm = VdmProcess(str(sock), "--network", f"mode=tap,tapif={TAP},queues=2", wrap=ns.argv([]))
        try:
            intx = ",vectors=0" if needs_intx(fe) else ""
            args = [
                "-chardev", f"socket,id=c0,path={sock}",
                "-netdev", "vhost-user,id=n0,chardev=c0,queues=2",
                "-device", f"virtio-net-pci,netdev=n0,mac={MAC},mq=on{intx}",
            ]  # fmt: skip
            p = {"addr": "10.0.2.15/24", "ip": HOST_IP, "count": 10, "exit": "poweroff", "cpus": 2}
            r = vdm_lab.run_qemu(args, ["smp", "net"], p, timeout=90, kit=kit, cpus=2, qemu=fe,
                                 visible=[tmp_path])
        finally:
            rc = vdm.stop()
    r.assert_ok("smp", "net")
    assert r["net"]["rx"] == "10/10", f"{fe}: {r['net'].line}"
    assert rc == 0, f"{fe}\n{vdm.output}"
    assert vdm.count("closing the connection") == 0, f"{fe}\n{vdm.output}"
    assert vdm.count("features 0x400000 are not offered") == 1, f"{fe}\n{vdm.output}"  # MQ (bit 22)
    assert vdm.count("queue 0 starts") == 1 and vdm.count("queue 2 starts") == 0, f"{fe}\n{vdm.output}"
