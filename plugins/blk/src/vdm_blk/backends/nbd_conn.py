"""One NBD connection that carries many requests at once: a libnbd handle and its poller thread.

Worker threads submit commands with libnbd's asynchronous calls (each holds the handle's lock for
a moment) and wait on their own :class:`Waiter`; the connection's poller thread waits on the
handle's socket *outside* the lock (``nbd_aio_get_fd``/``get_direction``, then
``nbd_aio_notify_read``/``write``), retires completed commands (``nbd_aio_peek_command_completed``)
and wakes their waiters. A pipe wakes the poller when a submission changed what it must wait for.

Invariant: the handle is closed (``nbd_close``) by the poller thread only, and every waiter still
pending is failed only *after* that, so a waiter that sees its request failed knows libnbd no
longer references its buffer. :meth:`Conn.kill` asks the poller to do that (a request timed out,
the disk is closing).
"""

from __future__ import annotations

import os
import select
import threading
from typing import Any, Callable

__all__ = ["Conn", "Down", "Waiter"]

POLL_MS = 200
DIR_READ = 1
DIR_WRITE = 2


class Down(Exception):
    """The connection is unusable (the message says why): reconnect."""


class Waiter:
    """One submitted command: ``down`` (the connection died: why) or ``rc``/``err``/``msg``."""

    __slots__ = ("down", "err", "event", "msg", "rc")

    def __init__(self) -> None:
        self.event = threading.Event()
        self.rc = 0
        self.err = 0
        self.msg = ""
        self.down: str | None = None


class Conn:
    """A ready libnbd handle served by its own poller thread (see the module documentation)."""

    def __init__(self, ffi: Any, lib: Any, handle: Any, name: str, lost: Callable[[str], None]) -> None:
        """``lost(why)`` is called (from the poller) when the connection dies by libnbd's doing
        (the server went away or broke the protocol), not when :meth:`kill` ended it."""
        self._ffi, self._lib, self._h = ffi, lib, handle
        self._lost = lost
        self._lock = threading.Lock()
        self._waiters: dict[int, Waiter] = {}
        self.dead: str | None = None
        self._kill: str | None = None
        #: why libnbd dropped the connection (what the poller's notify call reported)
        self._why: str | None = None
        self._rfd, self._wfd = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._thread = threading.Thread(target=self._poll_loop, name=f"nbd {name}", daemon=True)
        self._thread.start()

    @property
    def in_flight(self) -> int:
        return len(self._waiters)

    def _error(self) -> str:
        msg = self._lib.nbd_get_error()
        return self._ffi.string(msg).decode(errors="replace") if msg != self._ffi.NULL else "unknown error"

    def _wake(self) -> None:
        try:
            os.write(self._wfd, b"x")
        except OSError:  # the pipe is full (the poller wakes anyway) or closed (it has ended)
            pass

    def submit(self, call: Callable[[Any], int]) -> Waiter:
        """Start a command (``call(handle) -> cookie``); Down if the connection cannot take it,
        OSError if libnbd refuses the command itself (the connection stays usable)."""
        w = Waiter()
        lib = self._lib
        with self._lock:
            if self.dead is not None or self._kill is not None:
                raise Down(self.dead or self._kill or "closed")
            cookie = call(self._h)
            if cookie != -1:
                self._waiters[cookie] = w
            elif lib.nbd_aio_is_dead(self._h) != 1 and lib.nbd_aio_is_closed(self._h) != 1:
                raise OSError(lib.nbd_get_errno() or 5, self._error())
        if cookie == -1:
            # the connection died under the poller's feet: its reason is the one worth a log line
            mine = self._error()
            self._wake()
            self._thread.join(1.0)
            raise Down(self._why or mine)
        self._wake()
        return w

    def kill(self, why: str) -> None:
        """Make the poller close the handle and fail what is pending with ``why``."""
        with self._lock:
            if self._kill is None:
                self._kill = why
        self._wake()

    def join(self, timeout: float) -> None:
        self._thread.join(timeout)

    def _poll_loop(self) -> None:
        lib, h = self._lib, self._h
        why = "closed"
        try:
            while self._kill is None:
                fd = lib.nbd_aio_get_fd(h)
                direction = lib.nbd_aio_get_direction(h)
                if fd < 0 or lib.nbd_aio_is_dead(h) == 1 or lib.nbd_aio_is_closed(h) == 1:
                    why = self._why or self._error()
                    break
                p = select.poll()
                mask = (select.POLLIN if direction & DIR_READ else 0) | (
                    select.POLLOUT if direction & DIR_WRITE else 0
                )
                if mask:
                    p.register(fd, mask)
                p.register(self._rfd, select.POLLIN)
                ready = p.poll(POLL_MS)
                for rfd, ev in ready:
                    if rfd == self._rfd:
                        try:
                            os.read(self._rfd, 4096)
                        except BlockingIOError:
                            pass
                        continue
                    if ev & (select.POLLIN | select.POLLHUP | select.POLLERR) and direction & DIR_READ:
                        if lib.nbd_aio_notify_read(h) == -1:
                            why = self._why = self._error()
                    if ev & select.POLLOUT:
                        if lib.nbd_aio_notify_write(h) == -1:
                            why = self._why = self._error()
                self._retire()
            else:
                why = self._kill
        except BaseException as e:  # never leave waiters hanging
            why = f"{type(e).__name__}: {e}"
        finally:
            with self._lock:
                self.dead = why or "closed"
                lib.nbd_close(h)  # from here libnbd references no buffer
                pending, self._waiters = self._waiters, {}
            if self._kill is None:
                self._lost(self.dead)
            for w in pending.values():
                w.down = self.dead
                w.event.set()
            os.close(self._rfd)
            os.close(self._wfd)

    def _retire(self) -> None:
        lib, h = self._lib, self._h
        done = []
        with self._lock:
            while True:
                cookie = lib.nbd_aio_peek_command_completed(h)
                if cookie <= 0:
                    break
                rc = lib.nbd_aio_command_completed(h, cookie)
                w = self._waiters.pop(cookie, None)
                if w is None:
                    continue
                w.rc = rc
                if rc == -1:
                    w.err, w.msg = lib.nbd_get_errno() or 5, self._error()
                    if lib.nbd_aio_is_dead(h) == 1 or lib.nbd_aio_is_closed(h) == 1:
                        w.down = self._why or w.msg  # failed with its connection, not by the server
                done.append(w)
        for w in done:
            w.event.set()
