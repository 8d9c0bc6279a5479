"""Memory barriers for rings shared with a guest.

On x86-64 (TSO) stores are seen by other CPUs in program order and loads are not reordered with
older loads, so the orderings a split virtqueue needs (element before index on push, index before
element on pop) hold for Python's plain, sequential memoryview accesses: ``wmb``/``rmb`` are
no-ops there. ``mb`` (a store followed by a load of another location, as in EVENT_IDX checks) does
need a full fence on x86; it is provided by taking and releasing a lock, whose atomic
read-modify-write is a full barrier on x86 and on arm64 (LSE atomics / exclusive pairs with
acquire-release).

On weakly ordered hosts (arm64: the Xen lab's dom0) ``wmb``/``rmb`` use the same lock trick.
"""

from __future__ import annotations

import platform
import threading

__all__ = ["STRONGLY_ORDERED", "mb", "rmb", "wmb"]

STRONGLY_ORDERED = platform.machine() in ("x86_64", "AMD64", "i686", "i386")
_fence_lock = threading.Lock()


def mb() -> None:
    """Full barrier: earlier loads and stores complete before later ones."""
    with _fence_lock:
        pass


def _noop() -> None:
    return None


#: Store-store barrier (used element before used index).
wmb = _noop if STRONGLY_ORDERED else mb
#: Load-load barrier (available index before available ring entries).
rmb = _noop if STRONGLY_ORDERED else mb
