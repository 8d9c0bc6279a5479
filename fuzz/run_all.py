#!/usr/bin/env python3
"""Run vdm's fuzz targets: each for a bounded time from its committed corpus, then its regressions.

    python3 fuzz/run_all.py [--seconds 30] [--target NAME ...] [--keep DIR]

New corpus entries go to a temporary folder (or ``--keep DIR``), so the committed corpus only
grows when someone copies entries back on purpose. A crash or timeout stops with its input saved
and the command to reproduce it. Each target's last line (executions, coverage) is printed.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
DONE_RE = re.compile(r"#(\d+)\s+DONE\s+cov: (\d+) ft: (\d+) corp: (\d+)")
#: libFuzzer's line once every seed input has run (before the timed fuzzing; printed even when the
#: replay takes longer than -max_total_time, which only bounds the fuzzing after it)
INITED_RE = re.compile(r"#(\d+)\s+INITED\s")
#: per-target libFuzzer options
OPTIONS = {"qcow2": ["-max_len=65536"]}


def targets() -> list[str]:
    return sorted(p.stem[len("fuzz_") :] for p in HERE.glob("fuzz_*.py"))


def run_target(name: str, seconds: int, workdir: Path) -> dict:
    corpus = HERE / "corpus" / name
    fresh = workdir / name
    fresh.mkdir(parents=True, exist_ok=True)
    artifacts = workdir / f"{name}-artifacts"
    artifacts.mkdir(exist_ok=True)
    cmd = [
        sys.executable,
        str(HERE / f"fuzz_{name}.py"),
        f"-max_total_time={seconds}",
        "-timeout=20",
        "-rss_limit_mb=2048",
        f"-artifact_prefix={artifacts}/",
        *OPTIONS.get(name, []),
        str(fresh),
    ]
    if corpus.is_dir():
        cmd.append(str(corpus))
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 300)
    out = proc.stdout + proc.stderr
    m = DONE_RE.search(out)
    result = {"target": name, "returncode": proc.returncode, "command": " ".join(cmd)}
    inited = INITED_RE.search(out)
    if inited:
        result["replayed"] = int(inited.group(1))
    if m:
        result.update(execs=int(m.group(1)), cov=int(m.group(2)), ft=int(m.group(3)), corpus=int(m.group(4)))
    found = sorted(artifacts.iterdir())
    if proc.returncode != 0 or found:
        result["artifacts"] = [str(p) for p in found]
        result["tail"] = "\n".join(out.splitlines()[-40:])
    # regressions: every input that once crashed must now pass
    reg = HERE / "regressions" / name
    if reg.is_dir() and proc.returncode == 0:
        inputs = sorted(str(p) for p in reg.iterdir() if p.is_file())
        if inputs:
            rproc = subprocess.run(
                [
                    sys.executable,
                    str(HERE / f"fuzz_{name}.py"),
                    "-timeout=20",
                    *OPTIONS.get(name, []),
                    *inputs,
                ],
                capture_output=True,
                text=True,
                timeout=600,
            )
            result["regressions"] = len(inputs)
            if rproc.returncode != 0:
                result["returncode"] = rproc.returncode
                result["tail"] = "\n".join((rproc.stdout + rproc.stderr).splitlines()[-40:])
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=int, default=30)
    ap.add_argument("--target", action="append", choices=targets())
    ap.add_argument("--keep", help="keep new corpus entries and artifacts here")
    args = ap.parse_args(argv)
    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="vdm-fuzz-"))
    failed = 0
    for name in args.target or targets():
        r = run_target(name, args.seconds, work)
        status = "ok" if r["returncode"] == 0 else "FAILED"
        print(
            f"fuzz {name}: {status} execs={r.get('execs', '?')} cov={r.get('cov', '?')} "
            f"ft={r.get('ft', '?')} corpus={r.get('corpus', '?')} regressions={r.get('regressions', 0)}",
            flush=True,
        )
        if r["returncode"] != 0:
            failed += 1
            print(f"  reproduce: {r['command']}\n  artifacts: {r.get('artifacts')}\n{r.get('tail', '')}")
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
