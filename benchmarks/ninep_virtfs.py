#!/usr/bin/env python3
"""KVM lab: a guest's work on a 9p share -- ``vdm run --9p`` vs QEMU ``-virtfs local`` (issue 21 item 1).

Both boot the same guest (the kit's vmlinux and initramfs plus the ``ninepbench`` workload below,
512 MiB, 1 vCPU, serial console) and share the same directory, ``/mnt/tmp/share`` on the lab's
tmpfs: vdm with ``--9p DIR,bench``, QEMU 7.2 with ``-virtfs local,...,security_model=none`` (or
``--model mapped-xattr``). The guest mounts it with ``trans=virtio,version=9p2000.L,msize=262144``
(cache=none, the default, for both) and, timed with the guest's clock:

- ``write``: ``dd`` of ``--mib`` MiB from /dev/zero, 1 MiB blocks, ``conv=fsync``;
- ``read``: the same file read back in 1 MiB blocks after ``drop_caches``;
- ``untar``: ``tar -x`` of a tarball of this repository's source (``git archive HEAD --paths``,
  default ``core``: 58 entries, vdm-core's source; ``core plugins`` is 253, ``.`` the whole
  repository, ~2200, most of them fuzz corpus -- nested in the lab a guest's 9p request costs tens
  of ms, so the default keeps a vdm round within minutes), copied into the guest's tmpfs first
  (untimed), onto the share, then ``sync``;
- ``walk``: ``find`` + ``ls -lR`` of the tree after ``drop_caches`` (readdir, walk, getattr);
- ``rm``: ``rm -rf`` of the tree.

Rounds run ABBA (vdm, QEMU, QEMU, vdm, ...) so drift in the lab's speed falls on both; medians.
Inside the KVM lab the guests run nested under QEMU TCG (the lab's L2 is emulated), so absolute
figures are far below bare metal; the ratio compares the two 9p servers with the same guest.

    python3 benchmarks/ninep_virtfs.py [--rounds 2] [--mib 16] [--paths core] [--model none]

On the host this boots the KVM lab and runs itself there with ``--inside``; the table is printed
on the host with the machine, the commit and the load average.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import vdm_lab

REPO = Path(__file__).resolve().parents[1]

SHARE = "/mnt/tmp/share"
TAG = "bench"
SETUPS = ("vdm run --9p", "qemu -virtfs")

#: the guest's side: every figure from the guest's clock (``now``/``calc`` are the kit's /init's)
WORKLOAD = r"""
step() { echo "VDMTEST STEP ninepbench $1 uptime_s=$(up)"; }
mkdir -p /b
O=trans=virtio,version=9p2000.L,msize=262144
mount -t 9p -o $O "$P_benchtag" /b || { result fail reason=mount; exit 0; }
D=/b/run; rm -rf $D; mkdir $D || { result fail reason=mkdir; exit 0; }
cp /b/src.tar /tmp/src.tar || { result fail reason=tarball; exit 0; }
sync; echo 3 >/proc/sys/vm/drop_caches; step write
t0=$(now); dd if=/dev/zero of=$D/large bs=1M count="$P_benchmib" conv=fsync 2>/dev/null; t1=$(now)
echo "VDMTEST FIGURE write_MiBps=$(calc "$P_benchmib" "$t1-$t0")"
echo 3 >/proc/sys/vm/drop_caches; step read
t2=$(now); n=$(dd if=$D/large bs=1M 2>/dev/null | wc -c); t3=$(now); rm $D/large
echo "VDMTEST FIGURE read_MiBps=$(calc "$P_benchmib" "$t3-$t2")"; step untar
t4=$(now); mkdir $D/x && tar -xf /tmp/src.tar -C $D/x && sync; rc=$?; t5=$(now)
echo "VDMTEST FIGURE untar_s=$(calc "$t5-$t4" 1)"
echo 3 >/proc/sys/vm/drop_caches; step walk
t6=$(now); files=$(find $D/x | wc -l); ls -lR $D/x >/dev/null; t7=$(now)
echo "VDMTEST FIGURE walk_s=$(calc "$t7-$t6" 1)"; step rm
rm -rf $D; t8=$(now); umount /b
echo "VDMTEST FIGURE rm_s=$(calc "$t8-$t7" 1)"
[ "$rc" = 0 ] && [ "$n" = $((P_benchmib << 20)) ] && st=ok || st=fail
result $st untar_rc=$rc read_bytes=$n files=$files write_MiBps=$(calc "$P_benchmib" "$t1-$t0") \
  read_MiBps=$(calc "$P_benchmib" "$t3-$t2") untar_s=$(calc "$t5-$t4" 1) walk_s=$(calc "$t7-$t6" 1) \
  rm_s=$(calc "$t8-$t7" 1)
"""

COLUMNS = [("write_MiBps", "write MiB/s"), ("read_MiBps", "read MiB/s"), ("untar_s", "untar s"),
           ("walk_s", "find+ls -lR s"), ("rm_s", "rm -rf s")]


def vmm_command(setup: str, kit: vdm_lab.GuestKit, initrd: str, params: str, model: str) -> list[str]:
    k = str(kit.vmlinux)
    if setup == "vdm run --9p":
        return ["vdm", "run", "-k", k, "-i", initrd, "-m", "512", "-c", "1", "--9p", f"{SHARE},{TAG}",
                "--console", "serial", "-p", params]
    cmd = vdm_lab.qemu_command([], [], None, kit=kit, memory_mib=512, cpus=1, kernel=k, initrd=initrd,
                               accel="kvm")
    cmd[cmd.index("-append") + 1] = "console=ttyS0 panic=-1 " + params
    return [*cmd, "-virtfs", f"local,path={SHARE},mount_tag={TAG},security_model={model}"]


def one_run(cmd: list[str], timeout: float) -> dict:
    t0 = time.monotonic()
    try:
        p = subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                           timeout=timeout)
        log, rc = p.stdout.decode("utf-8", "replace"), p.returncode
    except subprocess.TimeoutExpired as e:
        log, rc = (e.stdout or b"").decode("utf-8", "replace"), None
    _, results, _ = vdm_lab.parse_results(log)
    r = next((x for x in results if x.name == "ninepbench"), None)
    row: dict = {"rc": rc, "wall_s": round(time.monotonic() - t0, 1), "ok": bool(r and r.ok)}
    # each figure as the guest printed it, so a run cut short still has the phases it finished
    for line in log.splitlines():
        if line.startswith("VDMTEST FIGURE "):
            key, _, value = line[len("VDMTEST FIGURE "):].strip().partition("=")
            row[key] = float(value)
        elif line.startswith("VDMTEST STEP ninepbench "):
            row["last_step"] = line.split()[3]
    if r is not None:
        row["line"] = r.line
        row["files"] = r.get("files")
    if not row["ok"]:
        row["tail"] = log[-1500:]
    return row


def inside(a: argparse.Namespace) -> int:
    kit = vdm_lab.guestkit()
    params = vdm_lab.kernel_cmdline(["ninepbench"], {"benchtag": TAG, "benchmib": a.mib, "exit": "reboot"})
    params = params.replace("console=ttyS0 panic=-1 ", "")
    os.makedirs(SHARE, exist_ok=True)
    shutil.copy(a.tarball, f"{SHARE}/src.tar")
    first = SETUPS if a.start == "vdm" else SETUPS[::-1]
    order = []
    for rnd in range(a.rounds):
        order += [(rnd, s) for s in (first if rnd % 2 == 0 else first[::-1])]
    for rnd, setup in order:
        cmd = vmm_command(setup, kit, a.initrd, params, a.model)
        row = one_run(cmd, a.timeout)
        row.update(setup=setup, round=rnd, command=" ".join(shlex.quote(c) for c in cmd))
        print("BENCHJSON " + json.dumps(row), flush=True)
    return 0


def table(rows: list[dict]) -> None:
    def med(s: str, k: str) -> float | None:
        vals = [r[k] for r in rows if r["setup"] == s and k in r]
        return statistics.median(vals) if vals else None

    print("| 9p server | " + " | ".join(c for _, c in COLUMNS) + " | runs ok |")
    print("| --- " * (len(COLUMNS) + 2) + "|")
    m = {(s, k): med(s, k) for s in SETUPS for k, _ in COLUMNS}
    for s in SETUPS:
        ok = sum(1 for r in rows if r["setup"] == s and r["ok"])
        n = sum(1 for r in rows if r["setup"] == s)
        cells = [f"{m[s, k]:.2f}" if m[s, k] is not None else "-" for k, _ in COLUMNS]
        print(f"| {s} | " + " | ".join(cells) + f" | {ok}/{n} |")  # a cut-short run gives what it has
    cells = []
    for k, _ in COLUMNS:  # > 1 is vdm better: throughput vdm/QEMU, times QEMU/vdm
        v, q = m[SETUPS[0], k], m[SETUPS[1], k]
        cells.append("-" if not (v and q) else f"{v / q:.2f}" if k.endswith("MiBps") else f"{q / v:.2f}")
    print("| vdm speed / QEMU's | " + " | ".join(cells) + " | |")
    print("\nper run (round, server: figures):")
    for r in rows:
        figs = " ".join(f"{k}={r.get(k, '-')}" for k, _ in COLUMNS)
        end = "" if r["ok"] else f" (did not finish: rc={r['rc']}, last step {r.get('last_step')})"
        print(f"- {r['round']} {r['setup']}: {figs} files={r.get('files')} wall_s={r['wall_s']}{end}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=2, help="rounds of (vdm, QEMU), ABBA order (default 2)")
    ap.add_argument("--mib", type=int, default=16, help="size of the sequential file (default 16)")
    ap.add_argument("--paths", default="core", help="what of the repository to tar (git archive)")
    ap.add_argument("--model", default="none", choices=("none", "mapped-xattr"),
                    help="QEMU's security_model")
    ap.add_argument("--start", default="vdm", choices=("vdm", "qemu"), help="who runs first (ABBA)")
    ap.add_argument("--timeout", type=float, default=600, help="one guest's run, seconds")
    ap.add_argument("--inside", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--initrd", help=argparse.SUPPRESS)
    ap.add_argument("--tarball", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.inside:
        return inside(a)
    kit = vdm_lab.guestkit()
    commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    with tempfile.TemporaryDirectory(prefix="ninepbench-") as tmp:
        os.chmod(tmp, 0o755)  # the lab reads it through the host's root
        tarball = Path(tmp) / "src.tar"
        with open(tarball, "wb") as f:
            subprocess.run(["git", "-C", str(REPO), "archive", "--format=tar", "HEAD", *a.paths.split()],
                           stdout=f, check=True)
        initrd = vdm_lab.initrd_with(kit, vdm_lab.GuestSpec(workloads={"ninepbench": WORKLOAD}),
                                     Path(tmp) / "initrd", kit.initrd)
        script = (f"{shlex.quote(sys.executable)} {shlex.quote(str(Path(__file__).resolve()))} --inside "
                  f"--rounds {a.rounds} --mib {a.mib} --model {a.model} --timeout {a.timeout} "
                  f"--start {a.start} "
                  f"--initrd {shlex.quote(str(initrd))} --tarball {shlex.quote(str(tarball))}")
        load0 = os.getloadavg()
        r = vdm_lab.run_in_kvm_lab(script, timeout=600 + a.rounds * 2 * a.timeout, cwd=str(REPO),
                                   echo=lambda s: print(s, end="", file=sys.stderr, flush=True))
        load1 = os.getloadavg()
        size = tarball.stat().st_size
    rows = [json.loads(ln[len("BENCHJSON "):]) for ln in r.output.splitlines() if ln.startswith("BENCHJSON ")]
    if not rows:
        print(r.describe(), file=sys.stderr)
        return 1
    with open("/proc/cpuinfo") as f:
        cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), "?")
    print(f"machine: {cpu}, {os.cpu_count()} cores, {platform.release()}; commit {commit}; "
          f"load average before/after: {load0[0]:.2f} / {load1[0]:.2f}; {a.rounds} rounds ABBA; "
          f"{a.mib} MiB file; tarball {size / 1048576:.1f} MiB (git archive HEAD {a.paths}); "
          f"QEMU security_model={a.model}\n")
    table(rows)
    for row in rows:
        if not row["ok"]:
            print(f"\n{row['setup']} round {row['round']} failed (rc {row['rc']}):\n{row.get('tail')}",
                  file=sys.stderr)
    print("\ncommands (inside the lab):")
    for s in SETUPS:
        c = next((row["command"] for row in rows if row["setup"] == s), "")
        print(f"- {s}: `{c}`")
    return 0


if __name__ == "__main__":
    sys.exit(main())
