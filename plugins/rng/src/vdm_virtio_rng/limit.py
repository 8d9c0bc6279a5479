"""The rate limit of an rng device: a byte quota per time window, and the thread that ends a wait.

:class:`RateLimit` is pure bookkeeping on an injected clock (seconds, monotonic): at most ``quota``
bytes in a window of ``period`` seconds. A window starts at the first charge after the previous
one ended, so an idle device does not save up quota. The device asks :meth:`RateLimit.available`
before it takes a request; when the answer is 0 the request stays in the guest's ring and the
device arms a :class:`Waker` for :meth:`RateLimit.window_end`.

:class:`Waker` is one thread per device, started at the first wait. It sleeps on a condition
variable (never polls) until the armed deadline of the same clock, then calls its action (the
device's kick) with no lock of its own held. :meth:`Waker.cancel` (device reset) and
:meth:`Waker.close` (device close) wake it at once; after close the thread has ended.
"""

from __future__ import annotations

import threading
from typing import Callable, Optional

__all__ = ["RateLimit", "Waker"]

#: the longest single sleep of the waker: a clock that jumps (an injected one) is looked at again
MAX_SLEEP = 1.0


class RateLimit:
    """At most ``quota`` bytes per ``period`` seconds of ``clock``.

    Invariant: ``0 <= used <= quota``; ``start`` is the current window's start (None before the
    first charge).
    """

    def __init__(self, quota: int, period: float, clock: Callable[[], float]) -> None:
        if quota < 1 or period <= 0:
            raise ValueError("a rate limit needs a positive quota and period")
        self.quota = quota
        self.period = period
        self._clock = clock
        self._start: Optional[float] = None
        self._used = 0
        self._lock = threading.Lock()

    def _roll(self, now: float) -> None:
        if self._start is not None and now >= self._start + self.period:
            self._start, self._used = None, 0

    def available(self) -> int:
        """Bytes that may be given now."""
        with self._lock:
            self._roll(self._clock())
            return self.quota - self._used

    def charge(self, n: int) -> None:
        """``n`` bytes were given (at most :meth:`available`)."""
        with self._lock:
            now = self._clock()
            self._roll(now)
            if self._start is None:
                self._start = now
            self._used = min(self.quota, self._used + n)

    def window_end(self) -> float:
        """When the quota is whole again (now, if no window is running)."""
        with self._lock:
            now = self._clock()
            self._roll(now)
            return now if self._start is None else self._start + self.period


class Waker:
    """Calls ``action`` once at an armed deadline of ``clock``, from its own thread."""

    def __init__(self, action: Callable[[], None], clock: Callable[[], float], name: str) -> None:
        self._action = action
        self._clock = clock
        self._name = name
        self._cond = threading.Condition()
        self._deadline: Optional[float] = None
        self._closed = False
        self._thread: Optional[threading.Thread] = None

    @property
    def pending(self) -> bool:
        """A deadline is armed and its action has not run."""
        with self._cond:
            return self._deadline is not None

    @property
    def running(self) -> bool:
        """The thread exists and has not ended."""
        return self._thread is not None and self._thread.is_alive()

    def arm(self, deadline: float) -> None:
        """Run the action at ``deadline`` (an earlier armed deadline is kept)."""
        with self._cond:
            if self._closed:
                return
            if self._deadline is None or deadline < self._deadline:
                self._deadline = deadline
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
                self._thread.start()
            self._cond.notify()

    def cancel(self) -> None:
        """Forget the armed deadline (the requests it was for are gone)."""
        with self._cond:
            self._deadline = None
            self._cond.notify()

    def close(self, timeout: float = 5.0) -> None:
        """End the thread; no action runs after this returns (unless one was already running
        and did not finish within ``timeout``)."""
        with self._cond:
            self._closed = True
            self._deadline = None
            self._cond.notify()
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)

    def _run(self) -> None:
        while True:
            with self._cond:
                while True:
                    if self._closed:
                        return
                    if self._deadline is None:
                        self._cond.wait()
                        continue
                    delay = self._deadline - self._clock()
                    if delay > 0:
                        self._cond.wait(min(delay, MAX_SLEEP))
                        continue
                    self._deadline = None
                    break
            self._action()
