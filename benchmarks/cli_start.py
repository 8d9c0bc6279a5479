#!/usr/bin/env python3
"""CLI start: wall time of ``vdm list-plugins`` with all plugins installed (median of ``--runs``).

Two ways in: the console script pip installed next to this Python (what a venv user runs), and
``vdm`` as found on PATH (here a pyenv shim, a bash script that execs pyenv first). Also the bare
interpreter start, which is the floor.

    python3 benchmarks/cli_start.py [--runs 7]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path


def wall(cmd: list[str], runs: int, env: dict[str, str]) -> list[float]:
    subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True, env=env)  # warm-up
    out = []
    for _ in range(runs):
        t0 = time.perf_counter()
        subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True, env=env)
        out.append(time.perf_counter() - t0)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--no-bytecode", action="store_true", help="keep PYTHONDONTWRITEBYTECODE as it is")
    a = ap.parse_args()
    script = Path(sys.executable).resolve().parent / "vdm"
    rows = [("python -c pass (floor)", [sys.executable, "-c", "pass"]),
            (f"{script} list-plugins", [str(script), "list-plugins"])]
    on_path = shutil.which("vdm")
    if on_path and Path(on_path).resolve() != script.resolve():
        rows.append((f"{on_path} list-plugins (PATH)", [on_path, "list-plugins"]))
    env = dict(os.environ)
    if not a.no_bytecode:
        # a normal install has bytecode caches; PYTHONDONTWRITEBYTECODE=1 (set in some CI and
        # sandbox shells) makes every start compile all of vdm's modules from source
        env.pop("PYTHONDONTWRITEBYTECODE", None)
    print(f"load average: {os.getloadavg()[0]:.2f}; median of {a.runs} runs after one warm-up; "
          f"PYTHONDONTWRITEBYTECODE={env.get('PYTHONDONTWRITEBYTECODE', 'unset')}\n")
    print("| command | median s | min s | max s |")
    print("| --- | --- | --- | --- |")
    for name, cmd in rows:
        t = wall(cmd, a.runs, env)
        print(f"| `{name}` | {statistics.median(t):.3f} | {min(t):.3f} | {max(t):.3f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
