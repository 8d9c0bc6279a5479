"""labwatch: telling a stuck KVM lab from a slow one (no guest needed)."""

from __future__ import annotations

import os
import socket
import subprocess
import time
from pathlib import Path

import pytest
from vdm_lab import labwatch
from vdm_lab.kvmlab import LabResult, retry_stalls


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def beat(hb: labwatch.Heartbeat, clock: Clock, *totals: int, after: float = 10) -> None:
    clock.now += after
    hb.on_line(f"VDMLAB HB uptime_s={clock.now:.2f} cpu={','.join(map(str, totals))}\r")


def test_growing_cpus_are_alive_however_long_the_script_runs() -> None:
    clock = Clock()
    hb = labwatch.Heartbeat(silent_s=90, stuck_s=45, clock=clock)
    for i in range(100):  # 1000 s of a busy CPU 0 and an idle CPU 1
        beat(hb, clock, 1000 + 10 * i, 500 + 3 * i)
        assert hb.stalled() is None


def test_a_cpu_whose_ticks_stop_is_reported_within_a_minute() -> None:
    clock = Clock()
    hb = labwatch.Heartbeat(silent_s=90, stuck_s=45, clock=clock)
    beat(hb, clock, 100, 100)
    for i in range(1, 5):
        beat(hb, clock, 100 + 10 * i, 100)
        assert hb.stalled() is None, i
    beat(hb, clock, 200, 100)  # CPU 1 unchanged for 50 s
    why = hb.stalled()
    assert why is not None and "CPU 1" in why and "50 s" in why


def test_silence_is_reported_before_and_after_the_first_heartbeat() -> None:
    clock = Clock()
    hb = labwatch.Heartbeat(silent_s=90, stuck_s=45, clock=clock)
    clock.now += 80
    assert hb.stalled() is None
    clock.now += 20
    assert "printed no heartbeat" in (hb.stalled() or "")
    beat(hb, clock, 1, 1, after=0)
    assert hb.stalled() is None
    clock.now += 91
    assert "no heartbeat from L2 for 91 s" in (hb.stalled() or "")


def test_other_lines_and_garbled_heartbeats_change_nothing() -> None:
    clock = Clock()
    hb = labwatch.Heartbeat(silent_s=90, stuck_s=45, clock=clock)
    for line in ("VDMLAB START uptime_s=3", "VDMLAB HB uptime_s=4 cpu=1,x", "[  12.0] kvm: something"):
        clock.now += 31
        hb.on_line(line)
    assert hb.beats == 0
    assert hb.stalled() is not None


def test_a_cpu_count_change_starts_the_count_again() -> None:
    clock = Clock()
    hb = labwatch.Heartbeat(silent_s=90, stuck_s=45, clock=clock)
    beat(hb, clock, 5)
    beat(hb, clock, 5, 5, after=50)
    assert hb.stalled() is None


@pytest.mark.skipif(not any(os.access(os.path.join(d, "qemu-system-x86_64"), os.X_OK)
                            for d in os.environ.get("PATH", "").split(os.pathsep)),
                    reason="qemu-system-x86_64 is not installed")
def test_ask_monitor_reads_where_a_real_qemus_vcpus_are(tmp_path: Path) -> None:
    sock = tmp_path / "mon"
    qemu = subprocess.Popen(["qemu-system-x86_64", "-accel", "tcg", "-smp", "2", "-display", "none",
                             "-nodefaults", "-S", "-monitor", f"unix:{sock},server=on,wait=off"],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(100):
            if sock.exists():
                break
            time.sleep(0.05)
        summary = labwatch.vcpu_summary(labwatch.ask_monitor(str(sock), "info registers -a"))
    finally:
        qemu.kill()
        qemu.wait()
    lines = summary.splitlines()
    assert [ln for ln in lines if ln.startswith("CPU#")] == ["CPU#0", "CPU#1"], summary
    # both CPUs sit at the reset vector (stopped with -S)
    assert sum("EIP=0000fff0" in ln for ln in lines) == 2, summary
    assert "\x1b" not in summary


def test_ask_monitor_says_why_when_there_is_no_monitor(tmp_path: Path) -> None:
    path = tmp_path / "none"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:  # a socket nobody listens on
        s.bind(str(path))
    out = labwatch.ask_monitor(str(path), "info cpus", timeout=1)
    assert out.startswith("(monitor 'info cpus' failed:"), out


def _result(stalled: str | None, returncode: int | None) -> LabResult:
    return LabResult(["qemu"], "", returncode, "", False, 1.0, None, None, None, stalled=stalled)


def test_a_stalled_lab_run_is_booted_again_once_and_its_stall_is_kept(capsys) -> None:
    runs = iter([_result("no heartbeat for 90 s", None), _result(None, 0)])
    r = retry_stalls(lambda: next(runs))
    assert r.returncode == 0 and r.earlier_stalls == ["no heartbeat for 90 s"]
    assert "booting the lab again (attempt 2 of 2)" in capsys.readouterr().err


def test_a_second_stall_or_a_failed_script_is_not_run_again() -> None:
    calls = []

    def attempt(r: LabResult) -> LabResult:
        calls.append(r)
        return r

    stalled = retry_stalls(lambda: attempt(_result("stuck", None)))
    assert stalled.stalled == "stuck" and stalled.earlier_stalls == ["stuck"] and len(calls) == 2
    calls.clear()
    failed = retry_stalls(lambda: attempt(_result(None, 3)))
    assert failed.returncode == 3 and failed.earlier_stalls == [] and len(calls) == 1
