"""The thread that watches a vsock device's host sockets and turns readiness into queue kicks.

It waits (``selectors``) on what the device asks for -- its listening socket, host connections
still sending their ``CONNECT`` line, connection sockets readable while the guest has credit,
writable while bytes for the host wait -- and hands each ready socket back to the device, which
answers with the queues to kick. The device's state is read and changed only through the two
callbacks (under the device's lock), so this module knows nothing of vsock.
"""

from __future__ import annotations

import logging
import os
import selectors
import threading
from typing import Callable, Iterable

from vdm.eventfd import EFD_CLOEXEC, EFD_NONBLOCK, eventfd, eventfd_read, eventfd_write

__all__ = ["SocketPoller"]

log = logging.getLogger(__name__)

JOIN_TIMEOUT = 5.0

#: fd -> (selectors.EVENT_READ | EVENT_WRITE, what the device calls it)
Interest = dict[int, tuple[int, object]]


class SocketPoller:
    """One thread: ``interest()`` says what to watch (re-read after every wake-up and every event);
    ``ready(tag, events)`` handles a ready socket and returns queue indexes; ``kick(i)`` is called
    for each, outside any lock."""

    def __init__(self, interest: Callable[[], Interest], ready: Callable[[object, int], Iterable[int]],
                 kick: Callable[[int], None], name: str = "vdm-vsock-io") -> None:
        self._interest_of = interest
        self._ready = ready
        self._kick = kick
        self._sel = selectors.DefaultSelector()
        self._wake_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC)
        self._sel.register(self._wake_fd, selectors.EVENT_READ, None)
        self._watched: dict[int, tuple[int, object]] = {}
        self._lock = threading.Lock()
        self._stop = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def wake(self) -> None:
        """Re-read the interest soon (called after the device changed what it waits for)."""
        with self._lock:  # never write to a closed (and maybe reused) fd number
            if self._wake_fd >= 0:
                try:
                    eventfd_write(self._wake_fd)
                except BlockingIOError:
                    pass

    def stop(self) -> None:
        """Stop the thread and wait for it (unless called from it)."""
        self._stop = True
        self.wake()
        if threading.current_thread() is not self._thread and self._thread.is_alive():
            self._thread.join(JOIN_TIMEOUT)
            if self._thread.is_alive():
                log.warning("vsock: socket poller did not stop within %.0f s", JOIN_TIMEOUT)

    def join(self) -> None:
        """Wait for the thread after :meth:`stop` (a stop from the thread itself cannot)."""
        if threading.current_thread() is not self._thread and self._thread.is_alive():
            self._thread.join(JOIN_TIMEOUT)

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
                kicks: set[int] = set()
                for key, events in self._sel.select():
                    if key.data is None:
                        try:
                            eventfd_read(self._wake_fd)
                        except BlockingIOError:
                            pass
                        continue
                    kicks.update(self._ready(key.data, events))
                for index in sorted(kicks):
                    if self._stop:
                        break
                    self._kick(index)
        except Exception:
            log.exception("vsock: socket poller failed")
        finally:
            self._sel.close()
            with self._lock:
                os.close(self._wake_fd)
                self._wake_fd = -1
