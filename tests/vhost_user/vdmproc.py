"""``vdm vhost-user`` as a subprocess, for the real-guest tests and the benchmark."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from typing import Sequence


class VdmProcess:
    """One ``vdm -v vhost-user --socket-path PATH <device options>``; its output is kept in ``lines``."""

    def __init__(self, socket_path: str, *device_args: str, wrap: Sequence[str] = ()) -> None:
        """``wrap`` goes before the command (``NetNs.argv([])``: run vdm inside a namespace)."""
        self.socket_path = socket_path
        self.args = [*wrap, sys.executable, "-m", "vdm.cli.main", "-v", "vhost-user"]
        self.args += ["--socket-path", socket_path, *device_args]
        self.lines: list[str] = []
        self._serving = threading.Event()
        self.proc = subprocess.Popen(self.args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        if not self._serving.wait(20) or not os.path.exists(socket_path):
            self.kill()
            raise RuntimeError("vdm vhost-user did not start:\n" + self.output)

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            line = raw.decode("utf-8", "replace").rstrip("\n")
            self.lines.append(line)
            if line.startswith("vdm: serving "):
                self._serving.set()

    @property
    def output(self) -> str:
        return "\n".join(self.lines)

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def count(self, text: str) -> int:
        return sum(text in line for line in self.lines)

    def kill(self) -> None:
        """SIGKILL: no cleanup at all (the socket file stays)."""
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()
        self._reader.join(5)

    def stop(self, timeout: float = 20) -> int:
        """SIGTERM and wait; returns the exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            rc = -9
        self._reader.join(5)
        return rc


def wait_allocated(path: str, nbytes: int, timeout: float, stop: threading.Event | None = None) -> bool:
    """Wait until the (sparse) file at ``path`` has ``nbytes`` allocated: writes are landing."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if stop is not None and stop.is_set():
            return False
        if os.stat(path).st_blocks * 512 >= nbytes:
            return True
        time.sleep(0.01)
    return False
