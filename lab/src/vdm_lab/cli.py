"""``python3 -m vdm_lab`` (or ``vdm-lab``): build the kit, boot it under QEMU, run a command in the KVM lab.

``scripts/kvmlab/run.sh`` wraps the ``lab`` command; ``kit`` prints the kit's paths.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from typing import Sequence

from .kit import GuestKitError, guestkit
from .kvmlab import run_in_kvm_lab
from .qemu import run_qemu

__all__ = ["main"]


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="vdm-lab",
                                 description="boot the vdm guest kit: under QEMU TCG or in the KVM lab")
    sub = ap.add_subparsers(dest="what", required=True)
    sub.add_parser("kit", help="build the guest kit (cached) and print its paths")
    lab = sub.add_parser("lab", help="run a shell command in the KVM lab and print its output")
    lab.add_argument("--timeout", type=float, default=900)
    lab.add_argument("--out", help="host folder shared read-write at /mnt/out")
    lab.add_argument("--memory", type=int, default=2048, help="L2 memory in MiB")
    lab.add_argument("--cpus", type=int, default=2)
    lab.add_argument("-v", "--verbose", action="store_true", help="print the L2 console too")
    lab.add_argument("command", nargs="+", help="shell command (joined with spaces)")
    q = sub.add_parser("qemu", help="boot the kit under QEMU TCG with workloads and print the log")
    q.add_argument("workloads", help="comma-separated workloads, e.g. boot,smp")
    q.add_argument("-p", "--param", action="append", default=[], help="KEY=VALUE guest parameter")
    q.add_argument("--timeout", type=float, default=120)
    q.add_argument("--fio", action="store_true", help="use the initrd with fio")
    q.add_argument("--memory", type=int, help="guest memory in MiB (default 256, 512 with --fio)")
    q.add_argument("--cpus", type=int, default=1)
    q.add_argument("--accel", default="tcg", help="tcg (default) or kvm (in the KVM lab)")
    q.epilog = "Extra QEMU arguments follow a lone --."
    args = list(sys.argv[1:] if argv is None else argv)
    qemu_extra: list[str] = []
    if "--" in args:
        i = args.index("--")
        args, qemu_extra = args[:i], args[i + 1 :]
    a = ap.parse_args(args)
    try:
        kit = guestkit()
    except GuestKitError as e:
        print(e, file=sys.stderr)
        return 2
    if a.what == "kit":
        for f in dataclasses.fields(kit):
            print(f"{f.name}: {getattr(kit, f.name)}")
        return 0
    if a.what == "lab":
        def echo(text: str) -> None:
            sys.stdout.write(text)
            sys.stdout.flush()

        r = run_in_kvm_lab(" ".join(a.command) + "\n", a.timeout, kit=kit, memory_mib=a.memory, cpus=a.cpus,
                           outdir=a.out, echo=echo)
        if a.verbose or r.returncode is None:
            print(r.console, file=sys.stderr)
        l2_init = r.init.get("uptime_s") if r.init else None
        print(f"[kvmlab: rc={r.returncode} wall={r.elapsed_s:.1f}s l2_init={l2_init}"
              f" script_start={r.start_uptime_s} script_end={r.end_uptime_s}]", file=sys.stderr)
        return 255 if r.returncode is None else r.returncode
    params = dict(p.split("=", 1) for p in a.param)
    r = run_qemu(qemu_extra, a.workloads.split(","), params, a.timeout, kit=kit,
                 initrd="fio" if a.fio else "initrd", memory_mib=a.memory, cpus=a.cpus, on_line=print,
                 accel=a.accel)
    print(f"[qemu: rc={r.returncode} timed_out={r.timed_out} wall={r.elapsed_s:.1f}s]", file=sys.stderr)
    return 0 if r.results and all(x.ok for x in r.results) else 1


if __name__ == "__main__":
    sys.exit(main())
