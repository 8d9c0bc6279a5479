"""Boot the guest kit under ``vdm run`` (KVM) with an author's devices: here, or in the KVM lab.

``vdm run`` needs a /dev/kvm that boots Linux. Where the host has none (or only ``kvm_pvm``),
:func:`run_vdm` runs the same command inside the KVM lab (:mod:`vdm_lab.kvmlab`), whose nested
/dev/kvm does; the guest's serial console (vdm's stdio) is collected either way and parsed as
VDMTEST results (:mod:`vdm_lab.results`).

Invariant: the combined initrd (kit + the author's :class:`~vdm_lab.layer.GuestSpec`) lives in a
temporary folder removed when the call returns; the lab sees it through its read-only host root.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Iterable, Mapping, Sequence

from .kit import GuestKit, guestkit
from .kvmlab import run_in_kvm_lab
from .layer import GuestSpec, initrd_with
from .process import run_logged
from .results import GuestResult, kernel_cmdline, parse_results

__all__ = ["kvm_usable", "run_vdm", "vdm_command", "vdm_run_command"]


def vdm_command() -> list[str]:
    """How to start this environment's ``vdm``: its Python with ``-m vdm.cli.main``."""
    return [os.path.realpath(sys.executable), "-m", "vdm.cli.main"]


def kvm_usable(vdm: Sequence[str] | None = None) -> bool:
    """Whether ``vdm run`` can boot here: vdm's own kvm plugin says it is available."""
    try:
        proc = subprocess.run([*(vdm or vdm_command()), "list-plugins", "--json"], capture_output=True,
                              text=True, timeout=60)
        records = json.loads(proc.stdout)["plugins"]
    except (OSError, subprocess.TimeoutExpired, ValueError, KeyError, TypeError):
        return False
    return any(r.get("name") == "kvm" and r.get("status") == "available" for r in records)


def vdm_run_command(
    vdm_args: Sequence[str],
    workloads: Iterable[str] = ("boot",),
    params: Mapping[str, object] | None = None,
    *,
    kit: GuestKit,
    initrd: os.PathLike[str] | str | None = None,
    memory_mib: int = 256,
    cpus: int = 1,
    append: str = "",
    vdm: Sequence[str] | None = None,
) -> list[str]:
    """``vdm run`` booting the kit (vmlinux, serial console on stdio) with ``vdm_args`` added.

    ``vdm_args`` are the author's devices, e.g. ``["--rng", ""]`` or ``["-d", "disk.img"]``.
    The guest reboots at the end (vdm then exits 0).
    """
    cmdline = kernel_cmdline(workloads, {"exit": "reboot", **(params or {})}, append)
    return [*(vdm or vdm_command()), "run", "-k", str(kit.vmlinux), "-i", str(initrd or kit.initrd),
            "-m", str(memory_mib), "-c", str(cpus), "--console", "serial", "-p", cmdline, *vdm_args]


def run_vdm(
    vdm_args: Sequence[str] = (),
    workloads: Iterable[str] = ("boot",),
    params: Mapping[str, object] | None = None,
    timeout: float = 600,
    *,
    kit: GuestKit | None = None,
    guest: GuestSpec | None = None,
    memory_mib: int = 256,
    cpus: int = 1,
    append: str = "",
    where: str = "auto",
    setup: str = "",
    after: str = "",
) -> GuestResult:
    """Boot the kit under ``vdm run`` with the author's ``vdm_args`` and collect its results.

    ``where``: "here" (this machine's /dev/kvm), "kvmlab" (inside the KVM lab), or "auto"
    (here when vdm's kvm plugin is available, else the lab). ``guest`` adds the author's
    modules, workloads and files. In the lab, ``setup`` is shell run before vdm (e.g. making a
    disk image under /mnt/tmp) and ``after`` shell run once vdm has exited (its output follows the
    guest's whole, e.g. a file a background job of ``setup`` wrote: anything printed while vdm
    runs shares vdm's stdout with the guest's console and can land inside a guest's line); vdm's
    exit code is the result's ``returncode``. ``timeout``
    covers the whole run (the lab's boot too).
    """
    kit = kit or guestkit()
    if where == "auto":
        where = "here" if kvm_usable() else "kvmlab"
    if where not in ("here", "kvmlab"):
        raise ValueError(f"where must be 'here', 'kvmlab' or 'auto', not {where!r}")
    with tempfile.TemporaryDirectory(prefix="vdmlab-vdmrun-") as tmp:
        os.chmod(tmp, 0o755)
        initrd = initrd_with(kit, guest, Path(tmp) / "initrd", kit.initrd) if guest else kit.initrd
        cmd = vdm_run_command(vdm_args, workloads, params, kit=kit, initrd=initrd, memory_mib=memory_mib,
                              cpus=cpus, append=append)
        if where == "here":
            log, rc, timed_out, elapsed = run_logged(cmd, timeout, None)
            init, results, done = parse_results(log)
            return GuestResult(cmd, log, rc, timed_out, elapsed, init, results, done, runner="vdm run")
        inner = max(30, int(timeout) - 120)  # leave the lab time to boot and to report
        script = "\n".join(["mkdir -p /mnt/tmp", setup, f"timeout {inner} {shlex.join(cmd)} </dev/null 2>&1",
                            "rc=$?", after, "exit $rc", ""])
        lab = run_in_kvm_lab(script, timeout, kit=kit)
    init, results, done = parse_results(lab.output)
    log = lab.output if lab.returncode is not None else lab.describe()
    return GuestResult(cmd, log, lab.returncode, lab.timed_out or lab.returncode is None, lab.elapsed_s,
                       init, results, done, runner="vdm run in the KVM lab")
