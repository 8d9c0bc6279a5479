#!/usr/bin/env python3
"""vdm-9p without a guest: per-request cost of the device path, next to the system-call floor (issue 18).

A :class:`vdm_9p.device.NinepDevice` is driven by ``vdm.testing``'s in-process virtio driver over
a share in a fresh temporary directory (the host's tmpfs or page cache: a 1 MiB file, read and
written at offset 0). For each operation the chain is posted untimed, then only the kick is timed
(the transport's notify runs ``process_queue``: pop, parse, the system call, the reply, push and
signal), then the reply is collected untimed and checked (its type, and for a read its count).

Operations: ``Tread``/``Twrite`` of 4 KiB, of 256 KiB in one buffer and in 64 buffers of 4 KiB
(what a Linux guest's zero-copy path sends: the 9P header in a buffer of its own, then the pages);
``Tgetattr``; ``Twalk``+``Tlopen``+``Tclunk`` (one open and close of a file, the three summed).
The floor is a bare ``os.preadv``/``os.pwritev`` of the same size and buffer count on the same file,
measured in the same run.

``--ref REV`` also loads vdm_9p as of git revision ``REV`` (``git archive`` of plugins/9p/src, as
a package of another name) and measures both, interleaved round by round, for an A/B in one run.

    python3 benchmarks/ninep_server.py [--iters 400] [--rounds 5] [--ref HEAD~1] [--json]

Figures are medians over rounds of the per-round median (µs per operation).
"""

from __future__ import annotations

import argparse
import importlib
import io
import json
import os
import platform
import statistics
import struct
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Callable

from vdm.testing import VirtioTestDriver

REPO = Path(__file__).resolve().parents[1]
KIB = 1024
FILE_SIZE = 1 << 20
NOFID = 0xFFFFFFFF


def _msg(mtype: int, tag: int, body: bytes) -> bytes:
    return struct.pack("<IBH", 7 + len(body), mtype, tag) + body


def _s(b: bytes) -> bytes:
    return struct.pack("<H", len(b)) + b


def load_ref(rev: str, into: Path) -> object:
    """vdm_9p as of ``rev``, imported as the package ``vdm_9p_ref`` (its imports are relative)."""
    blob = subprocess.run(
        ["git", "-C", str(REPO), "archive", rev, "plugins/9p/src/vdm_9p"],
        check=True, capture_output=True,
    ).stdout
    with tarfile.open(fileobj=io.BytesIO(blob)) as t:
        t.extractall(into, filter="data")
    pkg = into / "vdm_9p_ref"
    (into / "plugins/9p/src/vdm_9p").rename(pkg)
    sys.path.insert(0, str(into))
    return importlib.import_module("vdm_9p_ref")


class Bench:
    """One device over one share, set up (version, attach, fid 1 = the open file)."""

    def __init__(self, pkg: str, share: str) -> None:
        device = importlib.import_module(pkg + ".device")
        config = importlib.import_module(pkg + ".config")
        self.dev = device.NinepDevice(config.NinepConfig(path=share, tag="bench", queue_size=256))
        self.drv = VirtioTestDriver(self.dev, ram_size=32 << 20)
        self.drv.init()
        self.tag = 0
        self.call(100, struct.pack("<I", 1 << 20) + _s(b"9P2000.L"))
        self.call(104, struct.pack("<II", 0, NOFID) + _s(b"") + _s(b"") + struct.pack("<I", 0))
        self.call(110, struct.pack("<IIH", 0, 1, 1) + _s(b"data"))
        self.call(12, struct.pack("<II", 1, 2))  # O_RDWR

    def call(self, mtype: int, body: bytes, out_split: list[int] | None = None,
             in_lens: list[int] | None = None) -> tuple[int, bytes]:
        """One request, untimed: returns (reply type, reply)."""
        _, reply = self.timed(mtype, body, out_split, in_lens)
        return reply[4], reply

    def timed(self, mtype: int, body: bytes, out_split: list[int] | None = None,
              in_lens: list[int] | None = None) -> tuple[int, bytes]:
        """One request; returns (ns the kick took, reply). ``out_split``: lengths of the readable
        buffers after the first (the rest of the message goes in the first)."""
        self.tag = (self.tag + 1) & 0x7FFF
        msg = _msg(mtype, self.tag, body)
        out = [msg]
        if out_split:
            first = len(msg) - sum(out_split)
            out = [msg[:first]]
            pos = first
            for n in out_split:
                out.append(msg[pos : pos + n])
                pos += n
        head = self.drv.post(0, out, in_lens or [4096])
        t0 = time.perf_counter_ns()
        self.drv.kick(0)
        t1 = time.perf_counter_ns()
        (u,) = [x for x in self.drv.collect(0) if x.head == head]
        reply = u.data[: u.written]
        if reply[4] != mtype + 1:
            raise SystemExit(f"request {mtype} failed: reply {reply[:16].hex()}")
        return t1 - t0, reply

    def close(self) -> None:
        self.dev.close()


def ops(b: Bench) -> dict[str, Callable[[], int]]:
    """name -> one timed operation returning its ns."""
    data4 = os.urandom(4 * KIB)
    data256 = os.urandom(256 * KIB)

    def read(count: int, in_lens: list[int]) -> Callable[[], int]:
        def op() -> int:
            ns, reply = b.timed(116, struct.pack("<IQI", 1, 0, count), None, in_lens)
            if struct.unpack_from("<I", reply, 7)[0] != count:
                raise SystemExit("short read")
            return ns
        return op

    def write(data: bytes, split: list[int] | None) -> Callable[[], int]:
        def op() -> int:
            ns, reply = b.timed(118, struct.pack("<IQI", 1, 0, len(data)) + data, split)
            if struct.unpack_from("<I", reply, 7)[0] != len(data):
                raise SystemExit("short write")
            return ns
        return op

    def getattr_() -> int:
        return b.timed(24, struct.pack("<IQ", 1, 0x7FF), None, [4096])[0]

    def open_close() -> int:
        t = b.timed(110, struct.pack("<IIH", 0, 2, 1) + _s(b"data"))[0]
        t += b.timed(12, struct.pack("<II", 2, 0))[0]
        return t + b.timed(120, struct.pack("<I", 2))[0]

    return {
        "Tread 4 KiB": read(4 * KIB, [11 + 4 * KIB]),
        "Tread 256 KiB, 1 buffer": read(256 * KIB, [11 + 256 * KIB]),
        "Tread 256 KiB, 64 buffers": read(256 * KIB, [11] + [4 * KIB] * 64),
        "Twrite 4 KiB": write(data4, None),
        "Twrite 256 KiB, 1 buffer": write(data256, None),
        "Twrite 256 KiB, 64 buffers": write(data256, [4 * KIB] * 64),
        "Tgetattr": getattr_,
        "Twalk+Tlopen+Tclunk": open_close,
    }


def floors(path: str) -> dict[str, Callable[[], int]]:
    """The same sizes through bare os.preadv/os.pwritev (the floor), ns per call."""
    fd = os.open(path, os.O_RDWR)
    b4, b256 = bytearray(4 * KIB), bytearray(256 * KIB)
    pages = [memoryview(bytearray(4 * KIB)) for _ in range(64)]

    def timed(fn: Callable[[], int], want: int) -> Callable[[], int]:
        def op() -> int:
            t0 = time.perf_counter_ns()
            n = fn()
            t1 = time.perf_counter_ns()
            if n != want:
                raise SystemExit("short floor I/O")
            return t1 - t0
        return op

    return {
        "Tread 4 KiB": timed(lambda: os.preadv(fd, [b4], 0), 4 * KIB),
        "Tread 256 KiB, 1 buffer": timed(lambda: os.preadv(fd, [b256], 0), 256 * KIB),
        "Tread 256 KiB, 64 buffers": timed(lambda: os.preadv(fd, pages, 0), 256 * KIB),
        "Twrite 4 KiB": timed(lambda: os.pwritev(fd, [b4], 0), 4 * KIB),
        "Twrite 256 KiB, 1 buffer": timed(lambda: os.pwritev(fd, [b256], 0), 256 * KIB),
        "Twrite 256 KiB, 64 buffers": timed(lambda: os.pwritev(fd, pages, 0), 256 * KIB),
        "Tgetattr": timed(lambda: os.fstat(fd).st_size, FILE_SIZE),
        "Twalk+Tlopen+Tclunk": timed(lambda: os.close(os.open(path, os.O_RDONLY)) or 1, 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--iters", type=int, default=400, help="operations per round (default 400)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--ref", help="also measure vdm_9p as of this git revision (A/B in one run)")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="vdm-bench-9p-"))
    share = tmp / "share"
    share.mkdir()
    (share / "data").write_bytes(os.urandom(FILE_SIZE))
    floor = floors(str(share / "data"))
    setups: dict[str, dict[str, Callable[[], int]]] = {"floor (os.preadv/pwritev)": floor}
    benches = []
    if a.ref:
        load_ref(a.ref, tmp / "ref")
        benches.append((f"vdm_9p at {a.ref}", Bench("vdm_9p_ref", str(share))))
    benches.append(("vdm_9p (this tree)", Bench("vdm_9p", str(share))))
    for name, b in benches:
        setups[name] = ops(b)
    names = list(next(iter(setups.values())))
    per: dict[str, dict[str, list[float]]] = {s: {n: [] for n in names} for s in setups}
    load0 = os.getloadavg()[0]
    for _ in range(a.rounds):
        for n in names:
            for s, table in setups.items():  # interleaved: every setup in every round
                op = table[n]
                for _ in range(20):
                    op()
                per[s][n].append(statistics.median(op() for _ in range(a.iters)) / 1000)
    load1 = os.getloadavg()[0]
    for _, b in benches:
        b.close()
    res = {s: {n: statistics.median(v) for n, v in d.items()} for s, d in per.items()}
    commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
                            capture_output=True, text=True).stdout.strip()
    if a.json:
        print(json.dumps({"commit": commit, "load": [load0, load1], "us": res}, indent=1))
        return
    print(f"commit {commit}; {platform.machine()} {os.cpu_count()} cpus; load {load0:.1f} -> {load1:.1f}; "
          f"{a.rounds} rounds x {a.iters} ops, median of round medians, µs per operation")
    cols = list(setups)
    print("| operation | " + " | ".join(cols) + " | " + " | ".join(f"{c} / floor" for c in cols[1:]) + " |")
    print("| --- " * (2 * len(cols)) + "|")
    for n in names:
        vals = [res[c][n] for c in cols]
        print(f"| {n} | " + " | ".join(f"{v:.1f}" for v in vals) + " | "
              + " | ".join(f"{v / vals[0]:.1f}x" for v in vals[1:]) + " |")


if __name__ == "__main__":
    main()
