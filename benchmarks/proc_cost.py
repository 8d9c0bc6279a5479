"""What a backend process spent: CPU time and context switches of all its threads, from /proc.

Benchmarks read it before and after a measured stretch and divide the difference by the requests
served in it (``realguest_blk.py``, ``vhost_user_client.py``); this machine has no PMU for perf
counters, so CPU time per request is the cost figure that can be compared between backends.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path


def cost(pid: int) -> tuple[float, int]:
    """CPU seconds (user + system) and context switches (voluntary + not) of all of ``pid``'s threads."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    cpu = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    switches = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):  # (a thread that ended meanwhile)
            for line in (task / "status").read_text().splitlines():
                if line.startswith(("voluntary_ctxt_switches", "nonvoluntary_ctxt_switches")):
                    switches += int(line.split()[1])
    return cpu, switches
