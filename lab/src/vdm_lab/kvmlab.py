"""The KVM lab: a QEMU TCG guest (L2, ``-cpu max``: AMD SVM) that loads kvm_amd and runs a script.

The lab boots the kit's kernel with its own initramfs (``lab-initrd.cpio.gz``, /init is
``scripts/kvmlab/l2-init.sh``), mounts the host's root read-only over 9p, chroots into it and runs
the caller's script there as root with a hardware-style ``/dev/kvm``: where the host's own
/dev/kvm cannot boot Linux (none, or ``kvm_pvm``), this is where ``vdm run`` and QEMU devices
that need KVM (QEMU 7.2's ``vhost-user-input-pci``) run. ``scripts/kvmlab/README.md`` has the
figures and the lab's failure modes; :mod:`vdm_lab.labwatch` tells a stuck L2 from a slow one.

Invariant: the lab's QEMU never outlives :func:`run_in_kvm_lab`; its work folder is removed.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shlex
import sys
import tempfile
import threading
from pathlib import Path
from typing import Callable, Mapping, TypeVar

from . import labwatch
from .kit import GuestKit, guestkit, kit_dir
from .process import run_logged, tail_file
from .results import VALUE_RE, parse_keyvalues

__all__ = ["LabResult", "lab_command", "lab_wrapper", "parse_lab_console", "retry_stalls", "run_in_kvm_lab"]

T = TypeVar("T")
QEMU = "qemu-system-x86_64"
ENV_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def _tail(text: str, lines: int) -> str:
    return "\n".join(text.splitlines()[-lines:])


@dataclasses.dataclass
class LabResult:
    """One run of a script in the KVM lab."""

    command: list[str]
    output: str  # the script's stdout and stderr (the lab's ttyS1)
    returncode: int | None  # the script's exit code; None when it never finished
    console: str  # the L2 console (kernel messages, VDMLAB lines)
    timed_out: bool
    elapsed_s: float
    init: dict[str, str] | None  # VDMLAB INIT keys: kernel, cpus, svm, npt, kvm_amd, devkvm, uptime_s
    start_uptime_s: float | None  # L2 uptime when the script started
    end_uptime_s: float | None  # L2 uptime when it ended
    stalled: str | None = None  # why the run was ended early: L2 stuck (labwatch.Heartbeat)
    vcpus: str = ""  # QEMU's "info registers -a" taken when L2 stalled
    earlier_stalls: list[str] = dataclasses.field(default_factory=list)  # attempts booted again
    shared_job: int = 0  # this script's number in a shared lab (vdm_lab.labsession); 0: a lab of its own

    def describe(self, lines: int = 60) -> str:
        if self.stalled:
            how = f"L2 stalled ({self.stalled})"
        else:
            how = "timed out" if self.timed_out else f"script exit code {self.returncode}"
        text = f"KVM lab: {how} after {self.elapsed_s:.1f} s\n"
        if self.shared_job:
            text += (f"(script {self.shared_job} of a shared lab boot, vdm_lab.labsession; "
                     "the console below is what L2 printed while it ran)\n")
        for i, why in enumerate(self.earlier_stalls, 1):
            text += f"(attempt {i} had stalled too: {why})\n"
        console = "\n".join(ln for ln in self.console.splitlines() if not ln.startswith(labwatch.HB_PREFIX))
        beats = [ln for ln in self.console.splitlines() if ln.startswith(labwatch.HB_PREFIX)]
        text += (f"--- last {lines} lines of the script's output ---\n{_tail(self.output, lines)}\n"
                 f"--- last {lines} lines of the L2 console (heartbeats left out) ---\n"
                 f"{_tail(console, lines)}")
        if beats:
            text += "\n--- last L2 heartbeats ---\n" + "\n".join(beats[-4:])
        if self.vcpus:
            text += "\n--- L2 vCPUs when it stalled (QEMU info registers -a) ---\n" + self.vcpus
        return text

    def assert_ok(self) -> None:
        """The script ran and exited 0."""
        if self.returncode != 0:
            raise AssertionError(self.describe())


def lab_wrapper(script_text: str, workdir: Path, cwd: str, env: Mapping[str, str] | None) -> Path:
    """Write ``script_text`` as ``workdir/script`` and return ``workdir/run``, the wrapper the lab
    executes in its chroot: it exports a usable environment (PATH with this Python's bin first,
    HOME, TMPDIR=/mnt/tmp, no colours, VDM_IN_KVM_LAB=1, VDM_GUESTKIT_DIR), then ``env`` (names
    that are not shell identifiers are left out, values quoted), changes to ``cwd`` (or / if it
    does not exist there) and execs the script: by its own ``#!`` line, else with /bin/sh. Used by
    :func:`run_in_kvm_lab` and :mod:`vdm_lab.labsession` (both write into ``workdir``, a folder
    the lab sees under the same path)."""
    user = workdir / "script"
    user.write_text(script_text)
    user.chmod(0o755)
    pybin = os.path.dirname(os.path.realpath(sys.executable))
    path = ":".join([pybin, "/usr/local/sbin", "/usr/local/bin", "/usr/sbin", "/usr/bin", "/sbin", "/bin"])
    environment = {
        "PATH": path,
        "HOME": str(Path.home()),
        "TMPDIR": "/mnt/tmp",
        "PYTHONDONTWRITEBYTECODE": "1",
        "LANG": "C.UTF-8",
        # stdout is a serial tty (so output streams line by line); keep tools from colouring it
        "TERM": "dumb",
        "NO_COLOR": "1",
        "PY_COLORS": "0",
        "VDM_IN_KVM_LAB": "1",
        "VDM_GUESTKIT_DIR": str(kit_dir()),
    }
    environment.update(env or {})
    lines = ["#!/bin/sh"]
    lines += [f"export {k}={shlex.quote(v)}" for k, v in environment.items() if ENV_RE.match(k)]
    lines.append(f"cd {shlex.quote(cwd)} 2>/dev/null || cd /")
    runner = shlex.quote(str(user)) if script_text.startswith("#!") else f"/bin/sh {shlex.quote(str(user))}"
    lines.append(f"exec {runner}")
    wrapper = workdir / "run"
    wrapper.write_text("\n".join(lines) + "\n")
    wrapper.chmod(0o755)
    return wrapper


def lab_command(wrapper: Path, output_file: Path, *, kit: GuestKit, memory_mib: int = 2048, cpus: int = 2,
                outdir: Path | None = None, monitor: Path | None = None, qemu: str = QEMU) -> list[str]:
    """The qemu-system-x86_64 command line of the lab (L2); ``monitor``: an HMP unix socket."""
    python = os.path.realpath(sys.executable)  # the interpreter l2-init.sh runs kvmhold.py with
    append = f"console=ttyS0 quiet loglevel=4 panic=-1 mitigations=off vdmlab.cmd={wrapper}"
    if VALUE_RE.match(python) and "," not in python:
        append += f" vdmlab.py={python}"
    for p in (wrapper, output_file, *([monitor] if monitor else [])):
        if not VALUE_RE.match(str(p)) or "," in str(p):
            raise ValueError(f"path {p} cannot go on a QEMU or kernel command line")
    cmd = [qemu, "-M", "q35", "-accel", "tcg,thread=multi", "-cpu", "max", "-smp", str(cpus),
           "-m", f"{memory_mib}M", "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
           "-kernel", str(kit.vmlinux), "-initrd", str(kit.lab_initrd),
           "-serial", "stdio", "-serial", f"file:{output_file}",
           "-virtfs", "local,path=/,mount_tag=hostroot,security_model=none,readonly=on,multidevs=remap"]
    if outdir is not None:
        if "," in str(outdir):
            raise ValueError(f"outdir {outdir} must not contain a comma")
        cmd += ["-virtfs", f"local,path={outdir},mount_tag=labout,security_model=none,multidevs=remap"]
        append += " vdmlab.out=1"
    if monitor is not None:
        cmd += ["-monitor", f"unix:{monitor},server=on,wait=off"]
    return [*cmd, "-append", append]


def run_in_kvm_lab(
    script_text: str,
    timeout: float = 600,
    *,
    kit: GuestKit | None = None,
    memory_mib: int = 2048,
    cpus: int = 2,
    outdir: os.PathLike[str] | str | None = None,
    env: Mapping[str, str] | None = None,
    cwd: str | None = None,
    echo: Callable[[str], None] | None = None,
    qemu: str = QEMU,
    stall_retries: int = 1,
    fresh: bool = False,
) -> LabResult:
    """Boot the KVM lab and run ``script_text`` in the host's root (chroot, read-only 9p).

    The script runs with /bin/sh (or its own ``#!`` interpreter) as root, in ``cwd`` (default: the
    current directory), with this Python's bin directory first in PATH, ``TMPDIR=/mnt/tmp`` and
    ``VDM_IN_KVM_LAB=1``; /mnt is a writable tmpfs, /dev/kvm is kvm_amd. ``outdir`` (a host
    folder) appears read-write at /mnt/out. ``echo`` receives the script's output as it comes.

    When L2 itself gets stuck (``labwatch.Heartbeat``: a CPU that takes no more interrupts, or no
    heartbeat at all) the run is ended at once, QEMU's view of the vCPUs is kept in the result,
    and the lab is booted again, up to ``stall_retries`` times; the result lists those stalls.
    A script that fails, or runs past ``timeout`` while L2 is alive, is never run again here.

    Where lab boots are shared (:mod:`vdm_lab.labsession`: ``labsession.enable()`` or
    ``VDM_LAB_SHARED=1``; the test suite turns it on) the script runs in a lab that is already
    up, in namespaces of its own, unless it passes ``outdir`` or ``fresh=True`` (a lab booted for
    it alone) or another ``memory_mib``/``cpus``/``qemu`` than that lab's.
    """
    from . import labsession  # it builds on this module

    kit = kit or guestkit()
    shared = None if fresh or outdir is not None else labsession.current(kit, memory_mib, cpus, qemu)
    if shared is not None:
        return retry_stalls(lambda: shared.run(script_text, timeout, env, cwd, echo), stall_retries)
    return retry_stalls(
        lambda: _lab_attempt(script_text, timeout, kit, memory_mib, cpus, outdir, env, cwd, echo, qemu),
        stall_retries)


def retry_stalls(attempt: Callable[[], LabResult], retries: int = 1) -> LabResult:
    """Call ``attempt`` (one lab run) again while L2 stalls, up to ``retries`` more times.

    A stall is the lab's own failure (nested SVM under TCG), not the script's: the run is booted
    again and the result's ``earlier_stalls`` lists the stalls that came before it. A script that
    fails or times out is never run again here.
    """
    earlier: list[str] = []
    while True:
        r = attempt()
        r.earlier_stalls = list(earlier)
        if r.stalled is None or len(earlier) >= retries:
            return r
        earlier.append(r.stalled)
        print(f"KVM lab: L2 stalled after {r.elapsed_s:.0f} s ({r.stalled}); booting the lab again "
              f"(attempt {len(earlier) + 1} of {retries + 1})", file=sys.stderr, flush=True)


def _lab_attempt(script_text: str, timeout: float, kit: GuestKit, memory_mib: int, cpus: int,
                 outdir: os.PathLike[str] | str | None, env: Mapping[str, str] | None, cwd: str | None,
                 echo: Callable[[str], None] | None, qemu: str) -> LabResult:
    with tempfile.TemporaryDirectory(prefix="vdmlab-") as tmp:
        work = Path(tmp)
        work.chmod(0o755)
        wrapper = lab_wrapper(script_text, work, cwd or os.getcwd(), env)
        output_file = work / "output"
        monitor: Path | None = work / "monitor"
        if len(str(monitor)) > 100:  # a unix socket path has room for 107 bytes; go without
            monitor = None
        cmd = lab_command(wrapper, output_file, kit=kit, memory_mib=memory_mib, cpus=cpus,
                          outdir=Path(outdir).resolve() if outdir is not None else None, monitor=monitor,
                          qemu=qemu)
        stop = threading.Event()
        tailer = None
        if echo is not None:
            tailer = threading.Thread(target=tail_file, args=(output_file, stop, echo), daemon=True)
            tailer.start()
        heartbeat = labwatch.Heartbeat()
        stall: list[str] = []  # [reason, vCPU registers] once L2 is found stuck

        def stuck() -> bool:
            why = heartbeat.stalled()
            if why is not None and not stall:
                regs = labwatch.ask_monitor(str(monitor), "info registers -a") if monitor else ""
                regs = labwatch.vcpu_summary(regs) or regs
                stall[:] = [why, regs]
            return why is not None

        console, _rc, timed_out, elapsed = run_logged(
            cmd, timeout, heartbeat.on_line, stop=lambda line: line.startswith("VDMLAB RC="), abort=stuck)
        stop.set()
        if tailer is not None:
            tailer.join(5)
        output = output_file.read_text(errors="replace") if output_file.exists() else ""
    init, start, end, returncode = parse_lab_console(console)
    return LabResult(cmd, output, returncode, console, timed_out and returncode is None, elapsed, init,
                     start, end, stalled=stall[0] if stall else None, vcpus=stall[1] if stall else "")


def parse_lab_console(console: str) -> tuple[dict[str, str] | None, float | None, float | None, int | None]:
    """(VDMLAB INIT keys, script start uptime, script end uptime, script exit code) from L2's console.

    Missing or garbled values come back as None.
    """
    init = None
    start = end = None
    returncode = None
    for raw in console.splitlines():
        line = raw.strip("\r")
        if line.startswith("VDMLAB INIT "):
            init = parse_keyvalues(line[len("VDMLAB INIT ") :])
        elif line.startswith("VDMLAB START "):
            start = _number(parse_keyvalues(line).get("uptime_s"), float)
        elif line.startswith("VDMLAB RC="):
            kv = parse_keyvalues(line[len("VDMLAB ") :])
            returncode = _number(kv.get("RC"), int)
            end = _number(kv.get("uptime_s"), float)
    return init, start, end, returncode


def _number(text: str | None, kind: Callable[[str], T]) -> T | None:
    """int/float of a console value, None when it is missing or garbled."""
    if text is None:
        return None
    try:
        return kind(text)
    except ValueError:
        return None


