"""A small event loop thread: file descriptors (eventfds, sockets, taps) to callbacks.

Kick eventfds (ioeventfd, vhost-user kick fds), a tap's receive side and console input all end up
here, so that device code runs on this thread and never on a vCPU thread.

Invariant: a callback runs only while its fd is registered with that very callback. One poll
batch may hold several ready fds; a callback that removes another reader (a disconnect closes every
kick fd of its connection) stops that reader's pending callback in the same batch from running.

Invariant: the loop watches exactly the open files its registered numbers name now. epoll keys a
registration by (open file, fd number) but removes and modifies by number, so a number that was
closed or replaced (``dup2``) while something else kept the old file open -- a frontend's end of a
kick eventfd -- leaves the old file registered under that number, out of reach, and its readiness
would wake the loop (and the number's new callback) for ever. When removing or re-registering a
number finds it no longer names the file registered under it (ENOENT, EBADF), the loop drops its
epoll instance and builds a new one from the current registrations: stale entries cannot outlive
that. Removing a reader before closing its fd, as callers should, never costs a rebuild. (Watching
a private dup of each fd instead would make removal exact, but would keep a file open after its
owner closed it: a socket's peer would not see the close until the reader was removed.)
"""

from __future__ import annotations

import errno
import logging
import os
import select
import threading
from typing import Callable

from .eventfd import EFD_CLOEXEC, EFD_NONBLOCK, eventfd, eventfd_read, eventfd_write

__all__ = ["EventLoop", "drain_eventfd"]

log = logging.getLogger(__name__)

_READ = select.EPOLLIN
_STALE = (errno.ENOENT, errno.EBADF)


def drain_eventfd(fd: int) -> int:
    """Read an eventfd's counter (0 if it was not signalled)."""
    try:
        return eventfd_read(fd)
    except BlockingIOError:
        return 0


class _Reader:
    """One registration: the same fd registered again is a new object (see the module invariant)."""

    __slots__ = ("callback", "fd")

    def __init__(self, fd: int, callback: Callable[[], None]) -> None:
        self.fd = fd
        self.callback = callback


class EventLoop:
    """Runs callbacks for readable file descriptors on one daemon thread."""

    def __init__(self, name: str = "vdm-events") -> None:
        self._ep = select.epoll()
        self._wake = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC)
        self._ep.register(self._wake, _READ)
        self._readers: dict[int, _Reader] = {}
        #: epoll instances replaced by a rebuild, closed by the loop thread once it left them
        self._retired: list[select.epoll] = []
        self._lock = threading.Lock()
        self._stop = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._started = False
        #: how many times a stale registration made the loop rebuild its epoll instance
        self.rebuilds = 0

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
        """Call ``callback()`` on the loop thread whenever ``fd`` is readable (replacing the
        callback ``fd`` had). Raises OSError for an fd epoll cannot watch (EBADF, EPERM)."""
        with self._lock:
            registered = fd in self._readers
            if registered:
                try:
                    self._ep.modify(fd, _READ)
                except OSError as e:
                    if e.errno not in _STALE:
                        raise
                    # the number names another file (or none) now: forget the old one for good
                    del self._readers[fd]
                    self._rebuild()
                    registered = False
            if not registered:
                self._ep.register(fd, _READ)  # EBADF / EPERM: the caller's fd cannot be watched
            self._readers[fd] = _Reader(fd, callback)
        self._poke()

    def remove_reader(self, fd: int) -> None:
        """Stop watching ``fd`` (nothing happens if it is not watched). Best called before the fd
        is closed; after is handled too (see the module invariant)."""
        with self._lock:
            if self._readers.pop(fd, None) is None:
                return
            try:
                self._ep.unregister(fd)
            except OSError as e:
                if e.errno not in _STALE:
                    raise
                self._rebuild()
                return
        self._poke()

    def _rebuild(self) -> None:
        """A new epoll instance watching the current registrations only (lock held). Numbers
        closed meanwhile are dropped from the registrations: they name no file to watch."""
        ep = select.epoll()
        try:
            ep.register(self._wake, _READ)
            for fd in list(self._readers):
                try:
                    ep.register(fd, _READ)
                except OSError as e:
                    if e.errno != errno.EBADF:
                        raise
                    del self._readers[fd]
        except BaseException:
            ep.close()
            raise
        old, self._ep = self._ep, ep
        self.rebuilds += 1
        if self._started and not self._stop:
            self._retired.append(old)  # the loop thread may be waiting in it: it closes it
            eventfd_write(self._wake, 1)  # registered in both: wakes the thread in the old one
        else:
            old.close()

    def _poke(self) -> None:
        if self._started and threading.current_thread() is not self._thread:
            eventfd_write(self._wake, 1)

    def _run(self) -> None:
        while not self._stop:
            with self._lock:
                ep = self._ep
                retired, self._retired = self._retired, []
            for old in retired:
                old.close()
            try:
                events = ep.poll()
            except InterruptedError:
                continue
            with self._lock:
                if ep is not self._ep:
                    # rebuilt meanwhile: this batch may hold a stale file's readiness; what is
                    # still readable is reported again by the new instance (level-triggered)
                    drain_eventfd(self._wake)
                    continue
                batch = [(fd, self._readers.get(fd)) for fd, _ in events]
            for fd, reader in batch:
                if fd == self._wake:
                    drain_eventfd(self._wake)
                    continue
                if reader is None:
                    continue
                # (one dict read, atomic: the lock would add nothing, since it is let go before
                # the callback runs either way)
                if self._readers.get(fd) is not reader:
                    # removed (and perhaps closed, its number reused) or replaced by a callback
                    # earlier in this batch: skip it; a replacement still readable is reported by
                    # the next poll(), which is level-triggered
                    continue
                try:
                    reader.callback()
                except Exception:  # one bad callback must not stop every device
                    log.exception("event callback for fd %d failed", fd)

    def stop(self) -> None:
        self._stop = True
        eventfd_write(self._wake, 1)
        if self._started and threading.current_thread() is not self._thread:
            self._thread.join(timeout=5)
        with self._lock:
            for ep in (*self._retired, self._ep):
                ep.close()
            self._retired = []
        os.close(self._wake)
