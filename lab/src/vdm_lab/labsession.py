"""One KVM lab boot shared by many scripts: each runs in its own namespaces and gets its own result.

Booting the lab costs 30-140 s of TCG; a test suite with ten lab tests paid it ten times.
When sharing is on, :func:`vdm_lab.run_in_kvm_lab` (and so ``run_vdm(where="kvmlab")``,
``run_qemu_in_kvm_lab`` and the suite's ``kvm_lab`` fixture) hands its script to a lab that stays
booted between calls, instead of booting one per call::

    from vdm_lab import labsession
    labsession.enable()          # or set VDM_LAB_SHARED=1; tests/conftest.py does it for the suite
    ...                          # every run_in_kvm_lab() now reuses one boot
    labsession.shutdown()        # also done at exit, and after ``idle_s`` without a script

Nothing changes for the caller: each call returns its own :class:`~vdm_lab.kvmlab.LabResult`
(its own output, exit code, console lines, timeout and stall). Each script runs as root in the
lab's chroot, as before, but inside fresh PID, mount, network, IPC and UTS namespaces with a
fresh tmpfs on /mnt/tmp and /dev/shm and its own /proc and /sys: when the script ends, every
process it left is killed, and its taps, mounts and files go with the namespaces. What stays from
one script to the next: loaded kernel modules, global sysctls, and the page cache of the read-only
host root (files the host *changes in place* while the lab is up may be seen stale: write new
paths, as temporary folders do).

A call gets a lab of its own (booted for it, as without sharing) when it passes ``outdir``, a
different ``memory_mib``/``cpus``/``qemu``, or ``fresh=True``, or when ``VDM_LAB_SHARED=0``.
A script that times out or a lab that stalls ends that lab: the next call boots a new one.

How it talks to the lab: the lab's script is an agent (below) that waits for ``job-N`` files in
a read-write 9p share (the host writes the path of the job's wrapper there), runs the job with
its output on ttyS1 between ``VDMLAB-JOB-BEGIN N``/``VDMLAB-JOB-END N`` lines, and writes
``rc-N`` (exit code, start and end uptime). The console (heartbeats) is read all the time.

Invariant: the lab's QEMU never outlives :func:`shutdown` or the process (atexit, and a parent-death
signal when the process is killed); one script runs at a time.
"""

from __future__ import annotations

import atexit
import os
import re
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable, Mapping

from . import labwatch
from .kit import GuestKit
from .kvmlab import LabResult, lab_command, lab_wrapper, parse_lab_console

__all__ = ["SharedLab", "current", "enable", "enabled", "shutdown"]

ENV = "VDM_LAB_SHARED"

AGENT = r"""n=1
up() { cut -d' ' -f1 /proc/uptime; }
while :; do
  while [ ! -e /mnt/out/job-$n ]; do
    [ -e /mnt/out/quit ] && exit 0
    sleep 0.3
  done
  w=$(cat /mnt/out/job-$n)
  s=$(up)
  echo "VDMLAB START job=$n uptime_s=$s" >/dev/console
  printf '\nVDMLAB-JOB-BEGIN %s\n' "$n"
  unshare --pid --fork --kill-child --mount-proc --net --ipc --uts /bin/sh -c '
    mount -t tmpfs -o mode=1777 jobtmp /mnt/tmp; mount -t tmpfs -o mode=1777 jobshm /dev/shm
    mount -t sysfs sys /sys; ip link set lo up; exec /bin/sh "$0"' "$w" </dev/null 2>&1
  rc=$?
  e=$(up)
  printf '\nVDMLAB-JOB-END %s\n' "$n"
  echo "VDMLAB RC=$rc job=$n uptime_s=$e" >/dev/console
  echo "$rc $s $e" >/mnt/out/rc-$n.tmp && mv /mnt/out/rc-$n.tmp /mnt/out/rc-$n
  n=$((n+1))
done
"""


class SharedLab:
    """A KVM lab booted once that runs scripts one after another (see the module docstring)."""

    def __init__(self, kit: GuestKit, memory_mib: int = 2048, cpus: int = 2, qemu: str = "qemu-system-x86_64",
                 idle_s: float = 120) -> None:
        self.kit, self.memory_mib, self.cpus, self.qemu, self.idle_s = kit, memory_mib, cpus, qemu, idle_s
        self._lock = threading.RLock()
        self._proc: subprocess.Popen[bytes] | None = None
        self._console: list[str] = []
        self._heartbeat = labwatch.Heartbeat()
        self._work: Path | None = None
        self._cmd: list[str] = []
        self._jobs = 0
        self._idle_timer: threading.Timer | None = None
        self._runs = 0  # calls of run() so far: an idle timer closes the lab only if none came since
        self.boots = 0  # how many times this object booted a lab

    def key(self) -> tuple:
        return (str(self.kit.vmlinux), str(self.kit.lab_initrd), self.memory_mib, self.cpus, self.qemu)

    def alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def _boot(self) -> None:
        self.close()
        work = Path(tempfile.mkdtemp(prefix="vdmlab-shared-"))
        work.chmod(0o755)
        chan = work / "chan"
        chan.mkdir()
        agent = lab_wrapper(AGENT, work, "/", None)
        monitor: Path | None = work / "monitor"
        if len(str(monitor)) > 100:
            monitor = None
        self._cmd = lab_command(agent, work / "output", kit=self.kit, memory_mib=self.memory_mib,
                                cpus=self.cpus, outdir=chan, monitor=monitor, qemu=self.qemu)
        self._work, self._console, self._jobs = work, [], 0
        self._heartbeat = labwatch.Heartbeat()
        self._proc = subprocess.Popen(self._cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, start_new_session=True,
                                      preexec_fn=_die_with_parent)
        threading.Thread(target=self._read_console, args=(self._proc, self._console, self._heartbeat),
                         daemon=True).start()
        self.boots += 1

    @staticmethod
    def _read_console(proc: subprocess.Popen[bytes], lines: list[str], heartbeat: labwatch.Heartbeat) -> None:
        assert proc.stdout is not None
        for raw in proc.stdout:
            line = raw.decode("utf-8", "replace").rstrip("\r\n")
            lines.append(line)
            heartbeat.on_line(line)

    def _close_if_idle(self, runs: int) -> None:
        with self._lock:
            if runs == self._runs:
                self.close()

    def close(self) -> None:
        """Stop the lab (QEMU killed with its process group) and remove its work folder."""
        with self._lock:
            if self._idle_timer is not None:
                self._idle_timer.cancel()
                self._idle_timer = None
            proc, self._proc = self._proc, None
            if proc is not None:
                if proc.poll() is None:
                    try:
                        os.killpg(proc.pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                proc.wait()
            if self._work is not None:
                shutil.rmtree(self._work, ignore_errors=True)
                self._work = None

    def run(self, script_text: str, timeout: float, env: Mapping[str, str] | None = None,
            cwd: str | None = None, echo: Callable[[str], None] | None = None) -> LabResult:
        """Run one script in the lab (booting it first when it is not up); its own result."""
        with self._lock:
            if self._idle_timer is not None:
                self._idle_timer.cancel()
            self._runs += 1
            t0 = time.monotonic()
            if not self.alive() or self._heartbeat.stalled() is not None:
                self._boot()
            try:
                return self._run(script_text, timeout, env, cwd, echo, t0)
            finally:
                if self.alive():
                    self._idle_timer = threading.Timer(self.idle_s, self._close_if_idle, (self._runs,))
                    self._idle_timer.daemon = True
                    self._idle_timer.start()

    def _run(self, script_text: str, timeout: float, env: Mapping[str, str] | None, cwd: str | None,
             echo: Callable[[str], None] | None, t0: float) -> LabResult:
        assert self._work is not None and self._proc is not None
        self._jobs += 1
        n = self._jobs
        chan, output_file = self._work / "chan", self._work / "output"
        console_from = len(self._console)
        with tempfile.TemporaryDirectory(prefix="vdmlab-job-") as tmp:
            jobdir = Path(tmp)
            jobdir.chmod(0o755)
            wrapper = lab_wrapper(script_text, jobdir, cwd or os.getcwd(), env)
            (chan / f"job-{n}.tmp").write_text(str(wrapper))
            os.replace(chan / f"job-{n}.tmp", chan / f"job-{n}")
            begin, end = f"\nVDMLAB-JOB-BEGIN {n}\n", f"\nVDMLAB-JOB-END {n}\n"
            rc_file = chan / f"rc-{n}"
            echoed = 0
            stall: list[str] = []
            timed_out = False
            text = ""
            while True:
                text = _job_text(output_file, begin)
                if echo is not None and text:
                    upto = text.find(end)
                    shown = text[: upto if upto >= 0 else text.rfind("\n") + 1]
                    if len(shown) > echoed:
                        echo(shown[echoed:])
                        echoed = len(shown)
                if rc_file.exists() and end in text:
                    break
                if not self.alive():
                    break
                why = self._heartbeat.stalled()
                if why is not None:
                    regs = labwatch.ask_monitor(str(self._work / "monitor"), "info registers -a")
                    stall = [why, labwatch.vcpu_summary(regs) or regs]
                    break
                if time.monotonic() - t0 > timeout:
                    timed_out = True
                    break
                time.sleep(0.2)
            elapsed = time.monotonic() - t0
            output = text.split(end, 1)[0] if end in text else text
            returncode = start = finish = None
            if rc_file.exists():
                fields = rc_file.read_text().split()
                returncode, start, finish = _int(fields, 0), _float(fields, 1), _float(fields, 2)
        console = "\n".join(self._console)
        init = parse_lab_console(console)[0]
        job_console = "\n".join(self._console[console_from:])
        result = LabResult(list(self._cmd), output, returncode, job_console, timed_out and returncode is None,
                           elapsed, init, start, finish, stalled=stall[0] if stall else None,
                           vcpus=stall[1] if stall else "", shared_job=n)
        if returncode is None:  # timed out, stalled or died: this lab is not to be trusted again
            self.close()
        return result


def _die_with_parent() -> None:
    """In the lab's QEMU before exec: SIGKILL it when the thread that booted it ends (Linux).

    atexit does not run when the process is killed (a pytest ended by ``timeout``); this does. A
    lab booted from a thread that ends goes with it; the next run() finds it gone and boots anew.
    """
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _job_text(output_file: Path, begin: str) -> str:
    try:
        data = output_file.read_bytes().decode("utf-8", "replace")
    except FileNotFoundError:
        return ""
    at = data.find(begin)
    return "" if at < 0 else data[at + len(begin):]


def _int(fields: list[str], i: int) -> int | None:
    return int(fields[i]) if len(fields) > i and re.fullmatch(r"-?\d+", fields[i]) else None


def _float(fields: list[str], i: int) -> float | None:
    try:
        return float(fields[i])
    except (IndexError, ValueError):
        return None


_state: dict[str, object] = {"on": False, "idle_s": 120.0}
_labs: dict[tuple, SharedLab] = {}
_labs_lock = threading.Lock()


def enable(idle_s: float = 120) -> None:
    """Share lab boots from now on (``VDM_LAB_SHARED=0`` in the environment overrides this)."""
    _state["on"], _state["idle_s"] = True, float(idle_s)


def enabled() -> bool:
    """Whether run_in_kvm_lab shares boots: ``VDM_LAB_SHARED`` (1/0) if set, else whether enable() ran."""
    value = os.environ.get(ENV, "")
    if value in ("0", "1"):
        return value == "1"
    return bool(_state["on"])


def current(kit: GuestKit, memory_mib: int, cpus: int, qemu: str) -> SharedLab | None:
    """The shared lab for this kit and size (created on first use), or None when sharing is off."""
    if not enabled():
        return None
    lab = SharedLab(kit, memory_mib, cpus, qemu, idle_s=float(_state["idle_s"]))  # type: ignore[arg-type]
    with _labs_lock:
        return _labs.setdefault(lab.key(), lab)


def shutdown() -> None:
    """Stop every shared lab (they boot again on the next call if sharing stays on)."""
    with _labs_lock:
        labs = list(_labs.values())
        _labs.clear()
    for lab in labs:
        lab.close()


atexit.register(shutdown)
