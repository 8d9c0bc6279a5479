"""Tell a stuck KVM lab (L2) from a slow one, and ask QEMU where its vCPUs are.

The lab's /init prints ``VDMLAB HB uptime_s=<s> cpu=<t0>,<t1>,...`` every 10 s, where ``tN`` is
CPU N's /proc/stat total in ticks (busy time plus idle time, which is counted live). A healthy
CPU's total always grows: busy, it takes timer ticks; idle, its idle time grows. A CPU whose total
stops has stopped taking interrupts (seen: both CPUs looping on a stale int3 in __schedule after
KVM flipped a static key; scripts/kvmlab/kvmhold.py now prevents that one); the script then waits
forever, and so did the whole test until its timeout (15 min in CI). ``Heartbeat`` notices in
under a minute.

Standard library only, like the rest of vdm_lab.
"""

from __future__ import annotations

import socket
import time
from typing import Callable

HB_PREFIX = "VDMLAB HB "


class Heartbeat:
    """Feed it L2's console lines; ``stalled()`` says why the lab is stuck, or None.

    ``silent_s``: no heartbeat for that long (counted from ``start`` until the first one, which
    comes about 10 s after the script starts). ``stuck_s``: one CPU's total unchanged that long.
    """

    def __init__(self, silent_s: float = 90, stuck_s: float = 45,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.silent_s = silent_s
        self.stuck_s = stuck_s
        self.clock = clock
        self.last_beat = clock()
        self.beats = 0
        self._cpus: list[tuple[int, float]] = []  # (last total, when it last changed)

    def on_line(self, line: str) -> None:
        """Take one console line (anything but a heartbeat is ignored)."""
        line = line.strip("\r")
        if not line.startswith(HB_PREFIX):
            return
        totals = _cpu_totals(line[len(HB_PREFIX) :])
        if totals is None:
            return
        now = self.clock()
        self.last_beat = now
        self.beats += 1
        if len(totals) != len(self._cpus):
            self._cpus = [(t, now) for t in totals]
            return
        self._cpus = [(t, now) if t != old else (old, since) for t, (old, since) in zip(totals, self._cpus)]

    def stalled(self) -> str | None:
        """Why the lab is stuck (one line), or None while it looks alive."""
        now = self.clock()
        if now - self.last_beat > self.silent_s:
            what = "no heartbeat from L2" if self.beats else "L2 printed no heartbeat"
            return f"{what} for {now - self.last_beat:.0f} s (L2's kernel or QEMU itself is stuck)"
        for cpu, (_total, since) in enumerate(self._cpus):
            if self.last_beat - since > self.stuck_s:
                return (f"L2 CPU {cpu} made no progress for {self.last_beat - since:.0f} s "
                        "(it takes no interrupts: a vCPU stuck in its nested guest)")
        return None


def _cpu_totals(fields: str) -> list[int] | None:
    for word in fields.split():
        if word.startswith("cpu="):
            try:
                return [int(x) for x in word[len("cpu=") :].split(",")]
            except ValueError:
                return None
    return None


def ask_monitor(path: str, command: str, timeout: float = 5.0) -> str:
    """Run one HMP command on QEMU's ``-monitor unix:PATH,server=on,wait=off``.

    Returns the command's output, or one line saying why it could not be had.
    """
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            s.connect(path)
            _read_until_prompt(s, timeout)
            s.sendall(command.encode() + b"\n")
            out = _read_until_prompt(s, timeout)
    except OSError as e:
        return f"(monitor {command!r} failed: {e})"
    lines = out.decode("utf-8", "replace").replace("\r", "").split("\n")
    # the first line is the monitor's readline echo of the command (with cursor escapes)
    return "\n".join(ln for ln in lines[1:] if not ln.startswith("(qemu)")).strip("\n")


def _read_until_prompt(s: socket.socket, timeout: float) -> bytes:
    buf = b""
    deadline = time.monotonic() + timeout
    while not buf.endswith(b"(qemu) ") and time.monotonic() < deadline:
        chunk = s.recv(65536)
        if not chunk:
            break
        buf += chunk
    return buf


_REGISTER_LINES = ("CPU#", "RAX=", "RSI=", "RIP=", "EAX=", "ESI=", "EIP=", "CS =", "CR0=", "EFER=")


def vcpu_summary(registers: str) -> str:
    """The lines of ``info registers -a`` that say where each vCPU is (no segments, FPU or SSE state)."""
    return "\n".join(ln for ln in registers.splitlines() if ln.startswith(_REGISTER_LINES))
