"""``vdm vhost-user`` as a subprocess, for the real-guest tests and the benchmark: vdm-lab's
:class:`vdm_lab.VhostUserBackend` (named VdmProcess here), and waiting for writes to land."""

from __future__ import annotations

import os
import threading
import time

from vdm_lab import VhostUserBackend as VdmProcess

__all__ = ["VdmProcess", "wait_allocated"]


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
