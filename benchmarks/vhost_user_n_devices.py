#!/usr/bin/env python3
"""N disks from one ``vdm vhost-user`` process vs N processes of one disk each (issue 16 "Done when").

Each of the N disks is driven at once by its own libblkio client (``scripts/frontends/
blkio_frontend.c`` on libblkio 1.5's ``virtio-blk-vhost-user`` driver, built and run inside the
Debian 13 root by ``scripts/frontends/build.sh``, as in ``vhost_user_blk_free.py``): 4 KiB random
reads at queue depth 1 and 32 over a ``--mib`` MiB raw image of random data (page cache on). The
figure per setup is the sum of the N clients' IOPS; the ratio is one process / N processes (1.0:
one process costs the same per request; below 1: it loses). Every backend has its own copy of one
image (each takes the image's write lock; libblkio's client refuses a read-only disk) and runs for
the whole benchmark; the rows are interleaved (for every run, every N, every row, both setups,
their order alternating per run). A third setup is one process with ``--loop-per-device`` (every
device on an event loop thread of its own).

Where the time goes: around each measurement the backends' CPU time is read from /proc (every
thread's utime+stime), giving the backends' CPU microseconds per request and, for the busiest
thread, the share of the wall time it ran (1.0: that thread -- the event loop -- is saturated).
With ``--py-spy PATH`` (py-spy 0.4, ``pip install py-spy``), one more qd32 measurement per N >= 2
and one-process setup is sampled, every thread, idle samples included and then GIL-holding ones
only: the share of the wall time the event loop thread(s) held the GIL, and where the loop threads
were otherwise (inside the call eventfd's write, waiting in epoll).

    python3 benchmarks/vhost_user_n_devices.py [--runs 3] [--time 3] [--mib 32] [--n 1,2,4] [--py-spy PATH]
"""

from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.vhost_user_client import Backend, arguments, client, header, random_image, run_client  # noqa: E402

HZ = os.sysconf("SC_CLK_TCK")
#: (client mode, block size, queue depth)
ROWS = [("randread", "4k", 1), ("randread", "4k", 32)]
SETUPS = ("one process", "one process, loop per device", "N processes")


def vdm_argv(pairs: list[tuple[Path, Path]], per_device: bool = False) -> list[str]:
    """One ``vdm vhost-user`` serving every ``(socket, image)``."""
    argv = [sys.executable, "-m", "vdm.cli.main", "vhost-user"]
    if per_device:
        argv.append("--loop-per-device")
    for sock, image in pairs:
        argv += ["-s", str(sock), "--disk", str(image)]
    return argv


def thread_ticks(pids: list[int]) -> dict[tuple[int, str], int]:
    """utime+stime (clock ticks) of every thread of ``pids``."""
    out = {}
    for pid in pids:
        for tid in os.listdir(f"/proc/{pid}/task"):
            try:
                with open(f"/proc/{pid}/task/{tid}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except FileNotFoundError:
                continue
            out[(pid, tid)] = int(fields[11]) + int(fields[12])
    return out


def drive(root, binary: Path, socks: list[Path], row, seconds: float, mib: int) -> float:
    """Run one client per socket at once; the sum of their IOPS."""
    out: list[float] = []
    errors: list[BaseException] = []

    def one(sock: Path) -> None:
        try:
            out.append(run_client(root, binary, sock, row, seconds, mib)["iops"])
        except BaseException as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=one, args=(s,)) for s in socks]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return sum(out)


def _samples(path: Path) -> list[tuple[list[str], int]]:
    """py-spy's raw (collapsed) output: (frames, outermost first; count) per line."""
    out = []
    for line in path.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        out.append((stack.split(";"), int(n)))
    return out


def _epoll_frame() -> str:
    """py-spy's name for the event loop's line that waits in epoll."""
    import vdm.eventloop

    lines = Path(vdm.eventloop.__file__).read_text().splitlines()
    return f"EventLoop._run (vdm/eventloop.py:{next(i for i, x in enumerate(lines, 1) if 'ep.poll()' in x)})"


def profile(pyspy: str, pid: int, drive_it, tmp: Path, tag: str) -> tuple[float, float, float, float]:
    """Sample ``pid`` while ``drive_it()`` runs clients: (IOPS, GIL held by the loop threads as a
    share of the wall time, share of the loop threads' samples in the call eventfd's write, in epoll)."""
    iops: list[float] = []
    t = threading.Thread(target=lambda: iops.append(drive_it()))
    t.start()
    time.sleep(1.5)  # the clients' start and warm-up
    for kind in ("idle", "gil"):
        argv = [pyspy, "record", "-r", "200", "-d", "2", "--format", "raw", "--threads", "--nonblocking",
                f"--{kind}", "-o", str(tmp / f"{tag}.{kind}"), "--pid", str(pid)]
        subprocess.run(argv, capture_output=True, timeout=60, check=True)
    t.join()
    idle, gil = _samples(tmp / f"{tag}.idle"), _samples(tmp / f"{tag}.gil")
    wall = sum(c for f, c in idle if "MainThread" in f[0])  # the main thread is sampled every time
    loop = [(f, c) for f, c in idle if "vdm-vhost-user" in f[0]]
    total = sum(c for _, c in loop) or 1
    held = sum(c for f, c in gil if "vdm-vhost-user" in f[0])
    ev = sum(c for f, c in loop if f[-1].startswith("signal_eventfd"))
    ep = sum(c for f, c in loop if f[-1] == _epoll_frame())
    return iops[0] if iops else 0.0, held / max(wall, 1), ev / total, ep / total


def main() -> int:
    def more(ap) -> None:
        ap.add_argument("--n", default="1,2,4", help="device counts")
        ap.add_argument("--py-spy", dest="pyspy", metavar="PATH", help="sample the one-process setups")

    a = arguments(__doc__, mib=32, more=more)
    ns = [int(x) for x in a.n.split(",")]
    root, binary = client()
    res: dict[tuple[int, int, str], list[float]] = {}
    cost: dict[tuple[int, int, str], list[tuple[float, float]]] = {}
    pids: dict[tuple[int, str], list[int]] = {}
    backends: list[Backend] = []
    with tempfile.TemporaryDirectory(dir="/var/tmp", prefix="vdm-ndev-") as d:
        tmp = Path(d)
        seed = random_image(tmp / "seed.raw", a.mib)

        def image(name: str) -> Path:  # every backend its own copy: each takes its write lock
            path = tmp / f"{name}.raw"
            shutil.copyfile(seed, path)
            return path

        socks: dict[tuple[int, str], list[Path]] = {}
        try:
            for n in ns:
                for k, tag in ((0, "one"), (1, "loops")):
                    one = [(tmp / f"{tag}{n}-{i}.sock", image(f"{tag}{n}-{i}")) for i in range(n)]
                    argv = vdm_argv(one, per_device=k == 1)
                    backends.append(Backend(f"{tag}{n}", argv, one[-1][0], tmp / f"{tag}{n}.log"))
                    pids[(n, SETUPS[k])] = [backends[-1].proc.pid]
                    socks[(n, SETUPS[k])] = [s for s, _ in one]
                pids[(n, SETUPS[2])] = []
                socks[(n, SETUPS[2])] = []
                for i in range(n):
                    sock = tmp / f"sep{n}-{i}.sock"
                    argv = vdm_argv([(sock, image(f"sep{n}-{i}"))])
                    backends.append(Backend(f"sep{n}-{i}", argv, sock, tmp / f"sep{n}-{i}.log"))
                    pids[(n, SETUPS[2])].append(backends[-1].proc.pid)
                    socks[(n, SETUPS[2])].append(sock)
            load0 = os.getloadavg()
            for run in range(a.runs):
                order = SETUPS if run % 2 == 0 else SETUPS[::-1]
                for n in ns:
                    for i, row in enumerate(ROWS):
                        for s in order:
                            before, t0 = thread_ticks(pids[(n, s)]), time.monotonic()
                            iops = drive(root, binary, socks[(n, s)], row, a.time, a.mib)
                            after, wall = thread_ticks(pids[(n, s)]), time.monotonic() - t0
                            used = {k: (v - before.get(k, 0)) / HZ for k, v in after.items()}
                            # requests: the clients' IOPS over their timed part (after the warm-up)
                            cpu_us = sum(used.values()) / wall * 1e6 / iops
                            busiest = max(used.values()) / wall
                            res.setdefault((n, i, s), []).append(iops)
                            cost.setdefault((n, i, s), []).append((cpu_us, busiest))
                print(f"# run {run + 1} of {a.runs} done", file=sys.stderr, flush=True)
            profiles = {}
            for n in [n for n in ns if n >= 2] if a.pyspy else []:
                for s in SETUPS[:2]:
                    def drive_it(n=n, s=s) -> float:
                        return drive(root, binary, socks[(n, s)], ROWS[1], 6.0, a.mib)

                    profiles[(n, s)] = profile(a.pyspy, pids[(n, s)][0], drive_it, tmp, f"prof{n}-{s[-6:]}")
            load1 = os.getloadavg()
        finally:
            for b in backends:
                b.stop()
    print(header(root, a, (load0[0], load1[0]), f", {os.cpu_count()} CPUs"))
    print(
        "| N | row | IOPS (sum) one / loop per device / N processes | one/N | loops/N "
        "| per-run one/N; loops/N | backend CPU µs/request one / loops / N "
        "| busiest thread's share one / loops / N |"
    )
    print("| --- " * 8 + "|")
    for n in ns:
        for i, (mode, bs, qd) in enumerate(ROWS):
            one, loops, sep = (res[(n, i, x)] for x in SETUPS)
            per_run = "; ".join(" ".join(f"{x / y:.2f}" for x, y in zip(v, sep)) for v in (one, loops))
            m1, m3, m2 = (statistics.median(v) for v in (one, loops, sep))
            c = " / ".join(f"{statistics.median(c[0] for c in cost[(n, i, x)]):.1f}" for x in SETUPS)
            b = " / ".join(f"{statistics.median(c[1] for c in cost[(n, i, x)]):.2f}" for x in SETUPS)
            print(
                f"| {n} | {mode} {bs} qd{qd} | {m1:,.0f} / {m3:,.0f} / {m2:,.0f} | {m1 / m2:.2f} "
                f"| {m3 / m2:.2f} | {per_run} | {c} | {b} |",
                flush=True,
            )
    if profiles:
        print("\n| N | setup (qd32, py-spy) | IOPS | GIL held by the loop thread(s), share of the wall "
              "| loop threads' samples: in the call eventfd write / in epoll wait |")  # fmt: skip
        print("| --- " * 5 + "|")
        for (n, s), (iops, held, ev, ep) in profiles.items():
            print(f"| {n} | {s} | {iops:,.0f} | {held:.2f} | {ev:.2f} / {ep:.2f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
