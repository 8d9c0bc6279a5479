"""Running a guest's process: its output line by line, a deadline, and a kill of its whole group.

Invariant: a process started here never outlives the call (its process group is killed on
timeout or abort, and waited for).
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Callable, Sequence

__all__ = ["run_logged", "tail_file"]


def run_logged(cmd: Sequence[str], timeout: float, on_line: Callable[[str], None] | None,
                stop: Callable[[str], bool] | None = None,
                abort: Callable[[], bool] | None = None) -> tuple[str, int | None, bool, float]:
    """Run cmd with stdout+stderr captured line by line; kill its process group on timeout.

    ``abort`` is polled a few times a second; when it returns True the run is killed as if it
    had timed out. Returns (log, returncode or None when killed, timed_out, elapsed seconds).
    """
    t0 = time.monotonic()
    proc = subprocess.Popen(list(cmd), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, start_new_session=True)
    lines: list[str] = []
    stopped = threading.Event()

    def reader() -> None:
        assert proc.stdout is not None
        for raw in proc.stdout:
            line = raw.decode("utf-8", "replace").rstrip("\r\n")
            lines.append(line)
            if on_line is not None:
                try:
                    on_line(line)
                except Exception as e:  # a callback's error must not hang the run
                    lines.append(f"HARNESS on_line callback raised {e!r}")
            if stop is not None and stop(line):
                stopped.set()

    th = threading.Thread(target=reader, daemon=True)
    th.start()
    timed_out = False
    deadline = t0 + timeout
    while proc.poll() is None:
        if stopped.is_set():
            try:  # let the guest finish its shutdown, then make sure it ends
                proc.wait(3)
            except subprocess.TimeoutExpired:
                _kill_group(proc)
            break
        if time.monotonic() > deadline or (abort is not None and abort()):
            timed_out = True
            _kill_group(proc)
            break
        time.sleep(0.05)
    proc.wait()
    th.join(5)
    elapsed = time.monotonic() - t0
    rc = None if timed_out else proc.returncode
    return "\n".join(lines), rc, timed_out, elapsed


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass



def tail_file(path: Path, stop: threading.Event, sink: Callable[[str], None]) -> None:
    """Copy what is appended to path to sink until stop is set (then copy the rest)."""
    pos = 0
    while True:
        last = stop.is_set()
        try:
            with open(path, "rb") as f:
                f.seek(pos)
                data = f.read()
        except FileNotFoundError:
            data = b""
        if data:
            pos += len(data)
            sink(data.decode("utf-8", "replace"))
        if last:
            return
        stop.wait(0.2)

