#!/usr/bin/env python3
"""KVM lab: boot time and guest dd throughput — ``vdm run`` vs QEMU ``-accel kvm`` vs kvmtool.

All three boot the guest kit's bzImage (vmlinuz) and initrd.cpio.gz with 256 MiB, 1 vCPU, one
virtio-blk disk (a 64 MiB raw file on the lab's tmpfs, host page cache for all three) and the serial
console; the guest runs ``boot,blk`` (1 MiB O_DIRECT dd write then read of ``--mib`` MiB) and
reboots, which ends each VMM. Timed from the VMM's start: the guest's ``VDMTEST INIT`` line on the
console (its /init started) and the VMM's exit; the guest's own clock at /init (``init_uptime_s``)
is reported beside it, so "to /init" minus it is the VMM's own start-up (in the lab, a Python VMM
pays its imports over the 9p root under TCG). Runs are interleaved, the order reversed every other
round (a load burst from another job then hits each VMM in turn); medians of ``--runs``, and per
ratio the spread of the per-round ratios, which shows how much the machine's load moved it.

kvmtool is not part of vdm: build ``lkvm`` from its public source in a scratch folder outside the
repository and pass ``--lkvm PATH`` (the lab sees the host root read-only, so /tmp/... works).

    python3 benchmarks/kvmlab_boot.py --lkvm /tmp/kvmtool/lkvm [--runs 3]

On the host this boots the KVM lab (tests/realguest/harness.py) and runs itself there with
``--inside``; the table is printed on the host. Before that it makes what scripts/install.sh
makes and later edits of the tree leave stale (skip with ``--no-prepare``): the sources' .pyc
files (the lab's root is this one read-only, with PYTHONDONTWRITEBYTECODE: without them every
``vdm run`` compiles each module it imports, seconds under TCG) and vdm-kvm's pre-parsed KVM ABI
(``python3 -m vdm_kvm.abi_build``); the line it prints says what was done.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import vdm_lab  # noqa: E402

SETUPS = ("vdm run", "qemu -accel kvm", "lkvm run")


def vmm_command(
    setup: str, kit: vdm_lab.GuestKit, img: str, params: str, lkvm: str
) -> tuple[list[str], dict]:
    k, i = str(kit.vmlinuz), str(kit.initrd)
    env = dict(os.environ)
    if setup.startswith("vdm run @"):  # --compare: another checkout's vdm, by PYTHONPATH over the installs
        tree = Path(setup[len("vdm run @") :])
        dirs = [tree / "core" / "src", *sorted((tree / "plugins").glob("*/src")), tree / "lab" / "src"]
        env["PYTHONPATH"] = ":".join(map(str, dirs))
        setup = "vdm run"
    cmdline = "console=ttyS0 panic=-1 " + params
    # vdm run takes kvmtool's command line
    common = ["-k", k, "-i", i, "-m", "256", "-c", "1", "-d", img, "--console", "serial"]
    if setup == "vdm run":
        return ["vdm", "run", *common, "-p", cmdline], env
    if setup == "lkvm run":
        env["HOME"] = "/mnt/tmp"  # lkvm keeps its sockets in ~/.lkvm; the host root is read-only
        return [lkvm, "run", *common, "--network", "mode=none", "-p", cmdline], env
    cmd = vdm_lab.qemu_command(
        vdm_lab.virtio_blk_args(img, cache="writeback"),
        [],
        None,
        kit=kit,
        memory_mib=256,
        cpus=1,
        kernel=kit.vmlinuz,
        accel="kvm",
    )
    # qemu_command puts its own cmdline after -append; replace it with ours
    cmd[cmd.index("-append") + 1] = cmdline
    return cmd, env


def timed_boot(cmd: list[str], env: dict, timeout: float) -> dict:
    t0 = time.monotonic()
    p = subprocess.Popen(
        cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env
    )
    t_init = None
    out: list[str] = []
    assert p.stdout is not None
    for raw in p.stdout:
        line = raw.decode("utf-8", "replace").rstrip("\r\n")
        out.append(line)
        if t_init is None and "VDMTEST INIT" in line:
            t_init = time.monotonic() - t0
        if time.monotonic() - t0 > timeout:
            p.kill()
            break
    rc = p.wait()
    t_end = time.monotonic() - t0
    log = "\n".join(out)
    _, results, _ = vdm_lab.parse_results(log)
    blk = next((r for r in results if r.name == "blk"), None)
    ok = blk is not None and blk.ok
    up = re.search(r"VDMTEST INIT .*\binit_uptime_s=([0-9.]+)", log)
    return {
        "rc": rc,
        "init_s": t_init,
        "exit_s": t_end,
        "ok": ok,
        "guest_init_s": float(up.group(1)) if up else None,
        "write_MiBps": float(blk.get("seq_write_MiBps") or 0) if ok else None,
        "read_MiBps": float(blk.get("seq_read_MiBps") or 0) if ok else None,
        "tail": "" if ok else log[-1500:],
    }


def inside(a: argparse.Namespace) -> int:
    kit = vdm_lab.guestkit()
    os.makedirs("/mnt/tmp", exist_ok=True)
    img = "/mnt/tmp/bench.img"
    params = vdm_lab.kernel_cmdline(["boot", "blk"], {"mib": a.mib, "exit": "reboot"})
    params = params.replace("console=ttyS0 panic=-1 ", "")
    setups = a.setups.split(",")
    # where vdm-kvm's declarations come from in here (the install-time cache or a parse), and its cost
    probe = (
        "import time; t = time.perf_counter(); import vdm_kvm.kvm_abi as k; "
        "print(f'kvm_abi={k.SOURCE} import_s={time.perf_counter() - t:.2f}')"
    )
    info = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    said = info.stdout.strip() or f"kvm_abi probe failed: {info.stderr.strip()[-200:]}"
    print("BENCHINFO " + said, flush=True)
    for rnd in range(a.runs):
        for setup in setups if rnd % 2 == 0 else setups[::-1]:
            with open(img, "wb") as f:
                f.truncate(64 << 20)
            cmd, env = vmm_command(setup, kit, img, params, a.lkvm)
            r = timed_boot(cmd, env, a.timeout)
            r.update(setup=setup, round=rnd, command=" ".join(shlex.quote(c) for c in cmd))
            print("BENCHJSON " + json.dumps(r), flush=True)
    return 0


def table(rows: list[dict], setups: list[str]) -> None:
    def med(s: str, k: str) -> float | None:
        vals = [r[k] for r in rows if r["setup"] == s and r.get(k) is not None and r["ok"]]
        return statistics.median(vals) if vals else None

    cols = [
        ("init_s", "to /init (s)"),
        ("guest_init_s", "guest's own /init (s)"),
        ("exit_s", "to exit (s)"),
        ("write_MiBps", "dd write MiB/s"),
        ("read_MiBps", "dd read MiB/s"),
    ]
    print("| VMM | " + " | ".join(c[1] for c in cols) + " | runs ok |")
    print("| --- " * (len(cols) + 2) + "|")
    m = {(s, k): med(s, k) for s in setups for k, _ in cols}
    for s in setups:
        ok = sum(1 for r in rows if r["setup"] == s and r["ok"])
        n = sum(1 for r in rows if r["setup"] == s)
        cells = [f"{m[s, k]:.2f}" if m[s, k] is not None else "-" for k, _ in cols]
        print(f"| {s} | " + " | ".join(cells) + f" | {ok}/{n} |")

    def round_ratios(peer: str, k: str) -> list[float]:
        """vdm/peer within each round where both ran ok (same load, minutes apart)."""

        def at(rnd: int, s: str) -> float | None:
            return next((r.get(k) for r in rows if r["round"] == rnd and r["setup"] == s and r["ok"]), None)

        out = []
        for rnd in sorted({r["round"] for r in rows}):
            v, p = at(rnd, setups[0]), at(rnd, peer)
            if v and p:
                out.append(v / p)
        return out

    for peer in setups[1:]:
        cells = []
        for k, _ in cols:
            v, p = m[setups[0], k], m[peer, k]
            per = round_ratios(peer, k)
            spread = f" ({min(per):.2f}-{max(per):.2f})" if len(per) > 1 else ""
            cells.append(f"{v / p:.2f}{spread}" if v and p else "-")
        print(f"| ratio {setups[0]}/{peer} (per-round range) | " + " | ".join(cells) + " | |")


def prepare() -> str:
    """Byte-compile the tree's sources and build vdm-kvm's ABI cache, as an install does; one line."""
    plugins = sorted((REPO / "plugins").glob("*/src"))
    dirs = [str(d) for d in (REPO / "core" / "src", *plugins, REPO / "lab" / "src")]
    c = subprocess.run([sys.executable, "-m", "compileall", "-q", *dirs], capture_output=True, text=True)
    abi = subprocess.run([sys.executable, "-m", "vdm_kvm.abi_build"], capture_output=True, text=True)
    compiled = "sources byte-compiled" if c.returncode == 0 else f"compileall failed (rc {c.returncode})"
    said = (abi.stdout or abi.stderr).strip().splitlines()
    return f"prepared: {compiled}; {said[-1] if said else 'vdm_kvm.abi_build said nothing'}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--mib", type=int, default=16)
    ap.add_argument("--lkvm", default="/tmp/kvmtool/lkvm")
    ap.add_argument("--setups", default=",".join(SETUPS))
    ap.add_argument("--timeout", type=float, default=300)
    ap.add_argument(
        "--compare",
        metavar="CHECKOUT",
        help="also run the vdm of another checkout (a git worktree; its sources on PYTHONPATH) "
        "as setup 'vdm run @CHECKOUT', interleaved with the others",
    )
    ap.add_argument(
        "--no-prepare",
        action="store_true",
        help="measure the tree as it is: no byte-compiling, no kvm ABI cache build",
    )
    ap.add_argument("--inside", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.inside:
        return inside(a)
    if a.compare:
        a.setups += f",vdm run @{Path(a.compare).resolve()}"
    prepared = "not prepared (--no-prepare)" if a.no_prepare else prepare()
    print(prepared, file=sys.stderr)
    script = (
        f"{shlex.quote(sys.executable)} {shlex.quote(str(Path(__file__).resolve()))} --inside "
        f"--runs {a.runs} --mib {a.mib} --lkvm {shlex.quote(a.lkvm)} --setups {shlex.quote(a.setups)} "
        f"--timeout {a.timeout}"
    )
    load0 = os.getloadavg()
    # PYTHONPATH goes along (as in net_lab.py): the lab's shell starts with a clean environment, and
    # without it the lab's Python finds only the installed packages, if any
    env = {"PYTHONPATH": os.environ["PYTHONPATH"]} if os.environ.get("PYTHONPATH") else None
    r = vdm_lab.run_in_kvm_lab(
        script,
        timeout=600 + a.runs * 3 * a.timeout,
        cwd=str(REPO),
        env=env,
        echo=lambda s: print(s, end="", file=sys.stderr, flush=True),
    )
    load1 = os.getloadavg()
    rows = [
        json.loads(ln[len("BENCHJSON ") :]) for ln in r.output.splitlines() if ln.startswith("BENCHJSON ")
    ]
    if not rows:
        print(r.describe(), file=sys.stderr)
        return 1
    infos = [ln[len("BENCHINFO ") :] for ln in r.output.splitlines() if ln.startswith("BENCHINFO ")]
    print(
        f"load average before/after: {load0[0]:.2f} / {load1[0]:.2f}; {a.runs} runs each, "
        f"guest dd {a.mib} MiB; {prepared}; in the lab: {'; '.join(infos) or '?'}\n"
    )
    table(rows, a.setups.split(","))
    for row in rows:
        if not row["ok"]:
            print(
                f"\n{row['setup']} round {row['round']} failed (rc {row['rc']}):\n{row['tail']}",
                file=sys.stderr,
            )
    print("\ncommands (inside the lab):")
    for s in a.setups.split(","):
        c = next((row["command"] for row in rows if row["setup"] == s), "")
        print(f"- {s}: `{c}`")
    return 0


if __name__ == "__main__":
    sys.exit(main())
