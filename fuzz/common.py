"""Shared pieces of vdm's fuzz targets: invariant checks that hold for every target.

* :func:`open_fd_count` -- the process's open file descriptors, to assert none is left after an
  input;
* :func:`watch_files` -- a Python audit hook that records every file the process opens, so a
  target can assert that nothing but the files it configured was touched;
* :func:`run` -- start atheris with the target's one-input function, instrumenting vdm's modules
  for coverage.

Each target is a script: ``python3 fuzz/fuzz_<name>.py [libFuzzer options] [corpus dir]``.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

_opened: list[str] = []
_watching = False


def _audit(event: str, args: tuple) -> None:
    if _watching and event == "open" and args and isinstance(args[0], (str, bytes, os.PathLike)):
        _opened.append(os.fsdecode(args[0]))


def watch_files() -> list[str]:
    """Start recording opened paths (returns the live list; clear it per input)."""
    global _watching
    if not _watching:
        sys.addaudithook(_audit)
        _watching = True
    return _opened


def open_fd_count() -> int:
    """How many file descriptors the process has open now."""
    return len(os.listdir("/proc/self/fd"))


def data_files(opened: list[str]) -> list[str]:
    """``opened`` without Python's own imports (modules imported lazily on first use)."""
    return [p for p in opened if not p.endswith((".py", ".pyc", ".so"))]


#: the core's queue path (ring layout, walk, chains, scatter/gather, configuration): instrumented by
#: every target whose input reaches a device's queues
QUEUE_MODULES = ("vdm.virtqueue", "vdm.chain", "vdm.sg", "vdm.queue_config", "vdm.ring_layout")


def run(test_one_input: Callable[[bytes], None], modules: tuple[str, ...]) -> None:
    """Fuzz ``test_one_input``; ``modules`` are imported (and instrumented for coverage) first."""
    import importlib
    import logging

    import atheris

    logging.disable(logging.CRITICAL)  # a broken device logs once per input: too loud here
    packages = sorted({m.split(".")[0] for m in modules})
    with atheris.instrument_imports(include=packages):
        for name in modules:
            importlib.import_module(name)
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()
