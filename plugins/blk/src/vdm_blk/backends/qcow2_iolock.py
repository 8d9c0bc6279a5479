"""The I/O lock of a qcow2 image, kept under its metadata lock so the data path takes one lock.

Data I/O to clusters found allocated runs outside the metadata lock, under the shared side of
this lock; discard, write-zeroes, giving clusters back and reloading the metadata take the
exclusive side, so no request in flight can still be using a cluster that is freed and reused.
It is the semantics of :class:`.base.RWLock` (a waiting exclusive holder blocks new shared
ones), but its state is guarded by the image's metadata lock (an RLock) instead of a lock of
its own: the data path maps a request and enters the shared side in the same critical section
(:meth:`ClusterMap._enter_io`) and leaves without a lock: one lock round trip instead of three.

Invariants: ``writer`` and ``waiting`` change only with ``meta`` held; a shared holder enters
(appends to ``active``) only with ``meta`` held and after seeing neither ``writer`` nor ``waiting``;
it leaves without the lock -- ``active.pop()`` is one atomic operation on a list -- and then, if an
exclusive holder waits, takes ``meta`` to wake it. The exclusive side counts ``waiting`` and tests
``active`` under ``meta``, so a shared holder either left before that test or sees ``waiting`` when
it leaves. The exclusive side is never taken with ``meta`` held (waiting on the condition would
release it under the holder's feet), and the shared side is never held while waiting for the
exclusive one.
"""

from __future__ import annotations

import threading
from typing import Callable

__all__ = ["IOLock"]


class IOLock:
    """Shared/exclusive I/O lock whose state is guarded by ``meta`` (see the module docs)."""

    __slots__ = ("_cond", "active", "meta", "on_exclusive", "waiting", "writer")

    def __init__(self, meta: threading.RLock) -> None:
        self.meta = meta
        self._cond = threading.Condition(meta)
        #: one item per shared holder (a list: append and pop are atomic without the lock)
        self.active: list[bool] = []
        self.writer = False
        self.waiting = 0
        #: called (``meta`` held) with True once the exclusive side is taken, before its holder
        #: changes anything, and with False when it is given back (the compiled serve step's gate)
        self.on_exclusive: Callable[[bool], None] | None = None

    def wait_shared(self) -> None:
        """Wait until the shared side may be entered (``meta`` held, once); the caller then
        appends to ``active`` in the same critical section."""
        while self.writer or self.waiting:
            self._cond.wait()

    def acquire_shared(self) -> None:
        with self.meta:
            self.wait_shared()
            self.active.append(True)

    def try_acquire_shared(self) -> bool:
        """The shared side if it is free now; never blocks."""
        with self.meta:
            if self.writer or self.waiting:
                return False
            self.active.append(True)
            return True

    def release_shared(self) -> None:
        self.active.pop()
        if self.waiting:
            self.wake()

    def wake(self) -> None:
        """Wake a waiting exclusive holder (a shared holder has left)."""
        with self.meta:
            self._cond.notify_all()

    def acquire_exclusive(self) -> None:
        with self.meta:
            self.waiting += 1
            try:
                while self.writer or self.active:
                    self._cond.wait()
            except BaseException:  # (interrupted) shared holders waiting on us may go on
                self.waiting -= 1
                self._cond.notify_all()
                raise
            self.waiting -= 1
            self.writer = True
            if self.on_exclusive is not None:
                try:
                    self.on_exclusive(True)
                except BaseException:
                    self.writer = False
                    self._cond.notify_all()
                    raise

    def release_exclusive(self) -> None:
        with self.meta:
            if self.on_exclusive is not None:
                self.on_exclusive(False)
            self.writer = False
            self._cond.notify_all()
