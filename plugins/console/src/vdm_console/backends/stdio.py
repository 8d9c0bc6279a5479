"""The terminal vdm runs in: raw mode while the guest runs (:mod:`.terminal`), the Ctrl-A escape."""

from __future__ import annotations

import logging
import os
import signal
import threading
from typing import Callable, Optional

from .base import DEFAULT_INPUT_BUFFER, ConsoleBackend, write_all
from .terminal import ESCAPE_HELP, EscapeFilter, RawTerminal, window_size

__all__ = ['StdioBackend']

log = logging.getLogger(__name__)


def _in_foreground(fd: int) -> bool:
    """Whether this process may read and reconfigure the terminal on ``fd``."""
    try:
        return os.tcgetpgrp(fd) == os.getpgrp()
    except OSError:
        return True  # not our controlling terminal: no job control applies



class StdioBackend(ConsoleBackend):
    """The terminal vdm runs in: raw mode while the guest runs, Ctrl-A x to quit.

    When ``in_fd`` is not a terminal (CI, a pipe, ``</dev/null``) nothing terminal-specific
    happens: input is read as it comes, without raw mode or escapes, and ends at end of file.
    """

    kind = "stdio"

    def __init__(
        self,
        in_fd: int = 0,
        out_fd: int = 1,
        *,
        on_quit: Optional[Callable[[], None]] = None,
        escape: bool = True,
        input_buffer: int = DEFAULT_INPUT_BUFFER,
    ) -> None:
        super().__init__(input_buffer)
        self.in_fd = in_fd
        self.out_fd = out_fd
        #: what Ctrl-A x does; default: SIGINT to the main thread (KeyboardInterrupt there)
        self.on_quit = on_quit
        try:
            os.fstat(in_fd)
            self.has_input = True
        except OSError:
            self.has_input = False  # stdin closed
        self.is_tty = self.has_input and os.isatty(in_fd)
        if self.is_tty and not _in_foreground(in_fd):
            # `vdm run ... &`: touching the terminal would stop vdm (SIGTTOU/SIGTTIN)
            log.warning("vdm is not in the terminal's foreground: console input is off")
            self.has_input = self.is_tty = False
        self._raw: Optional[RawTerminal] = RawTerminal(in_fd) if self.is_tty else None
        self._escape = EscapeFilter(self._quit, self._help) if (escape and self.is_tty) else None
        self._winch_pending = False
        self._prev_winch: object = None

    def start(self, on_input: Callable[[], None]) -> None:
        if self._raw is not None and not self._raw.active and not self._closing:
            self._raw.enter()
            self._install_winch()
        super().start(on_input)

    def window_size(self) -> Optional[tuple[int, int]]:
        for fd in (self.out_fd, self.in_fd):
            size = window_size(fd)
            if size is not None:
                return size
        return None

    def _quit(self) -> None:
        if self._raw is not None:
            self._raw.restore()
        if self.on_quit is not None:
            self.on_quit()
        else:
            signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)  # type: ignore[arg-type]

    def _help(self) -> None:
        self.write(ESCAPE_HELP.encode())

    def _install_winch(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            log.debug("stdio console started off the main thread: no SIGWINCH resize events")
            return
        try:
            self._prev_winch = signal.signal(signal.SIGWINCH, self._on_winch)
        except (ValueError, OSError):
            pass

    def _on_winch(self, signum: int, frame: object) -> None:
        # In a signal handler: no locks. Flag it and wake the input thread, which tells listeners.
        self._winch_pending = True
        self._wake.wake()
        prev = self._prev_winch
        if callable(prev):
            prev(signum, frame)

    def _check_winch(self) -> None:
        if self._winch_pending:
            self._winch_pending = False
            size = self.window_size()
            if size is not None:
                self._notify_resize(*size)

    def _read_source(self, max_bytes: int) -> Optional[bytes]:
        ready = self._wait_readable(self.in_fd)
        self._check_winch()
        if not ready:
            return b""
        data = os.read(self.in_fd, max_bytes)
        if not data:
            return None  # end of file: no more input, output still works
        if self._escape is not None:
            data = self._escape.feed(data)
        return data

    def _write_out(self, data: bytes) -> None:
        write_all(self.out_fd, data, None)

    def _close_source(self) -> None:
        if self._raw is not None:
            self._raw.restore()
        if self._prev_winch is not None and threading.current_thread() is threading.main_thread():
            try:
                signal.signal(signal.SIGWINCH, self._prev_winch)  # type: ignore[arg-type]
            except (ValueError, OSError, TypeError):
                pass
            self._prev_winch = None
