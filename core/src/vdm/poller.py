"""A wakeable fd poller: one thread that watches the host fds a device names and kicks its queues.

A device whose work also arrives from host fds (vdm-net's taps, vdm-vsock's sockets) does not read
them on a thread of its own: it tells an :class:`FdPoller` what to watch and which queues to kick
when something is ready, and its ordinary queue processing (which
:class:`~vdm.device.VirtioDevice` serializes per queue) does the work. The poller knows nothing of
any one device.

Invariants:

* ``interest()`` -- ``{fd: (selectors.EVENT_READ | EVENT_WRITE, tag)}`` -- and ``ready(tag,
  events)`` are called on the poller's thread only; ``interest()`` again after every wake-up and
  every round of events, so an fd the device stops naming is no longer watched (an fd number closed
  and reused meanwhile is registered afresh).
* ``kick(index)`` is called on the poller's thread, outside the poller's lock, at most once per
  queue per round, in the order the queues were first asked for; none after :meth:`FdPoller.stop`.
* :meth:`FdPoller.wake` and :meth:`FdPoller.schedule` may be called from any thread at any time
  and never write to the wake-up fd once it is closed (its number may belong to something else).
* :meth:`FdPoller.stop` from another thread waits for the thread (at most ``JOIN_TIMEOUT``, then
  one log line); from the poller's own thread (a kick it made failed the device, whose reset stops
  the poller) it only asks the thread to end -- :meth:`FdPoller.join` waits for it later.
* An exception from a callback ends the thread with one logged traceback; the selector and the
  wake-up fd are closed when the thread ends, whatever the reason.
"""

from __future__ import annotations

import logging
import os
import selectors
import threading
from typing import Callable, Dict, Iterable, Tuple

from .eventfd import EFD_CLOEXEC, EFD_NONBLOCK, eventfd, eventfd_read, eventfd_write

__all__ = ["JOIN_TIMEOUT", "FdPoller", "Interest"]

log = logging.getLogger(__name__)

#: how long stop() and join() wait for the thread, in seconds
JOIN_TIMEOUT = 5.0

#: fd -> (selectors.EVENT_READ | EVENT_WRITE, the device's tag for it)
Interest = Dict[int, Tuple[int, object]]


class FdPoller:
    """One thread: watches what ``interest()`` names, hands ready fds to ``ready(tag, events)``
    (which returns queue indexes) and calls ``kick(i)`` for each; ``name`` names the thread and
    the log lines."""

    def __init__(
        self,
        interest: Callable[[], Interest],
        ready: Callable[[object, int], Iterable[int]],
        kick: Callable[[int], None],
        *,
        name: str,
    ) -> None:
        self.name = name
        self._interest_of = interest
        self._ready = ready
        self._kick = kick
        self._sel = selectors.DefaultSelector()
        self._wake_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC)
        self._sel.register(self._wake_fd, selectors.EVENT_READ, None)
        self._watched: Interest = {}
        self._scheduled: list[int] = []
        self._lock = threading.Lock()
        self._stop = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def wake(self) -> None:
        """Re-read the interest soon (the device changed what it waits for)."""
        with self._lock:
            self._poke()

    def schedule(self, queue_index: int) -> None:
        """Kick ``queue_index`` from the poller's thread soon (a queue that yielded its turn)."""
        with self._lock:
            if queue_index not in self._scheduled:
                self._scheduled.append(queue_index)
            self._poke()

    def _poke(self) -> None:
        # (under self._lock: never write to a closed, maybe reused, fd number)
        if self._wake_fd >= 0:
            try:
                eventfd_write(self._wake_fd)
            except BlockingIOError:
                pass  # the counter is at its maximum: a wake-up is pending anyway

    def stop(self) -> None:
        """Stop the thread and wait for it (unless called from it: see the module's invariants)."""
        self._stop = True
        self.wake()
        self.join()

    def join(self) -> None:
        """Wait for the thread after :meth:`stop` (a no-op on the thread itself)."""
        if threading.current_thread() is not self._thread and self._thread.is_alive():
            self._thread.join(JOIN_TIMEOUT)
            if self._thread.is_alive():
                log.warning("%s: poller thread did not stop within %.0f s", self.name, JOIN_TIMEOUT)

    # ---- the thread -------------------------------------------------------------------------------

    def _sync(self) -> None:
        want = self._interest_of()
        for fd in [fd for fd in self._watched if fd not in want]:
            try:
                self._sel.unregister(fd)
            except (KeyError, ValueError, OSError):
                pass
            del self._watched[fd]
        for fd, (mask, tag) in want.items():
            old = self._watched.get(fd)
            if old == (mask, tag):
                continue
            try:
                if old is None:
                    self._sel.register(fd, mask, tag)
                else:
                    self._sel.modify(fd, mask, tag)
            except (KeyError, ValueError, OSError):
                # an fd number closed and reused meanwhile: start it afresh
                try:
                    self._sel.unregister(fd)
                except (KeyError, ValueError, OSError):
                    pass
                self._sel.register(fd, mask, tag)
            self._watched[fd] = (mask, tag)

    def _run(self) -> None:
        try:
            while not self._stop:
                self._sync()
                kicks: dict[int, None] = {}  # (ordered, each queue once)
                for key, events in self._sel.select():
                    if key.data is None:
                        try:
                            eventfd_read(self._wake_fd)
                        except BlockingIOError:
                            pass
                        continue
                    kicks.update(dict.fromkeys(self._ready(key.data, events)))
                with self._lock:
                    kicks.update(dict.fromkeys(self._scheduled))
                    self._scheduled.clear()
                for index in kicks:
                    if self._stop:
                        break
                    self._kick(index)
        except Exception:
            log.exception("%s: poller thread failed", self.name)
        finally:
            self._sel.close()
            with self._lock:
                os.close(self._wake_fd)
                self._wake_fd = -1
