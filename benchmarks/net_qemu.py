#!/usr/bin/env python3
"""QEMU TCG guest TCP throughput: vdm-net over vhost-user vs QEMU's built-in virtio-net, same tap.

Issues 4 and 7. A network namespace (tests/net/netns.py) holds a persistent tap ``vdmtap0``
(``ip tuntap add ... vnet_hdr``, 10.0.2.2/24) made once and reused by every run. Every run boots
the same guest (QEMU TCG, q35, 1 vCPU, ``--mem`` MiB in a shared memfd for all setups, the guest
kit's vmlinux + initrd.cpio.gz) and runs the kit's ``nettcp both``: busybox ``nc`` in the guest
first receives ``--mib`` MiB of random data from a peer on 10.0.2.2:5555 (namespace -> guest,
"rx"), then sends ``--mib`` MiB of its own (guest -> namespace, "tx"). The peer is a thread of
this script with its listening socket made inside the namespace. A transfer counts only when byte
count and MD5 match on both ends; its rate is timed by the peer (accept to the guest's EOF) and,
as a second figure, by the guest (``nc`` start to exit).

Setups (``--setups``), interleaved round by round:

- ``vdm-vu``: ``vdm vhost-user --network mode=tap,tapif=vdmtap0`` in the namespace (vdm-net
  defaults: offloads and mergeable receive buffers), QEMU ``-netdev vhost-user`` +
  ``virtio-net-pci,vectors=0`` (INTx: QEMU 7.2 under TCG segfaults on MSI-X with vhost-user net,
  see plugins/vhost-user/README.md);
- ``qemu-intx``: QEMU's built-in ``virtio-net-pci,vectors=0`` on ``-netdev tap,ifname=vdmtap0,
  script=no,downscript=no,vhost=off`` (QEMU runs inside the namespace): the like-for-like peer;
- ``qemu``: the same with MSI-X (QEMU's default), what a user of QEMU alone gets.

    python3 benchmarks/net_qemu.py [--runs 3] [--mib 64] [--setups vdm-vu,qemu-intx,qemu]

Needs root (namespace, tap). Prints a table and the machine (nproc, CPU model, load average).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import vdm_lab  # noqa: E402

from tests.net.netns import NetNs, netns_unavailable  # noqa: E402
from tests.net.tcp_peer import TcpPeer, listen  # noqa: E402
from tests.vhost_user.vdmproc import VdmProcess  # noqa: E402

SETUPS = ("vdm-vu", "qemu-intx", "qemu")
TAP = "vdmtap0"
HOST_ADDR = "10.0.2.2"
PORT = 5555
MAC = "52:54:00:12:34:56"


def qemu_args(setup: str, sock: Path) -> list[str]:
    if setup == "vdm-vu":
        return ["-chardev", f"socket,id=c0,path={sock}", "-netdev", "vhost-user,id=n0,chardev=c0",
                "-device", f"virtio-net-pci,netdev=n0,mac={MAC},vectors=0"]
    vectors = ",vectors=0" if setup == "qemu-intx" else ""
    return ["-netdev", f"tap,id=n0,ifname={TAP},script=no,downscript=no,vhost=off",
            "-device", f"virtio-net-pci,netdev=n0,mac={MAC}{vectors}"]


def one_run(setup: str, rnd: int, ns: NetNs, sock: Path, kit: vdm_lab.GuestKit, payload: bytes,
            payload_md5: str, a: argparse.Namespace) -> dict:
    params = {"addr": "10.0.2.15/24", "peer": f"{HOST_ADDR}:{PORT}", "tcp": "both", "tcpmib": a.mib,
              "tcptimeout": int(a.timeout), "exit": "poweroff"}
    cmd = vdm_lab.qemu_command(qemu_args(setup, sock), ["nettcp"], params, kit=kit, memory_mib=a.mem,
                               shared_memory=True)
    if setup != "vdm-vu":
        cmd = ns.argv(cmd)  # QEMU opens the tap by name: it must run inside the namespace
    row: dict = {"setup": setup, "round": rnd}
    before = ns.link_stats(TAP)
    peer = TcpPeer(payload, a.timeout, ns.call(lambda: listen(HOST_ADDR, PORT, a.timeout)))
    t0 = time.monotonic()
    p = subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                       timeout=a.timeout + 60, check=False)
    row["rc"] = p.returncode
    row["wall_s"] = round(time.monotonic() - t0, 2)
    peer.close()
    after = ns.link_stats(TAP)
    row["tap"] = {k: after.get(k, 0) - before.get(k, 0) for k in ("rx_dropped", "tx_dropped")}
    log = p.stdout.decode("utf-8", "replace")
    row.update(peer.result)
    _, results, _ = vdm_lab.parse_results(log)
    tcp = next((r for r in results if r.name == "nettcp"), None)
    size = len(payload)
    row["rx_ok"] = bool(tcp and tcp.get("rx_rc") == "0" and tcp.get("rx_bytes") == str(size)
                        and tcp.get("rx_md5") == payload_md5 and "rx_peer_s" in row)
    row["tx_ok"] = bool(tcp and tcp.get("tx_rc") == "0" and tcp.get("tx_bytes") == str(size)
                        and row.get("tx_peer_bytes") == size and row.get("tx_peer_md5") == tcp.get("tx_md5"))
    mib = size / (1 << 20)
    for d in ("rx", "tx"):
        if row[f"{d}_ok"]:
            row[f"{d}_MiBps"] = round(mib / max(row[f"{d}_peer_s"], 1e-6), 2)
            row[f"{d}_guest_MiBps"] = float(tcp.get(f"{d}_MiBps") or 0) if tcp else None
    if not (row["rx_ok"] and row["tx_ok"]):
        row["log_tail"] = "\n".join(log.splitlines()[-15:])
    return row


def machine() -> str:
    model = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    qemu = subprocess.run([vdm_lab.QEMU, "--version"], capture_output=True, text=True).stdout.splitlines()
    return (f"nproc {os.cpu_count()}, {model}, kernel {platform.release()}, "
            f"Python {platform.python_version()}, {qemu[0] if qemu else 'QEMU ?'}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--mib", type=int, default=64)
    ap.add_argument("--mem", type=int, default=512, help="guest MiB (the guest holds one file in tmpfs)")
    ap.add_argument("--timeout", type=float, default=300)
    ap.add_argument("--setups", default=",".join(SETUPS))
    a = ap.parse_args()
    setups = a.setups.split(",")
    for s in setups:
        if s not in SETUPS:
            ap.error(f"unknown setup {s}")
    why = netns_unavailable()
    if why:
        print(f"cannot run: {why}", file=sys.stderr)
        return 2
    kit = vdm_lab.guestkit()
    payload = os.urandom(a.mib << 20)
    payload_md5 = hashlib.md5(payload).hexdigest()
    print(machine())
    print(f"load average before: {os.getloadavg()[0]:.2f}; {a.runs} round(s) of {a.mib} MiB each way",
          flush=True)
    rows: list[dict] = []
    with NetNs("vdmbench") as ns:
        ns.prepare_tap(TAP, address=f"{HOST_ADDR}/24")
        sock = Path(f"/tmp/vdm-net-qemu-{os.getpid()}.sock")
        vdm: VdmProcess | None = None
        try:
            for rnd in range(a.runs):
                for setup in setups:
                    if setup == "vdm-vu":  # vdm holds the tap while it listens: only for its own runs
                        vdm = VdmProcess(str(sock), "--network", f"mode=tap,tapif={TAP}", wrap=ns.argv([]))
                    try:
                        row = one_run(setup, rnd, ns, sock, kit, payload, payload_md5, a)
                    finally:
                        if vdm is not None:
                            vdm.stop()
                            summary = [ln for ln in vdm.lines if "virtio-net: " in ln and " rx " in ln]
                            row["vdm"] = summary[-1].split("virtio-net: ", 1)[1] if summary else "?"
                            row["vdm_errors"] = vdm.count("closing the connection")
                            vdm = None
                    rows.append(row)
                    print(f"  round {rnd} {setup}: rx {row.get('rx_MiBps', 'FAIL')} MiB/s "
                          f"(guest {row.get('rx_guest_MiBps')}), tx {row.get('tx_MiBps', 'FAIL')} MiB/s "
                          f"(guest {row.get('tx_guest_MiBps')}), wall {row['wall_s']} s, "
                          f"tap drops {row['tap']}",
                          flush=True)
                    if "log_tail" in row:
                        print(row["log_tail"])
                    if "vdm" in row:
                        print(f"    vdm: {row['vdm']}; protocol errors {row['vdm_errors']}")
        finally:
            if vdm is not None:
                vdm.stop()
    print(f"load average after: {os.getloadavg()[0]:.2f}")
    print()
    print("| setup | namespace -> guest (MiB/s, peer) | guest -> namespace (MiB/s, peer) "
          "| rx (guest clock) | tx (guest clock) | ok runs |")
    print("| --- | --- | --- | --- | --- | --- |")
    med = {}
    for s in setups:
        mine = [r for r in rows if r["setup"] == s]
        ok = [r for r in mine if r["rx_ok"] and r["tx_ok"]]

        def m(key: str, ok: list[dict] = ok) -> float | None:
            vals = [r[key] for r in ok if r.get(key) is not None]
            return round(statistics.median(vals), 2) if vals else None

        med[s] = (m("rx_MiBps"), m("tx_MiBps"))
        print(f"| {s} | {m('rx_MiBps')} | {m('tx_MiBps')} | {m('rx_guest_MiBps')} | {m('tx_guest_MiBps')} "
              f"| {len(ok)}/{len(mine)} |")
    if "vdm-vu" in med:
        for peer in ("qemu-intx", "qemu"):
            if peer in med and all(med[peer]) and all(med["vdm-vu"]):
                print(f"vdm-vu / {peer}: rx {med['vdm-vu'][0] / med[peer][0]:.2f}, "
                      f"tx {med['vdm-vu'][1] / med[peer][1]:.2f}")
    return 0 if all(r["rx_ok"] and r["tx_ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
