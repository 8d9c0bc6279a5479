"""A small event loop thread: file descriptors (eventfds, sockets, taps) to callbacks.

Kick eventfds (ioeventfd, vhost-user kick fds), a tap's receive side and console input all end up
here, so that device code runs on this thread and never on a vCPU thread.

Invariant: a callback runs only while its fd is registered with that very callback. One select()
batch may hold several ready fds; a callback that removes another reader (a disconnect closes every
kick fd of its connection) stops that reader's pending callback in the same batch from running.
"""

from __future__ import annotations

import logging
import os
import selectors
import threading
from typing import Callable

from .eventfd import EFD_CLOEXEC, EFD_NONBLOCK, eventfd, eventfd_read, eventfd_write

__all__ = ["EventLoop", "drain_eventfd"]

log = logging.getLogger(__name__)


def drain_eventfd(fd: int) -> int:
    """Read an eventfd's counter (0 if it was not signalled)."""
    try:
        return eventfd_read(fd)
    except BlockingIOError:
        return 0


class EventLoop:
    """Runs callbacks for readable file descriptors on one daemon thread."""

    def __init__(self, name: str = "vdm-events") -> None:
        self._sel = selectors.DefaultSelector()
        self._wake = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC)
        self._sel.register(self._wake, selectors.EVENT_READ, None)
        self._lock = threading.Lock()
        self._stop = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._started = False

    @property
    def started(self) -> bool:
        """True once :meth:`start` ran (also after :meth:`stop`): the loop thread was started."""
        return self._started

    def start(self) -> EventLoop:
        if not self._started:
            self._started = True
            self._thread.start()
        return self

    def add_reader(self, fd: int, callback: Callable[[], None]) -> None:
        """Call ``callback()`` on the loop thread whenever ``fd`` is readable."""
        with self._lock:
            try:
                self._sel.register(fd, selectors.EVENT_READ, callback)
            except KeyError:
                self._sel.modify(fd, selectors.EVENT_READ, callback)
        self._poke()

    def remove_reader(self, fd: int) -> None:
        with self._lock:
            try:
                self._sel.unregister(fd)
            except (KeyError, ValueError):
                pass
        self._poke()

    def _poke(self) -> None:
        if self._started and threading.current_thread() is not self._thread:
            eventfd_write(self._wake, 1)

    def _run(self) -> None:
        while not self._stop:
            events = self._sel.select()
            for key, _ in events:
                if key.data is None:
                    drain_eventfd(self._wake)
                    continue
                with self._lock:
                    current = self._sel.get_map().get(key.fd)
                if current is not key:
                    # removed (and perhaps closed, its number reused) or replaced by a callback
                    # earlier in this batch: skip it; a replacement still readable is reported by
                    # the next select(), which is level-triggered
                    continue
                try:
                    key.data()
                except Exception:  # one bad callback must not stop every device
                    log.exception("event callback for fd %d failed", key.fd)

    def stop(self) -> None:
        self._stop = True
        eventfd_write(self._wake, 1)
        if self._started and threading.current_thread() is not self._thread:
            self._thread.join(timeout=5)
        self._sel.close()
        os.close(self._wake)
