"""The VDMTEST protocol: the guest kit's kernel command line in, its result lines out.

The guest is booted with ``console=ttyS0 panic=-1 quiet vdmtest=WL[,WL...] [vdmtest.KEY=VALUE ...]``
(:func:`kernel_cmdline`). Its /init prints ``VDMTEST INIT workloads=... kernel=...``, then one
``VDMTEST RESULT <workload> ok|fail|skip key=value ... uptime_s=<s>`` line per workload in order,
then ``VDMTEST DONE uptime_s=<s>``, and reboots (``vdmtest.exit=poweroff|none`` to change).

An author's workload (``/workloads/<name>``, see :mod:`vdm_lab.layer`) is a shell script that
/init sources in a subshell; it sees every ``vdmtest.KEY=VALUE`` as ``$P_KEY`` and reports with
``result ok|fail|skip key=value ...`` (values without spaces). One that exits without calling
``result`` is reported as ``fail reason=no_result rc=<its exit code>``.

Invariant: what reaches the kernel command line is checked here (names ``[a-z0-9_]+``, values
without spaces or quotes), so a parameter cannot add a word the caller did not mean.
"""

from __future__ import annotations

import dataclasses
import re
import shlex
from typing import Iterable, Mapping

__all__ = ["GuestResult", "WorkloadResult", "kernel_cmdline", "parse_keyvalues", "parse_results"]

RESULT_RE = re.compile(r"VDMTEST RESULT (\S+) (ok|fail|skip)\b(.*)$")
KEY_RE = re.compile(r"^[a-z0-9_]+$")
# a kernel command line value must not split into two words or carry shell/quote characters
VALUE_RE = re.compile(r"^[A-Za-z0-9_.,:/@%+=-]*$")


@dataclasses.dataclass
class WorkloadResult:
    """One ``VDMTEST RESULT <name> <status> key=value ...`` line."""

    name: str
    status: str
    values: dict[str, str]
    line: str

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def __getitem__(self, key: str) -> str:
        return self.values[key]

    def get(self, key: str, default: str | None = None) -> str | None:
        return self.values.get(key, default)


def parse_keyvalues(text: str) -> dict[str, str]:
    """``a=1 b=x`` -> {"a": "1", "b": "x"}; words without ``=`` are ignored."""
    out = {}
    for word in text.split():
        k, sep, v = word.partition("=")
        if sep:
            out[k] = v
    return out


def parse_results(log: str) -> tuple[dict[str, str] | None, list[WorkloadResult], bool]:
    """(the INIT line's keys or None, the RESULT lines in order, whether DONE was printed)."""
    init = None
    results = []
    done = False
    for raw in log.splitlines():
        line = raw.strip("\r")
        i = line.find("VDMTEST ")
        if i < 0:
            continue
        line = line[i:]
        if line.startswith("VDMTEST INIT "):
            init = parse_keyvalues(line[len("VDMTEST INIT ") :])
        elif line.startswith("VDMTEST DONE"):
            done = True
        else:
            m = RESULT_RE.match(line)
            if m:
                results.append(WorkloadResult(m.group(1), m.group(2), parse_keyvalues(m.group(3)), line))
    return init, results, done


def _tail(text: str, lines: int) -> str:
    return "\n".join(text.splitlines()[-lines:])


@dataclasses.dataclass
class GuestResult:
    """What one run of the kit (under QEMU or `vdm run`) produced."""

    command: list[str]
    log: str
    returncode: int | None
    timed_out: bool
    elapsed_s: float
    init: dict[str, str] | None
    results: list[WorkloadResult]
    done: bool
    frontend: str = ""  # "QEMU 10.0.13 from the Debian 13 root ..." when run_qemu got a QemuFrontend
    runner: str = "QEMU"  # what ran the guest: "QEMU", "vdm run", "vdm run in the KVM lab"

    def __getitem__(self, workload: str) -> WorkloadResult:
        r = self.get(workload)
        if r is None:
            raise KeyError(f"no RESULT line for {workload!r}\n{self.describe()}")
        return r

    def get(self, workload: str) -> WorkloadResult | None:
        for r in self.results:
            if r.name == workload:
                return r
        return None

    def describe(self, lines: int = 80) -> str:
        """A failure message: how the run ended and the end of the serial log."""
        how = "timed out" if self.timed_out else f"exit code {self.returncode}"
        which = f"[{self.frontend}] " if self.frontend else ""
        return (
            f"{which}{self.runner} {how} after {self.elapsed_s:.1f} s; command:\n"
            f"  {shlex.join(self.command)}\n"
            f"--- last {lines} lines of the serial log ---\n{_tail(self.log, lines)}"
        )

    def assert_ok(self, *workloads: str) -> None:
        """Every named workload printed ``ok`` (all RESULT lines when none are named)."""
        names = workloads or tuple(r.name for r in self.results)
        if not names:
            raise AssertionError(f"the guest printed no RESULT line\n{self.describe()}")
        bad = []
        for name in names:
            r = self.get(name)
            if r is None:
                bad.append(f"{name}: no RESULT line")
            elif not r.ok:
                bad.append(f"{name}: {r.line}")
        if bad:
            raise AssertionError("; ".join(bad) + "\n" + self.describe())


def kernel_cmdline(workloads: Iterable[str], params: Mapping[str, object] | None = None,
                   extra: str = "") -> str:
    """The kit's kernel command line; keys and values are checked (no spaces, no quotes)."""
    wls = list(workloads)
    for w in wls:
        if not KEY_RE.match(w):
            raise ValueError(f"bad workload name {w!r}")
    parts = ["console=ttyS0", "panic=-1", "quiet", "vdmtest=" + ",".join(wls or ["boot"])]
    for k, v in (params or {}).items():
        sv = str(v)
        if not KEY_RE.match(k) or not VALUE_RE.match(sv):
            raise ValueError(f"bad guest parameter {k}={sv!r}")
        parts.append(f"vdmtest.{k}={sv}")
    if extra:
        parts.append(extra)
    return " ".join(parts)

