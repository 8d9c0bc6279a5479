#!/usr/bin/env python3
"""Device overhead without a guest: 4 KiB virtio-blk reads (or writes) through the device path.

The in-process driver lays out N requests once; each round re-publishes the same N chains
(:class:`vdm.testing.DriverRing`'s ``publish``), kicks, and waits until the device has returned all
of them. Only the device's side is timed per round (the re-publish is a few ring writes): the kick,
the device's work, its interrupt raised through the virtio-mmio transport and the driver's interrupt
acknowledge through the transport's registers (vdm code a guest's interrupt handler would run); the
driver reads used.idx with one load from its RAM, as a guest does.
Backends: ``null`` (readv returns at once), ``raw`` (a file in the page cache), ``qcow2`` (that
file converted by ``qemu-img convert``, every cluster allocated) and ``raw-worker``
(the same file with the device's inline paths turned off, so every request goes through the
worker-thread handoff: the A/B of those paths). A backend name with ``+vu`` (``raw+vu``) gives the
device the driver's RAM through vdm-vhost-user's shared memory as a connection without LOG_SHMFD
has it (no view tracking), ``+vulog`` as one with LOG_SHMFD (QEMU's: every writable view remembered
for the dirty log, logging itself off): what the vhost-user path adds per request, without a socket.

The floor: before each device round, as many bare ``os.preadv`` (or ``os.pwritev``) calls of 4 KiB
as the round has requests, on the same page-cached file (the ``raw`` image), timed the same way.
Floor and device alternate round by round, so a change of the machine's load hits both; the table
gives each device figure as a multiple of the floor measured beside it (median of the per-run
multiples), so figures from a loaded or a different machine can be compared (issue 18's table 3).
The last column is the benchmark thread's CPU time per request while the device round runs (the
minimum over the runs): the device's own work where the kick is served inline, which the load
changes far less than the wall clock.

    python3 benchmarks/device_overhead.py [--seconds 3] [--runs 3] [--op read|write] [--profile]
    python3 benchmarks/device_overhead.py --trees /tmp/before,. --backends raw  # A/B of two commits
    python3 benchmarks/device_overhead.py --paths --backends null,raw  # Python vs compiled virtqueue path

``--paths``: the virtqueue's two paths (vdm.fastpath) of this checkout in child processes,
``VDM_FASTPATH=0`` (Python) and the default (compiled), a round of each in turn per run, each
with its floor; every child prints the path it ran on, so a row never claims a path it did not take.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import pstats
import select
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vdm.eventfd import EFD_CLOEXEC, EFD_NONBLOCK, eventfd
from vdm.eventloop import drain_eventfd
from vdm.interrupts import EventfdIrqLine
from vdm.ring_layout import USED_IDX
from vdm.testing import VirtioTestDriver
from vdm.testing.memory import GuestRam
from vdm.transport.mmio import MmioTransport
from vdm_blk.config import BlkConfig
from vdm_blk.device import T_IN, T_OUT, BlkDevice


class NullDisk:
    size = 1 << 30
    read_only = False
    logical_block_size = 512
    physical_block_size = 4096
    optimal_io_size = 0
    supports_discard = False
    supports_write_zeroes = False

    def readv(self, offset, buffers):
        return sum(len(b) for b in buffers)

    writev = readv
    readv_nowait = readv
    writev_inline = readv

    def flush(self):
        pass

    def close(self):
        pass


def make_backend(kind: str, tmp: str):
    if kind == "null":
        return NullDisk()
    from vdm_blk.backends import open_disk

    if kind == "qcow2":  # the raw image converted (every cluster allocated, as table 5's qcow2)
        path = os.path.join(tmp, "disk.qcow2")
        if not os.path.exists(path):
            subprocess.run(["qemu-img", "convert", "-O", "qcow2", image(tmp), path], check=True)
        return open_disk(path, format="qcow2")
    disk = open_disk(image(tmp), format="raw")
    if kind == "raw-worker":
        # the DiskBackend defaults: None = "use a worker" for every request
        disk.readv_nowait = disk.writev_inline = lambda offset, buffers: None
    return disk


def image(tmp: str) -> str:
    """The 64 MiB random file the raw backends and the floor read (made once per benchmark run)."""
    path = os.path.join(tmp, "raw.img")
    if not os.path.exists(path):
        with open(path, "wb") as f:
            f.write(os.urandom(64 << 20))
    return path


def shared_memory(ram: GuestRam, tracking: bool):
    """``ram`` as vdm-vhost-user's SharedGuestMemory over one region (no socket, no frontend)."""
    from vdm_vhost_user.memory import MemoryTable, RegionSpec, SharedGuestMemory, _Mapped

    r = ram.region
    region = _Mapped(RegionSpec(r.guest_addr, r.size, r.guest_addr, 0), None, r, True)  # type: ignore[arg-type]
    memory = SharedGuestMemory(MemoryTable([region]))
    memory.set_tracking(tracking)
    return memory


def run(
    kind: str,
    inflight: int,
    seconds: float,
    tmp: str,
    profile: bool,
    op: str = "read",
    irq: str = "recording",
) -> dict:
    base, _, shared = kind.partition("+")
    dev = BlkDevice(make_backend(base, tmp), BlkConfig(path="bench", queue_size=256))
    efd = None
    ram = GuestRam(64 << 20)
    memory = shared_memory(ram, shared == "vulog") if shared else ram.memory
    if irq == "eventfd":  # the line a VMM gives (KVM irqfd, vhost-user call fd): one eventfd write
        efd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC)
        drv = VirtioTestDriver(dev, ram=ram, transport=MmioTransport(dev, memory, EventfdIrqLine(efd)))
    else:
        drv = VirtioTestDriver(dev, ram=ram)
        if shared:
            drv.transport = MmioTransport(dev, memory, drv.irq)
    drv.init()
    q = drv.queues[0]
    heads = []
    for i in range(inflight):
        if op == "read":
            heads.append(drv.post(0, [struct.pack("<IIQ", T_IN, 0, i * 8)], [4096, 1]))
        else:
            heads.append(drv.post(0, [struct.pack("<IIQ", T_OUT, 0, i * 8), os.urandom(4096)], [1]))
    drv.kick(0)
    drv.wait(0, inflight)
    # the driver's own load of used.idx from its RAM, as a guest reads it (not the test helper's
    # copying read: that is the driver's cost, which a guest pays, not vdm)
    used = drv.ram.memory.map(q.used + USED_IDX, 2).cast("H")
    n = 0
    busy = floor_busy = cpu = 0.0
    prof = cProfile.Profile() if profile else None
    # the floor, timed round by round next to the device (module doc)
    fd = os.open(image(tmp), os.O_RDWR)
    call = os.preadv if op == "read" else os.pwritev
    buf = [memoryview(bytearray(os.urandom(4096)))]
    offsets = [i * 4096 for i in range(inflight)]
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        t0 = time.perf_counter()
        for off in offsets:
            call(fd, buf, off)
        floor_busy += time.perf_counter() - t0
        # re-publish the same chains (no kick yet: the device looks only when kicked below)
        for h in heads:
            q.publish(h)
        # used_event: interrupt when the last of the round is returned
        q.set_used_event(q.avail_idx - 1)
        target = q.avail_idx
        t0, c0 = time.perf_counter(), time.thread_time()
        if prof:
            prof.enable()
        dev.kick(0)
        if used[0] != target:  # served by a worker: wait for its interrupt
            if efd is not None:
                while used[0] != target:
                    select.select([efd], [], [], 1)
            else:
                with drv.irq.cond:
                    while used[0] != target:
                        drv.irq.cond.wait(timeout=1)
        drv.ack_interrupts()
        if prof:
            prof.disable()
        busy += time.perf_counter() - t0
        cpu += time.thread_time() - c0
        if efd is not None:
            drain_eventfd(efd)  # what the hypervisor does with an irqfd: not the device's time
        n += inflight
    dev.close()
    os.close(fd)
    if efd is not None:
        os.close(efd)
    out = {
        "backend": kind,
        "inflight": inflight,
        "requests": n,
        "req_per_s": n / busy,
        "us_per_req": busy / n * 1e6,
        "floor_us": floor_busy / n * 1e6,
        "multiple": busy / floor_busy,
        "cpu_us": cpu / n * 1e6,
        "irq": irq,
    }
    if prof:
        out["profile"] = prof
    return out


def one_round(kinds: list[str], seconds: float, tmp: str, op: str, irq: str = "recording") -> list[dict]:
    """Every row once: for each (in flight, backend), the floor, then the device (interleaved)."""
    out = []
    for inflight in (1, 8, 32):
        for kind in kinds:
            out.append(run(kind, inflight, seconds, tmp, False, op, irq))
    return out


def child_round(tree: str, a: argparse.Namespace, tmp: str, fastpath: str | None = None) -> list[dict]:
    """:func:`one_round` in a child process that imports vdm and vdm-blk from the checkout ``tree``
    (with ``VDM_FASTPATH=fastpath`` if given)."""
    root = Path(tree).resolve()
    env = dict(os.environ, PYTHONPATH=f"{root}/core/src{os.pathsep}{root}/plugins/blk/src")
    if fastpath is not None:
        env["VDM_FASTPATH"] = fastpath
    argv = [sys.executable, __file__, "--child", tmp, "--seconds", str(a.seconds),
            "--backends", a.backends, "--op", a.op, "--irq", a.irq]  # fmt: skip
    p = subprocess.run(argv, env=env, capture_output=True, text=True, check=False)
    if p.returncode != 0:
        raise SystemExit(f"the round on {tree} failed (exit {p.returncode}): {p.stderr.strip()[-500:]}")
    rows = json.loads(p.stdout)
    if fastpath is not None:
        want = "python" if fastpath == "0" else "compiled"
        got = {r["fastpath"] for r in rows}
        if got != {want} and not (want == "python" and all(g.startswith("python") for g in got)):
            raise SystemExit(f"the {want} round ran on {got}")
    return rows


def table(tree: str, kinds: list[str], rows: list[dict], op: str) -> None:
    """The Markdown table of ``rows`` (medians per row); ``tree`` (if any) as a first column."""
    call = "preadv" if op == "read" else "pwritev"
    first = "| tree " if tree else ""
    print(f"{first}| backend | in flight | requests/s | µs/request | floor: bare os.{call} (µs) | x floor "
          "| CPU µs/request |")  # fmt: skip
    print("| --- " * (8 if tree else 7) + "|")
    for kind in kinds:
        for inflight in (1, 8, 32):
            rs = [r for r in rows if r["backend"] == kind and r["inflight"] == inflight]
            rps = statistics.median(r["req_per_s"] for r in rs)
            fl = statistics.median(r["floor_us"] for r in rs)
            mult = statistics.median(r["multiple"] for r in rs)
            cpu = min(r.get("cpu_us", float("nan")) for r in rs)
            first = f"| {tree} " if tree else ""
            print(
                f"{first}| {kind} | {inflight} | {rps:,.0f} | {1e6 / rps:.1f} | {fl:.2f} | {mult:.1f} "
                f"| {cpu:.1f} |",
                flush=True,
            )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--runs", type=int, default=3, help="runs per row (median; backends interleaved)")
    ap.add_argument("--backends", default="null,raw")
    ap.add_argument("--op", choices=("read", "write"), default="read", help="4 KiB reads or writes")
    ap.add_argument(
        "--irq",
        choices=("recording", "eventfd"),
        default="recording",
        help="the transport's interrupt line: the test driver's recording line (a Condition, the "
        "table's default) or an eventfd, as a VMM gives (KVM irqfd, vhost-user call fd)",
    )
    ap.add_argument("--profile", action="store_true", help="print where the time goes (cProfile)")
    ap.add_argument(
        "--trees",
        help="DIR,DIR...: vdm checkouts (e.g. `git worktree add /tmp/old COMMIT`) measured in child "
        "processes, a round of each in turn per run: an A/B of commits in one run",
    )
    ap.add_argument(
        "--paths",
        action="store_true",
        help="measure this checkout's two virtqueue paths, Python (VDM_FASTPATH=0) and compiled, "
        "in child processes, a round of each in turn per run",
    )
    ap.add_argument("--child", metavar="TMP", help=argparse.SUPPRESS)  # one round, JSON out
    args = ap.parse_args()
    kinds = args.backends.split(",")
    if args.child:
        from vdm.fastpath import STATUS

        json.dump([{**{k: v for k, v in r.items() if k != "profile"}, "fastpath": STATUS} for r in
                   one_round(kinds, args.seconds, args.child, args.op, args.irq)], sys.stdout)  # fmt: skip
        return
    trees = args.trees.split(",") if args.trees else []
    paths = {"python": "0", "compiled": "1"} if args.paths else {}
    with tempfile.TemporaryDirectory() as tmp:
        image(tmp)
        load0 = os.getloadavg()[0]
        res: dict[str, list[dict]] = {t: [] for t in paths or trees or [""]}
        for _ in range(args.runs):
            for t in res:
                if paths:
                    res[t] += child_round(str(Path(__file__).resolve().parents[1]), args, tmp, paths[t])
                else:
                    res[t] += (
                        child_round(t, args, tmp)
                        if t
                        else one_round(kinds, args.seconds, tmp, args.op, args.irq)
                    )
        load1 = os.getloadavg()[0]
        print(
            f"4 KiB {args.op}s, {args.irq} interrupt line; load average before/after: "
            f"{load0:.2f} / {load1:.2f}; "
            f"median of {args.runs} runs of {args.seconds:g} s each\n"
        )
        if paths:
            git = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                 check=False, cwd=Path(__file__).resolve().parents[1])  # fmt: skip
            print(f"- this checkout ({git.stdout.strip()}): python = VDM_FASTPATH=0, compiled = default\n")
        elif trees:
            for t in trees:
                git = subprocess.run(["git", "-C", t, "rev-parse", "--short", "HEAD"],
                                     capture_output=True, text=True, check=False)  # fmt: skip
                print(f"- {t}: {git.stdout.strip() or 'not a git checkout'}")
            print()
        for i, t in enumerate(res):
            table(t, kinds, res[t], args.op)
            if i + 1 < len(res):
                print()
        if args.profile:
            for kind in kinds:
                r = run(kind, 32, args.seconds, tmp, True, args.op, args.irq)
                print(f"\nprofile: {kind}, 32 in flight, top 15 by own time\n```")
                pstats.Stats(r["profile"], stream=sys.stdout).sort_stats("tottime").print_stats(15)
                print("```")


if __name__ == "__main__":
    main()
