#!/usr/bin/env python3
"""KVM lab: guest TCP throughput over a tap — ``vdm run`` virtio-net vs QEMU ``-accel kvm`` virtio-net.

Issue 7. Every setup boots the guest kit's bzImage (vmlinuz) and initrd.cpio.gz with 512 MiB and
``--cpus`` vCPUs (one queue pair) on the same persistent tap ``vdmtap0`` (``ip tuntap add ...
vnet_hdr``, 10.0.2.2/24 on the lab's side, created once and reused by every run), and runs the
kit's ``nettcp both``: busybox ``nc`` in the guest first receives ``--mib`` MiB of random data
from a peer on 10.0.2.2:5555 (namespace -> guest, "rx"), then sends ``--mib`` MiB of its own
(guest -> namespace, "tx"). The peer is a thread of this script in the lab's network namespace
(the lab is a throw-away VM, so its root namespace plays the namespace). A transfer counts only
when its byte count and MD5 match on both ends; its rate is timed by the peer (accept to the
guest's EOF for rx, accept to EOF for tx) and by the guest (``nc`` start to exit, its own clock).

Setups (``--setups``):
- ``vdm-pci``, ``vdm-mmio``: ``vdm -v run --network mode=tap,tapif=vdmtap0 --virtio-transport ...``
  (vdm-net defaults: offloads and mergeable receive buffers on);
- ``qemu``: QEMU's built-in ``virtio-net-pci`` on ``-netdev tap,ifname=vdmtap0,script=no,
  downscript=no,vhost=off`` (its defaults: offloads and mergeable buffers on);
- ``qemu-vhost``: the same with ``vhost=on``, run only when the lab has /dev/vhost-net.

After every run the script records what could explain a broken or slow transfer: where the CPU
went during the receive (the lab's CPUs busy, the VMM's busiest threads' user/sys/guest seconds,
and the busiest thread's CPU per frame vdm passed to the guest), the guest
console's virtio_ring complaints (``output.0:id N is not a head!`` and other ``input.N:`` /
``output.N:`` lines), NETDEV WATCHDOG lines, vdm's exit counters line (``virtio-net: vdmtap0: rx
... dropped rx A tx B``), vdm's ``completion of head N dropped`` errors, and the tap's kernel
counters (``ip -s -j link``) before and after. The whole console log of every run is kept in
``--logdir`` (a host folder shared into the lab).

    python3 benchmarks/net_lab.py [--runs 4] [--mib 128] [--cpus 1] [--setups vdm-pci,vdm-mmio,qemu]

On the host this boots the KVM lab (tests/realguest/harness.py) and runs itself there with
``--inside``; the table is printed on the host. One lab at a time: it is QEMU TCG with 2 vCPUs.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shlex
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import vdm_lab  # noqa: E402

from tests.net.tcp_peer import TcpPeer, listen  # noqa: E402

SETUPS = ("vdm-pci", "vdm-mmio", "qemu", "qemu-vhost")
DEFAULT_SETUPS = "vdm-pci,vdm-mmio,qemu,qemu-vhost"
TAP = "vdmtap0"
HOST_ADDR = "10.0.2.2"
PORT = 5555
MEM_MIB = 512

#: Linux virtio_ring reports a broken ring as "<queue name>:<what>", e.g. "output.0:id 7 is not a head!"
RING_COMPLAINT = re.compile(r"^.*\b(?:input|output)\.\d+:.*$", re.M)
WATCHDOG = re.compile(r"^.*NETDEV WATCHDOG.*$", re.M)
VDM_SUMMARY = re.compile(r"virtio-net: (\S+: rx \d+ packets .*)$", re.M)
VDM_DROPPED = re.compile(r"dropped rx (\d+) tx (\d+)")
VDM_RX_FRAMES = re.compile(r": rx (\d+) packets")
VDM_DUPLICATE = re.compile(r"^.*completion of head \d+ dropped.*$", re.M)


# ---- inside the lab --------------------------------------------------------------------------------


def tap_counters() -> dict[str, int]:
    """The tap's kernel counters (the lab side: rx = frames the guest sent)."""
    try:
        out = subprocess.run(["ip", "-s", "-j", "link", "show", TAP], capture_output=True, text=True,
                             timeout=30, check=True).stdout
        st = json.loads(out)[0].get("stats64", {})
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        return {}
    return {f"{d}_{k}": v for d in ("rx", "tx") for k, v in st.get(d, {}).items() if isinstance(v, int)}


class CpuSampler:
    """Every ``period`` s, the lab's CPU ticks (/proc/stat: all, idle+iowait) and each thread of the
    VMM process ``pid`` (comm, utime, stime, guest_time from /proc/PID/task/TID/stat), so one phase
    of a run -- the receive -- can be taken apart afterwards with :meth:`window`. A thread's utime
    includes its guest_time (a vCPU thread's guest running)."""

    def __init__(self, pid: int, period: float = 0.5) -> None:
        self.pid = pid
        self.period = period
        self.samples: list[tuple[float, int, int, dict[int, tuple[str, int, int, int]]]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="cpu-sampler", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.period):
            threads: dict[int, tuple[str, int, int, int]] = {}
            try:
                for tid in os.listdir(f"/proc/{self.pid}/task"):
                    with open(f"/proc/{self.pid}/task/{tid}/stat") as f:
                        st = f.read()
                    rest = st.rsplit(")", 1)[1].split()  # rest[0] is the state (field 3)
                    threads[int(tid)] = (st[st.index("(") + 1 : st.rindex(")")], int(rest[11]), int(rest[12]),
                                         int(rest[40]))
                with open("/proc/stat") as f:
                    ticks = [int(x) for x in f.readline().split()[1:]]
            except (OSError, ValueError, IndexError):
                continue  # the process is gone (or going): keep what we have
            self.samples.append((time.monotonic(), sum(ticks), ticks[3] + ticks[4], threads))

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)

    def window(self, t0: float | None, t1: float | None) -> dict | None:
        """CPU between the samples nearest ``t0`` and ``t1``: seconds, the lab's busy fraction and
        the VMM's busiest threads as [comm, user_s, sys_s, guest_s]."""
        if t0 is None or t1 is None or len(self.samples) < 2:
            return None
        a = min(self.samples, key=lambda x: abs(x[0] - t0))
        b = min(self.samples, key=lambda x: abs(x[0] - t1))
        if b[0] <= a[0]:
            return None
        hz = os.sysconf("SC_CLK_TCK")
        threads = []
        for tid, (comm, u, s, g) in b[3].items():
            _, u0, s0, g0 = a[3].get(tid, (comm, 0, 0, 0))
            threads.append([comm, round((u - u0) / hz, 1), round((s - s0) / hz, 1), round((g - g0) / hz, 1)])
        threads.sort(key=lambda t: -(t[1] + t[2]))
        busy = 1 - (b[2] - a[2]) / max(1, b[1] - a[1])
        return {"s": round(b[0] - a[0], 1), "lab_busy": round(busy, 3), "threads": threads[:4]}


def vmm_command(setup: str, kit: vdm_lab.GuestKit, params: str, cpus: int = 1) -> list[str]:
    """The command line of ``setup``; ``params`` is the kit's cmdline without console/panic."""
    k, i = str(kit.vmlinuz), str(kit.initrd)
    if setup.startswith("vdm-"):
        # vdm itself dumps every thread's stack on SIGUSR1 (what a stalled run was doing)
        return [sys.executable, "-m", "vdm.cli.main", "-v", "run", "-k", k, "-i", i,
                "-m", str(MEM_MIB), "-c", str(cpus),
                "--virtio-transport", setup[len("vdm-"):], "--console-backend", "stdio",
                "--network", f"mode=tap,tapif={TAP}", "-p", "console=ttyS0 panic=-1 " + params]
    vhost = "on" if setup == "qemu-vhost" else "off"
    net = ["-netdev", f"tap,id=n0,ifname={TAP},script=no,downscript=no,vhost={vhost}",
           "-device", "virtio-net-pci,netdev=n0"]
    cmd = vdm_lab.qemu_command(net, [], None, kit=kit, memory_mib=MEM_MIB, cpus=cpus, kernel=kit.vmlinuz,
                               accel="kvm")
    cmd[cmd.index("-append") + 1] = "console=ttyS0 panic=-1 " + params
    return cmd


def stop_stalled(p: subprocess.Popen, setup: str, row: dict) -> None:
    """A run past its time: vdm dumps its threads' stacks (SIGUSR1) and gets SIGINT (so it closes its
    devices and logs their counters); anything still running 15 s later is killed."""
    row["stalled"] = True
    print(f"RUN {setup} stalled: stopping it", flush=True)
    if setup.startswith("vdm-"):
        for sig, wait in ((signal.SIGUSR1, 3), (signal.SIGINT, 15)):
            if p.poll() is not None:
                return
            p.send_signal(sig)
            try:
                p.wait(wait)
                return
            except subprocess.TimeoutExpired:
                pass
    p.kill()


def one_run(setup: str, rnd: int, kit: vdm_lab.GuestKit, params: str, payload: bytes, payload_md5: str,
            a: argparse.Namespace) -> dict:
    cmd = vmm_command(setup, kit, params, a.cpus)
    shown = ["vdm", *cmd[3:]] if setup.startswith("vdm-") else cmd
    row: dict = {"setup": setup, "round": rnd, "command": " ".join(shlex.quote(c) for c in shown)}
    before = tap_counters()
    peer = TcpPeer(payload, a.timeout, listen(HOST_ADDR, PORT, a.timeout))
    t0 = time.monotonic()
    p = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    sampler = CpuSampler(p.pid)
    lines: list[str] = []
    killer = threading.Timer(a.timeout, stop_stalled, (p, setup, row))
    killer.start()
    assert p.stdout is not None
    print(f"RUN {setup} round {rnd} start", flush=True)
    for raw in p.stdout:
        line = raw.decode("utf-8", "replace").rstrip("\r\n")
        lines.append(line)
        print(f"  {setup}| {line[:200]}", flush=True)  # live, so a wedged lab shows where it stopped
    row["rc"] = p.wait()
    killer.cancel()
    sampler.stop()
    row["wall_s"] = round(time.monotonic() - t0, 2)
    peer.close()
    after = tap_counters()
    log = "\n".join(lines)
    logname = f"{rnd:02d}-{setup}.log"
    if os.path.isdir("/mnt/out"):
        Path("/mnt/out", logname).write_text(log + "\n")
        row["log"] = logname
    row.update(peer.result)
    keys = [f"{d}_{k}" for d in ("rx", "tx") for k in ("packets", "bytes", "dropped", "errors")]
    row["tap"] = {k: after.get(k, 0) - before.get(k, 0) for k in keys}
    _, results, done = vdm_lab.parse_results(log)
    tcp = next((r for r in results if r.name == "nettcp"), None)
    size = len(payload)
    row["guest_done"] = done
    row["rx_ok"] = bool(tcp and tcp.get("rx_rc") == "0" and tcp.get("rx_bytes") == str(size)
                        and tcp.get("rx_md5") == payload_md5 and "rx_peer_s" in row)
    row["tx_ok"] = bool(tcp and tcp.get("tx_rc") == "0" and tcp.get("tx_bytes") == str(size)
                        and row.get("tx_peer_bytes") == size and row.get("tx_peer_md5") == tcp.get("tx_md5"))
    mib = size / (1 << 20)
    for d in ("rx", "tx"):
        if row[f"{d}_ok"]:
            row[f"{d}_MiBps"] = round(mib / max(row[f"{d}_peer_s"], 1e-6), 3)
            row[f"{d}_guest_MiBps"] = float(tcp.get(f"{d}_MiBps") or 0) if tcp else None
    row["nettcp_line"] = tcp.line if tcp else None
    row["ring_complaints"] = RING_COMPLAINT.findall(log)
    row["watchdog"] = WATCHDOG.findall(log)
    summary = VDM_SUMMARY.search(log)
    row["vdm_summary"] = summary.group(1) if summary else None
    # where the receive's CPU went: the lab's CPUs, the VMM's busiest threads, and the busiest
    # thread's CPU per frame vdm passed to the guest (in vdm most of the receive runs on one thread)
    row["rx_cpu"] = sampler.window(row.get("rx_start"), row.get("rx_end"))
    frames = VDM_RX_FRAMES.search(row["vdm_summary"] or "")
    if row["rx_cpu"] and row["rx_cpu"]["threads"] and frames:
        top = row["rx_cpu"]["threads"][0]
        row["rx_busiest_us_per_frame"] = round((top[1] + top[2]) / max(1, int(frames.group(1))) * 1e6)
    # the same for the transmit, per frame the tap took from the VMM (the guest's TSO frames)
    row["tx_cpu"] = sampler.window(row.get("tx_start"), row.get("tx_end"))
    tx_frames = row["tap"].get("rx_packets")
    if row["tx_cpu"] and row["tx_cpu"]["threads"] and tx_frames:
        top = row["tx_cpu"]["threads"][0]
        row["tx_busiest_us_per_frame"] = round((top[1] + top[2]) / tx_frames * 1e6)
    drops = VDM_DROPPED.search(row["vdm_summary"] or "")
    row["vdm_dropped"] = [int(drops.group(1)), int(drops.group(2))] if drops else None
    row["vdm_duplicate_completions"] = VDM_DUPLICATE.findall(log)
    warn = [ln for ln in lines if re.search(r"\b(WARNING|ERROR|Traceback|BUG|Oops)\b", ln)]
    row["warnings"] = warn[:10]
    if not (row["rx_ok"] and row["tx_ok"]):
        row["tail"] = "\n".join(lines[-40:])
    return row


def inside(a: argparse.Namespace) -> int:
    kit = vdm_lab.guestkit()
    setups = a.setups.split(",")
    vhost = os.path.exists("/dev/vhost-net")
    print(f"BENCHINFO vhost_net={'yes' if vhost else 'no'} nproc={os.cpu_count()} "
          f"load={os.getloadavg()[0]:.2f}", flush=True)
    if "qemu-vhost" in setups and not vhost:
        setups.remove("qemu-vhost")
    subprocess.run(["ip", "tuntap", "add", "dev", TAP, "mode", "tap", "vnet_hdr"], check=True)
    subprocess.run(["ip", "addr", "add", f"{HOST_ADDR}/24", "dev", TAP], check=True)
    subprocess.run(["ip", "link", "set", TAP, "up"], check=True)
    payload = os.urandom(a.mib << 20)
    payload_md5 = hashlib.md5(payload).hexdigest()
    params = vdm_lab.kernel_cmdline(
        ["nettcp"], {"tcp": "both", "tcpmib": a.mib, "tcptimeout": int(a.timeout) - 60, "exit": "reboot"},
        extra="loglevel=5")
    params = params.replace("console=ttyS0 panic=-1 ", "")
    for rnd in range(a.runs):
        order = setups if rnd % 2 == 0 else setups[::-1]  # interleaved, alternating order
        for setup in order:
            row = one_run(setup, rnd, kit, params, payload, payload_md5, a)
            print("BENCHJSON " + json.dumps(row), flush=True)
    return 0


# ---- on the host -----------------------------------------------------------------------------------


def _fmt(values: list[float]) -> str:
    if not values:
        return "-"
    med = statistics.median(values)
    return f"{med:.2f} ({min(values):.2f}-{max(values):.2f})" if len(values) > 1 else f"{med:.2f}"


def table(rows: list[dict], setups: list[str]) -> None:
    print("| setup | ns→guest MiB/s (peer) | guest→ns MiB/s (peer) | ns→guest (guest clock) "
          "| guest→ns (guest clock) | transfers ok | ring complaints | vdm drops rx/tx |")
    print("| --- " * 8 + "|")
    for s in setups:
        rs = [r for r in rows if r["setup"] == s]
        if not rs:
            continue
        cells = [_fmt([r[k] for r in rs if r.get(k) is not None]) for k in
                 ("rx_MiBps", "tx_MiBps", "rx_guest_MiBps", "tx_guest_MiBps")]
        ok = sum(r["rx_ok"] for r in rs) + sum(r["tx_ok"] for r in rs)
        ring = sum(len(r["ring_complaints"]) for r in rs)
        drops = [r["vdm_dropped"] for r in rs if r.get("vdm_dropped") is not None]
        dcell = ", ".join(f"{d[0]}/{d[1]}" for d in drops) if s.startswith("vdm") else "n/a"
        print(f"| {s} | " + " | ".join(cells) + f" | {ok}/{2 * len(rs)} | {ring} | {dcell} |")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=4, help="rounds; each runs every setup once (default 4)")
    ap.add_argument("--mib", type=int, default=128, help="MiB per direction per run (default 128)")
    ap.add_argument("--setups", default=DEFAULT_SETUPS, help=f"comma list of {', '.join(SETUPS)}")
    ap.add_argument("--cpus", type=int, default=1, help="guest vCPUs, all setups (default 1)")
    ap.add_argument("--timeout", type=float, default=420, help="seconds per VMM run (default 420)")
    ap.add_argument("--logdir", help="host folder for every run's console log (default /tmp/net_lab-<time>)")
    ap.add_argument("--json", help="also write the rows to this file")
    ap.add_argument("--inside", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    for s in a.setups.split(","):
        if s not in SETUPS:
            ap.error(f"unknown setup {s!r} (choose from {', '.join(SETUPS)})")
    if a.timeout < 120:
        ap.error("--timeout must be at least 120 s")
    if a.inside:
        return inside(a)
    logdir = Path(a.logdir or f"/tmp/net_lab-{time.strftime('%Y%m%d-%H%M%S')}").resolve()
    logdir.mkdir(parents=True, exist_ok=True)
    script = (f"{shlex.quote(sys.executable)} {shlex.quote(str(Path(__file__).resolve()))} --inside "
              f"--runs {a.runs} --mib {a.mib} --cpus {a.cpus} --setups {shlex.quote(a.setups)} "
              f"--timeout {a.timeout}")
    load0 = os.getloadavg()
    t0 = time.monotonic()
    n_setups = len(a.setups.split(","))
    # (PYTHONPATH goes along: the lab's shell starts with a clean environment, and without it the
    # lab's vdm is the installed one, not the checkout's a worktree's caller points at)
    env = {"PYTHONPATH": os.environ["PYTHONPATH"]} if os.environ.get("PYTHONPATH") else None
    r = vdm_lab.run_in_kvm_lab(script, timeout=300 + a.runs * n_setups * a.timeout, cwd=str(REPO), env=env,
                               outdir=logdir, echo=lambda s: print(s, end="", file=sys.stderr, flush=True))
    load1 = os.getloadavg()
    rows = [json.loads(ln[len("BENCHJSON "):]) for ln in r.output.splitlines() if ln.startswith("BENCHJSON ")]
    info = next((ln for ln in r.output.splitlines() if ln.startswith("BENCHINFO ")), "")
    (logdir / "lab-output.txt").write_text(r.output)
    (logdir / "lab-console.txt").write_text(r.console)
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=1))
    (logdir / "rows.json").write_text(json.dumps(rows, indent=1))
    if not rows:
        print(r.describe(), file=sys.stderr)
        return 1
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), "?")
    print(f"host: nproc {os.cpu_count()}, {cpu}; load average before/after {load0[0]:.2f} / {load1[0]:.2f}; "
          f"lab wall {time.monotonic() - t0:.0f} s; lab {info[len('BENCHINFO '):]}")
    print(f"{a.runs} rounds (interleaved), {a.mib} MiB each way per run, {a.cpus} guest vCPU(s), "
          f"median (min-max); logs in {logdir}\n")
    table(rows, a.setups.split(","))
    print()
    for row in rows:
        notes = []
        if row.get("vdm_summary"):
            notes.append(f"vdm: {row['vdm_summary']}")
        for key in ("ring_complaints", "watchdog", "vdm_duplicate_completions", "warnings"):
            if row.get(key):
                notes.append(f"{key}: {row[key]}")
        if row.get("peer_error"):
            notes.append(f"peer: {row['peer_error']}")
        for way, what, unit in (("rx", "receive", "frame"), ("tx", "transmit", "tap frame")):
            if row.get(f"{way}_cpu"):
                w, busiest = row[f"{way}_cpu"], row.get(f"{way}_busiest_us_per_frame")
                notes.append(f"{what} {w['s']} s: lab CPUs {w['lab_busy']:.0%} busy, VMM threads "
                             f"[comm, user, sys, guest s] {w['threads']}"
                             + (f", busiest {busiest} us CPU per {unit}" if busiest else ""))
        tap = row.get("tap", {})
        notes.append("tap rx/tx packets {}/{}, dropped {}/{}".format(
            tap.get("rx_packets"), tap.get("tx_packets"), tap.get("rx_dropped"), tap.get("tx_dropped")))
        print(f"- round {row['round']} {row['setup']} rc {row['rc']} wall {row['wall_s']} s "
              f"rx_ok {row['rx_ok']} tx_ok {row['tx_ok']}: " + "; ".join(notes))
        if row.get("tail"):
            tail = "\n".join("    " + ln for ln in row["tail"].splitlines())
            print(f"  tail of {row.get('log')}:\n{tail}", file=sys.stderr)
    print("\ncommands (inside the lab):")
    for s in a.setups.split(","):
        c = next((row["command"] for row in rows if row["setup"] == s), None)
        if c:
            print(f"- {s}: `{c}`")
    return 0


if __name__ == "__main__":
    sys.exit(main())
