"""``vdm vhost-user`` as a process next to the test: started, waited for until it serves, stopped.

A device served to QEMU (:func:`vdm_lab.run_qemu` with :func:`vdm_lab.vhost_user_device_args`)
needs its backend running first; :class:`VhostUserBackend` starts ``vdm -v vhost-user
--socket-path PATH <device options>`` with this interpreter (``sys.executable``; ``python``
names another, e.g. a venv's where a plugin is installed; ``env`` replaces the environment), keeps its
output (``lines``) and returns once vdm says it serves (``vdm: serving ...``) and the socket
exists. Use it as a context manager, or call :meth:`VhostUserBackend.stop` (SIGTERM, then the exit
status).

Invariant: a backend that does not start within ``start_timeout`` is killed before the
RuntimeError (with its output) is raised; :meth:`stop` and :meth:`kill` always reap the process.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from typing import Mapping, Sequence

__all__ = ["VhostUserBackend"]


class VhostUserBackend:
    """One ``vdm -v vhost-user --socket-path PATH <device options>``; its output is kept in ``lines``."""

    def __init__(self, socket_path: str | os.PathLike[str], *device_args: str, wrap: Sequence[str] = (),
                 start_timeout: float = 20, python: str | os.PathLike[str] = sys.executable,
                 env: Mapping[str, str] | None = None) -> None:
        """``wrap`` goes before the command (e.g. a network namespace's ``ip netns exec NAME``);
        ``python`` is the interpreter that runs vdm; ``env`` its environment (None: this one's)."""
        self.socket_path = os.fspath(socket_path)
        self.args = [*wrap, os.fspath(python), "-m", "vdm.cli.main", "-v", "vhost-user"]
        self.args += ["--socket-path", self.socket_path, *device_args]
        self.lines: list[str] = []
        self._serving = threading.Event()
        self.proc = subprocess.Popen(self.args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     env=None if env is None else dict(env))
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        if not self._serving.wait(start_timeout) or not os.path.exists(self.socket_path):
            self.kill()
            raise RuntimeError("vdm vhost-user did not start:\n" + self.output)

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            line = raw.decode("utf-8", "replace").rstrip("\n")
            self.lines.append(line)
            if line.startswith("vdm: serving "):
                self._serving.set()

    def __enter__(self) -> VhostUserBackend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def output(self) -> str:
        return "\n".join(self.lines)

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def count(self, text: str) -> int:
        """How many output lines contain ``text``."""
        return sum(text in line for line in self.lines)

    def kill(self) -> None:
        """SIGKILL: no cleanup at all (the socket file stays)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()
        self._reader.join(5)

    def stop(self, timeout: float = 20) -> int:
        """SIGTERM and wait; returns the exit status (-9 if it had to be killed)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            rc = -9
        self._reader.join(5)
        return rc
