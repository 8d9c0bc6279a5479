"""What the guest-free vhost-user-blk benchmarks share: the libblkio client, the backends it drives,
their command line, the interleaved runs and the line that heads their results.

The client is ``scripts/frontends/blkio_frontend.c`` on libblkio 1.5's ``virtio-blk-vhost-user``
driver, built and run inside the Debian 13 root (``scripts/frontends/build.sh``): one thread, one
queue, requests submitted as soon as a slot frees, completions waited for on the call eventfd.
Used by ``vhost_user_blk_free.py``, ``vhost_user_blk_nbd.py`` and ``vhost_user_n_devices.py``.

Invariant: every backend is a process that serves one socket (or, for ``vdm vhost-user -s ... -s``,
several) for the whole benchmark; :class:`Backend` waits until the socket exists and
:meth:`Backend.stop` always ends the process (terminate, then kill).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Mapping, Sequence

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from vdm_lab import debian13  # noqa: E402

sys.path.insert(0, str(REPO / "benchmarks"))
from proc_cost import cost  # noqa: E402

BUILD = REPO / "scripts" / "frontends" / "build.sh"
RESULT = re.compile(r"^RESULT .*ios=(\d+) seconds=([\d.]+) iops=([\d.]+) mibps=([\d.]+) "
                    r"p50_us=([\d.]+) p99_us=([\d.]+) errors=0$", re.M)  # fmt: skip
#: seconds the client runs before it measures
WARMUP = 0.5
#: (client mode, block size, queue depth)
Row = tuple[str, str, int]


def vdm_base() -> list[str]:
    """The command that starts vdm: the installed ``vdm``, else this Python's ``-m vdm.cli.main``."""
    exe = shutil.which("vdm")
    return [exe] if exe else [sys.executable, "-m", "vdm.cli.main"]


def qsd_cmd(protocol: str, fmt: str, sock: Path) -> list[str]:
    """qemu-storage-daemon exporting a vhost-user-blk device at ``sock``: ``protocol`` is the
    protocol blockdev's options without its node name (``driver=nbd,...``); a format other than raw
    is layered on it, as vdm layers formats on protocols."""
    proto = "d" if fmt == "raw" else "p"
    args = ["qemu-storage-daemon", "--blockdev", f"{protocol},node-name={proto}"]
    if fmt != "raw":
        args += ["--blockdev", f"driver={fmt},node-name=d,file={proto}"]
    export = f"type=vhost-user-blk,id=e,node-name=d,addr.type=unix,addr.path={sock},writable=on"
    return [*args, "--export", export]


class Backend:
    """One backend process serving ``sock`` for the whole benchmark."""

    def __init__(self, name: str, argv: list[str], sock: Path, log: Path) -> None:
        self.name, self.sock = name, sock
        self._log = open(log, "ab")  # closed in stop()
        self.proc = subprocess.Popen(argv, stdout=self._log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        while not sock.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"{name} did not listen on {sock}: {log.read_text()[-2000:]}")
            time.sleep(0.05)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


def arguments(doc: str, *, mib: int, more: Callable[[argparse.ArgumentParser], None] | None = None):
    """The benchmarks' command line: ``--runs``, ``--time``, ``--mib`` (default ``mib``), plus what
    ``more`` adds."""
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--time", type=float, default=3, help="seconds per measurement (after 0.5 s warm-up)")
    ap.add_argument("--mib", type=int, default=mib, help="image size and the range the client touches")
    if more is not None:
        more(ap)
    return ap.parse_args()


def client() -> tuple[debian13.Debian13Root, Path]:
    """The Debian 13 root and the client binary built in it."""
    root = debian13.build()
    out = subprocess.run(["bash", str(BUILD)], check=True, capture_output=True, text=True).stdout
    return root, Path(out.strip().splitlines()[-1])


def random_image(path: Path, mib: int) -> Path:
    """``mib`` MiB of random data (reads hit data, not holes)."""
    with open(path, "wb") as f:
        for _ in range(mib):
            f.write(os.urandom(1 << 20))
    return path


def make_images(tmp: Path, mib: int, formats: list[str]) -> dict[str, Path]:
    """One copy of one random image per ``"vdm FMT"`` and ``"qsd FMT"`` (qcow2: ``qemu-img convert``)."""
    raw = random_image(tmp / "seed.raw", mib)
    out = {}
    for fmt in formats:
        for who in ("vdm", "qsd"):
            path = tmp / f"{who}.{fmt}"
            if fmt == "raw":
                shutil.copyfile(raw, path)
            else:
                subprocess.run(["qemu-img", "convert", "-O", fmt, str(raw), str(path)], check=True)
            out[f"{who} {fmt}"] = path
    raw.unlink()
    return out


def run_client(
    root: debian13.Debian13Root, binary: Path, sock: Path, row: Row, seconds: float, mib: int
) -> dict[str, float]:
    """One client run on ``sock``: its IOPS, MiB/s and p50/p99 latency (µs)."""
    mode, bs, qd = row
    argv = [str(binary), "--path", str(sock), "--mode", mode, "--bs", bs, "--qd", str(qd),
            "--size", f"{mib}M", "--time", str(seconds), "--warmup", str(WARMUP)]  # fmt: skip
    p = root.run(argv, visible=[binary.parent, sock.parent], timeout=60 + 2 * seconds)
    m = RESULT.search(p.stdout)
    if p.returncode != 0 or not m:
        raise RuntimeError(f"blkio_frontend {' '.join(argv[1:])}: exit {p.returncode}\n{p.stdout}{p.stderr}")
    if int(m.group(1)) == 0:  # (a run too short or a stuck backend: its ratio cell says failed)
        print(f"# failed run: {mode} {bs} qd{qd} on {sock.name} completed no request in {seconds:g} s",
              file=sys.stderr, flush=True)  # fmt: skip
    return {"iops": float(m.group(3)), "mibps": float(m.group(4)), "p50": float(m.group(5)),
            "p99": float(m.group(6))}  # fmt: skip


def interleaved(
    root: debian13.Debian13Root,
    binary: Path,
    socks: dict[str, Path],
    rows: Sequence[Row],
    a: argparse.Namespace,
    pids: Mapping[str, int] | None = None,
) -> tuple[dict[tuple[str, int], list[dict[str, float]]], tuple[float, float]]:
    """Every row on every setup (``socks``: setup -> socket), ``a.runs`` times, the setups' order
    rotating per run. Returns {(setup, row index): [one result per run]} and the load average
    before and after. With ``pids`` (setup -> backend process) each result also has ``cpu_us``:
    the backend's CPU time per request over the whole client run (its connection and warm-up
    included, counted at the measured rate)."""
    setups = list(socks)
    res: dict[tuple[str, int], list[dict[str, float]]] = {
        (s, i): [] for s in setups for i in range(len(rows))
    }
    load0 = os.getloadavg()[0]
    for run in range(a.runs):
        order = setups[run % len(setups) :] + setups[: run % len(setups)]
        for i, row in enumerate(rows):
            for s in order:
                before = cost(pids[s]) if pids else None
                r = run_client(root, binary, socks[s], row, a.time, a.mib)
                if before is not None and pids and r["iops"]:
                    r["cpu_us"] = (cost(pids[s])[0] - before[0]) * 1e6 / (r["iops"] * (a.time + WARMUP))
                res[(s, i)].append(r)
        print(f"# run {run + 1} of {a.runs} done", file=sys.stderr, flush=True)
    return res, (load0, os.getloadavg()[0])


def median(results: list[dict[str, float]], key: str) -> float:
    return statistics.median(r[key] for r in results)


def header(
    root: debian13.Debian13Root, a: argparse.Namespace, loads: tuple[float, float], note: str = ""
) -> str:
    """The line above a result table: vdm's commit, libblkio's version, ``note``, when, the load."""
    git = subprocess.run(
        ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    )
    return (
        f"vdm at {git.stdout.strip()}, libblkio {root.info.get('libblkio1', '?')}{note}, "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; load average before/after: "
        f"{loads[0]:.2f} / {loads[1]:.2f}; {a.runs} runs, {a.time:g} s each, {a.mib} MiB images\n"
    )


def ratio(a: float, b: float) -> str:
    """``a / b`` for a table cell; "failed" when either side completed no request (its median 0)."""
    return f"{a / b:.2f}" if a and b else "failed"


def ratio_table(
    title: str,
    res: dict[tuple[str, int], list[dict[str, float]]],
    formats: list[str],
    rows: Sequence[Row],
) -> None:
    """Print the medians of every ``"vdm FMT"`` and ``"qsd FMT"`` setup per row (MiB/s for 1 MiB
    rows, else IOPS) and the ratio vdm/qsd per format, as a Markdown table headed ``title``."""
    setups = [f"{who} {fmt}" for fmt in formats for who in ("vdm", "qsd")]
    print(f"| {title} | " + " | ".join(setups) + " | " + " | ".join(f"vdm/qsd {f}" for f in formats) + " |")
    print("| --- " * (1 + len(setups) + len(formats)) + "|")
    for i, (mode, bs, qd) in enumerate(rows):
        mb = bs == "1m"
        med = {s: median(res[(s, i)], "mibps" if mb else "iops") for s in setups}
        cells = [f"{med[s]:,.1f}" if mb else f"{med[s]:,.0f}" for s in setups]
        ratios = [ratio(med[f"vdm {f}"], med[f"qsd {f}"]) for f in formats]
        unit = "MiB/s" if mb else "IOPS"
        print(f"| {mode} {bs} qd{qd} ({unit}) | " + " | ".join(cells + ratios) + " |", flush=True)
