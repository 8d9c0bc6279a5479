"""One session for the commands that serve devices: ``vdm run``, ``vdm dm-only``, ``vdm vhost-user``.

A command opens two context managers and waits::

    with StopSignal() as stop, DeviceSet() as devices:
        devices.hold(machine.close, "the VM")          # what the devices need: closed after them
        devices.using(vmm.close, "the transports")     # what uses them: closed before them
        for dtype, config in configs:
            devices.create(dtype, config, ctx)
        devices.ready(user)                            # everything is open: drop root (--user)
        stop.wait(until=lambda: vm_ended)              # SIGTERM/SIGINT, or the command's own end
    if stop.stopped_by: ...                            # "SIGTERM" / "SIGINT": exit 0, as QEMU does

:class:`StopSignal` turns SIGTERM and SIGINT into a stop request. Python runs signal handlers only
in the main thread, and only once that thread runs bytecode again; a signal the kernel delivers
to a device or vCPU thread would leave a main thread blocked in a wait asleep (the KVM lab saw
``vdm run`` still waiting 60 s after SIGTERM). So the C-level handler's wakeup fd
(:func:`signal.set_wakeup_fd`) is read by a small watcher thread, which notices the signal
whichever thread it landed on, makes :meth:`StopSignal.fileno` readable for loops of their own
(dm-only's IOREQ loop) and wakes :meth:`StopSignal.wait`. Other signals with a Python handler
(``kill -USR1``'s stack dump, SIGWINCH) wake :meth:`~StopSignal.wait` too, so the main thread
returns to Python and runs their handler at once, and the wait goes on.

Invariants: the first stop wins (:attr:`StopSignal.stopped_by` never changes afterwards); a second
SIGTERM or SIGINT while the command shuts down is ignored, not raised -- coreutils ``timeout``
signals vdm and then its process group, and an exception raised inside the shutdown used to end
``vdm run`` with a traceback instead of a clean stop; on exit the previous handlers and wakeup fd
are restored exactly. Outside the main thread (vdm embedded in another program) no handler is
installed and only :meth:`StopSignal.stop` ends the wait.

:class:`DeviceSet` owns the devices of one command: created through their
:class:`~vdm.registry.DeviceType` (a backend's own error becomes one :class:`~vdm.errors.UserError`
line naming the option), privileges dropped once everything is open, and on exit everything
closed exactly once: first what uses the devices (newest first), then the devices (newest
first), then what they need (newest first). A close that fails is one log line and the rest still
close. Each device gets an id, its type's name and a number per type (``blk0``, ``blk1``, ``net0``),
by which :meth:`DeviceSet.serve_control` (``--control PATH``, :mod:`vdm.control`) names it.
"""

from __future__ import annotations

import logging
import os
import select
import signal
import threading
import time
from typing import Any, Callable, Iterable

from .errors import UserError
from .registry import DeviceContext, DeviceType

__all__ = ["DeviceSet", "StopSignal"]

log = logging.getLogger(__name__)

#: the byte the watcher thread reads as "the session is over" (no signal has number 0)
_QUIT = b"\0"


def _pipe() -> tuple[int, int]:
    r, w = os.pipe2(os.O_CLOEXEC)
    os.set_blocking(w, False)
    return r, w


def _drain(fd: int) -> bytes:
    out = b""
    while True:
        try:
            chunk = os.read(fd, 4096)
        except BlockingIOError:
            return out
        out += chunk
        if len(chunk) < 4096:
            return out


def _poke(fd: int) -> None:
    try:
        os.write(fd, b"x")
    except (BlockingIOError, OSError):  # full: already readable; closed: the session is over
        pass


class StopSignal:
    """SIGTERM/SIGINT (or :meth:`stop`) as one stop request the main thread hears at once.

    Use it as a context manager in the main thread; see the module documentation.
    """

    def __init__(self, signals: Iterable[int] = (signal.SIGTERM, signal.SIGINT)) -> None:
        self.signals = tuple(signal.Signals(s) for s in signals)
        #: why the session stops: a signal's name ("SIGTERM"), a reason given to :meth:`stop`, or None
        self.stopped_by: str | None = None
        self._signals_seen = 0  # stop signals read from the wakeup fd (the watcher counts them)
        self._lock = threading.Lock()
        self._stop_r, self._stop_w = _pipe()
        self._nudge_r, self._nudge_w = _pipe()
        os.set_blocking(self._nudge_r, False)
        self._wake_r = self._wake_w = -1
        self._old_handlers: dict[signal.Signals, Any] = {}
        self._old_wakeup: int | None = None
        self._watcher: threading.Thread | None = None
        self._closed = False

    # ---- the stop request ------------------------------------------------------------------------

    @property
    def stopped(self) -> bool:
        return self.stopped_by is not None

    @property
    def ignored(self) -> int:
        """Stop signals that came after the stop request (counted once the watcher read them)."""
        by_signal = self.stopped_by in {s.name for s in self.signals}
        return max(0, self._signals_seen - (1 if by_signal else 0))

    def stop(self, reason: str = "stopped") -> bool:
        """Ask the session to stop (any thread); only the first request counts (returns True)."""
        with self._lock:
            if self.stopped_by is not None:
                return False
            self.stopped_by = reason
        _poke(self._stop_w)
        _poke(self._nudge_w)
        return True

    def _on_stop_signal(self, signum: int) -> None:
        name = signal.Signals(signum).name
        if self.stop(name):
            log.info("%s received: stopping", name)

    def wake(self) -> None:
        """Make :meth:`wait` look at its condition again (any thread; e.g. from a VM-exit callback)."""
        _poke(self._nudge_w)

    def fileno(self) -> int:
        """An fd that is readable once a stop was requested, for loops that poll fds of their own."""
        return self._stop_r

    def wait(
        self,
        until: Callable[[], bool] | None = None,
        fds: Iterable[int] = (),
        timeout: float | None = None,
    ) -> bool:
        """Block until a stop is requested, ``until()`` holds, one of ``fds`` is readable, or
        ``timeout`` seconds pass; return :attr:`stopped`.

        ``until`` is checked on entry and after every :meth:`wake`; code that changes what it looks
        at calls :meth:`wake`. The wait holds no lock: other threads run meanwhile.
        """
        poller = select.poll()
        poller.register(self._stop_r, select.POLLIN)
        poller.register(self._nudge_r, select.POLLIN)
        extra = set()
        for fd in fds:
            poller.register(fd, select.POLLIN)
            extra.add(fd)
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            # back in Python here: the handlers of signals that woke us (SIGUSR1's dump) have run
            if self.stopped_by is not None:
                return True
            if until is not None and until():
                return False
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                return False
            events = poller.poll(None if left is None else max(1, int(left * 1000 + 0.999)))
            _drain(self._nudge_r)
            if any(fd in extra for fd, _ in events):
                return self.stopped_by is not None

    # ---- signals ---------------------------------------------------------------------------------

    def _handler(self, signum: int, frame: Any) -> None:
        # runs in the main thread whenever it gets to bytecode, maybe after the watcher noticed it;
        # it never raises, so a second signal cannot interrupt the shutdown
        self._on_stop_signal(signum)

    def _watch(self) -> None:
        """The watcher thread: the wakeup fd carries the number of every signal that arrived."""
        wanted = {int(s) for s in self.signals}
        while True:
            try:
                data = os.read(self._wake_r, 512)
            except InterruptedError:  # pragma: no cover - Python retries read itself
                continue
            except OSError:
                return
            if not data:
                return
            for signum in data:
                if signum == 0:
                    return
                if signum not in wanted:
                    _poke(self._nudge_w)  # let the main thread run that signal's Python handler
                    continue
                self._signals_seen += 1
                if self.stopped_by is None:
                    self._on_stop_signal(signum)
                else:
                    log.debug("%s ignored: already stopping", signal.Signals(signum).name)

    def __enter__(self) -> StopSignal:
        if threading.current_thread() is not threading.main_thread():
            log.debug("session outside the main thread: no signal handlers, stop() alone ends it")
            return self
        self._wake_r, self._wake_w = _pipe()
        try:
            for sig in self.signals:
                self._old_handlers[sig] = signal.signal(sig, self._handler)
            self._old_wakeup = signal.set_wakeup_fd(self._wake_w, warn_on_full_buffer=False)
        except BaseException:
            self._restore()
            raise
        self._watcher = threading.Thread(target=self._watch, name="vdm-signals", daemon=True)
        self._watcher.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _restore(self) -> None:
        if self._old_wakeup is not None:
            signal.set_wakeup_fd(self._old_wakeup)
            self._old_wakeup = None
        for sig, old in self._old_handlers.items():
            signal.signal(sig, old)
        self._old_handlers.clear()

    def close(self) -> None:
        """Restore the previous handlers and wakeup fd; end the watcher; release the fds (once)."""
        if self._closed:
            return
        self._closed = True
        self._restore()
        if self._watcher is not None:
            os.write(self._wake_w, _QUIT)  # the pipe is ours alone again: never full here
            self._watcher.join(5)
            self._watcher = None
        for fd in (self._wake_r, self._wake_w, self._stop_r, self._stop_w, self._nudge_r, self._nudge_w):
            if fd >= 0:
                os.close(fd)


class DeviceSet:
    """The devices of one command and what uses or serves them; everything closed once, in order.

    See the module documentation for the order. Not thread-safe: the command's main thread owns it.
    """

    def __init__(self) -> None:
        self.devices: list[Any] = []
        #: ``(id, type name)`` of each device, in the order of :attr:`devices`
        self.ids: list[tuple[str, str]] = []
        self._numbers: dict[str, int] = {}
        self._users: list[tuple[str, Callable[[], Any]]] = []
        self._held: list[tuple[str, Callable[[], Any]]] = []
        self.user: str | None = None
        self._closed = False

    def __enter__(self) -> DeviceSet:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def create(self, dtype: DeviceType, config: Any, ctx: DeviceContext) -> Any:
        """``dtype.create(config, ctx)``, kept for closing; a backend's own error (a disk it cannot
        open, a tap that does not exist) is one :class:`UserError` line naming the option."""
        try:
            device = dtype.create(config, ctx)
        except UserError:
            raise
        except Exception as e:
            raise UserError(f"{dtype.cli_flag or dtype.name}: {e}") from None
        self.devices.append(device)
        n = self._numbers.get(dtype.name, 0)  # never reused: a removed blk1 stays gone
        self._numbers[dtype.name] = n + 1
        self.ids.append((f"{dtype.name}{n}", dtype.name))
        return device

    def remove(self, device: Any) -> None:
        """Close ``device`` now and forget it (``vdm ctl remove``); whatever served it must have
        stopped first. A close that fails is one log line; the device is forgotten either way."""
        i = next(i for i, d in enumerate(self.devices) if d is device)
        del self.devices[i]
        del self.ids[i]
        close = getattr(device, "close", None)
        if close is not None:
            try:
                close()
            except Exception as e:
                log.error("closing %s failed: %s: %s", getattr(device, "name", device), type(e).__name__, e)

    def entries(self) -> list[tuple[str, str, Any]]:
        """``(id, type name, device)`` of every device (what the control socket serves)."""
        return [(ident, kind, dev) for (ident, kind), dev in zip(self.ids, self.devices)]

    def serve_control(self, path: str | None) -> Any:
        """Serve the control socket at ``path`` (None: nothing) for these devices; it is closed
        before them. Returns the :class:`~vdm.control.ControlServer` (or None)."""
        if not path:
            return None
        from .control import ControlServer

        server = ControlServer(path, self.entries).start()
        self.using(server.close, f"the control socket {path}")
        return server

    def using(self, close: Callable[[], Any], what: str) -> None:
        """``close`` ends something that uses the devices (a server, the transports, an event loop):
        it runs before any device is closed."""
        self._users.append((what, close))

    def hold(self, close: Callable[[], Any], what: str) -> None:
        """``close`` ends something the devices need (the VM, a hypervisor connection): it runs
        after every device is closed."""
        self._held.append((what, close))

    def ready(self, user: str | None) -> None:
        """Everything is open: become ``user`` for good (``--user``; None: stay). Once only."""
        if self.user is not None:
            raise RuntimeError(f"privileges already dropped to {self.user}")
        if not user:
            return
        from .privileges import drop_privileges

        drop_privileges(user)
        self.user = user

    def close(self) -> None:
        """Close the users, the devices, then what they hold, each group newest first (once)."""
        if self._closed:
            return
        self._closed = True
        steps = [*reversed(self._users)]
        steps += [
            (getattr(d, "name", None) or type(d).__name__, getattr(d, "close", None))
            for d in reversed(self.devices)
        ]
        steps += [*reversed(self._held)]
        for what, close in steps:
            if close is None:
                continue
            try:
                close()
            except Exception as e:
                log.error("closing %s failed: %s: %s", what, type(e).__name__, e)
                log.debug("closing %s", what, exc_info=True)
