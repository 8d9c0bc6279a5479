"""The host terminal: raw mode that is always undone, the Ctrl-A escape, and the window size.

While a guest owns the terminal, every key goes to the guest (Ctrl-C included), so vdm puts the
terminal in raw mode. Leaving it raw would break the user's shell, so :class:`RawTerminal` restores
the saved settings on every way out it can see: :meth:`RawTerminal.restore` (normal shutdown), an
``atexit`` handler (``sys.exit``, the end of ``main``), ``sys.excepthook`` (an uncaught exception,
restored *before* the traceback prints), and SIGTERM / SIGHUP / SIGQUIT handlers that restore and
then let the signal do what it did before. SIGKILL cannot be caught; ``stty sane`` fixes that one.

:class:`EscapeFilter` implements the escape key: Ctrl-A x quits, Ctrl-A Ctrl-A sends one Ctrl-A,
Ctrl-A h prints help, anything else after Ctrl-A is sent as typed.
"""

from __future__ import annotations

import atexit
import fcntl
import logging
import os
import signal
import struct
import sys
import termios
import threading
from typing import Callable, Optional

__all__ = ["ESCAPE_HELP", "EscapeFilter", "RawTerminal", "window_size"]

log = logging.getLogger(__name__)

CTRL_A = 0x01

ESCAPE_HELP = (
    "\r\nvdm console escapes:\r\n"
    "  Ctrl-A x        quit vdm\r\n"
    "  Ctrl-A Ctrl-A   send Ctrl-A to the guest\r\n"
    "  Ctrl-A h        this help\r\n"
)


def window_size(fd: int) -> Optional[tuple[int, int]]:
    """(rows, cols) of the terminal on ``fd``, or None if it is not a terminal or reports 0x0."""
    try:
        packed = fcntl.ioctl(fd, termios.TIOCGWINSZ, b"\0" * 8)
    except OSError:
        return None
    rows, cols, _, _ = struct.unpack("HHHH", packed)
    if rows == 0 or cols == 0:
        return None
    return rows, cols


class EscapeFilter:
    """Takes the Ctrl-A escape out of a keyboard byte stream (state carries across reads)."""

    def __init__(self, on_quit: Callable[[], None], on_help: Optional[Callable[[], None]] = None) -> None:
        self.on_quit = on_quit
        self.on_help = on_help
        self._after_escape = False
        self.quit = False

    def feed(self, data: bytes) -> bytes:
        """Return the bytes meant for the guest; act on escapes."""
        out = bytearray()
        for b in data:
            if self.quit:
                break  # nothing typed after "quit" reaches the guest
            if self._after_escape:
                self._after_escape = False
                if b in (ord("x"), ord("X")):
                    self.quit = True
                    self.on_quit()
                elif b == CTRL_A:
                    out.append(CTRL_A)
                elif b in (ord("h"), ord("H"), ord("?")):
                    if self.on_help is not None:
                        self.on_help()
                else:
                    out += bytes((CTRL_A, b))
            elif b == CTRL_A:
                self._after_escape = True
            else:
                out.append(b)
        return bytes(out)


# ---- raw mode with guaranteed restore ----------------------------------------------------------

_active: list[RawTerminal] = []
_lock = threading.Lock()
_hooks_installed = False
_prev_excepthook = sys.excepthook
_prev_handlers: dict[int, object] = {}
_CLEANUP_SIGNALS = (signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT)


def _restore_all() -> None:
    for term in list(_active):
        term.restore()


def _excepthook(tp, value, tb):  # type: ignore[no-untyped-def]
    _restore_all()
    _prev_excepthook(tp, value, tb)


def _on_signal(signum: int, frame: object) -> None:
    _restore_all()
    prev = _prev_handlers.get(signum, signal.SIG_DFL)
    if callable(prev):
        prev(signum, frame)
        return
    if prev == signal.SIG_IGN:
        return
    # the default action (terminate, or core dump for SIGQUIT) with the terminal already sane
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)


def _install_hooks() -> None:
    global _hooks_installed, _prev_excepthook
    if _hooks_installed:
        return
    _hooks_installed = True
    atexit.register(_restore_all)
    _prev_excepthook = sys.excepthook
    sys.excepthook = _excepthook
    if threading.current_thread() is not threading.main_thread():
        log.debug("raw terminal set up off the main thread: no signal handlers (atexit still restores)")
        return
    for sig in _CLEANUP_SIGNALS:
        try:
            _prev_handlers[sig] = signal.getsignal(sig)
            signal.signal(sig, _on_signal)
        except (ValueError, OSError):  # pragma: no cover - platform without the signal
            pass


class RawTerminal:
    """Raw mode on a terminal fd, restored on every exit path vdm can catch."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.saved = termios.tcgetattr(fd)
        self.active = False

    def enter(self) -> None:
        """Raw input (no echo, no line editing, no signals from keys); output processing kept.

        TCSANOW, not TCSAFLUSH: keys typed before the guest started are kept for it.
        """
        mode = termios.tcgetattr(self.fd)
        iflag, oflag, cflag, lflag, ispeed, ospeed, cc = mode
        iflag &= ~(termios.IGNBRK | termios.BRKINT | termios.PARMRK | termios.ISTRIP | termios.INLCR
                   | termios.IGNCR | termios.ICRNL | termios.IXON)
        lflag &= ~(termios.ECHO | termios.ECHONL | termios.ICANON | termios.ISIG | termios.IEXTEN)
        cflag = (cflag & ~(termios.CSIZE | termios.PARENB)) | termios.CS8
        # OPOST stays on, as QEMU and kvmtool do: vdm's own messages still start at column 0.
        cc = list(cc)
        cc[termios.VMIN] = 1
        cc[termios.VTIME] = 0
        with _lock:
            _install_hooks()
            termios.tcsetattr(self.fd, termios.TCSANOW, [iflag, oflag, cflag, lflag, ispeed, ospeed, cc])
            self.active = True
            if self not in _active:
                _active.append(self)

    def restore(self) -> None:
        """Put the saved settings back (idempotent, safe from handlers)."""
        if not self.active:
            return
        self.active = False
        try:
            termios.tcsetattr(self.fd, termios.TCSADRAIN, self.saved)
        except (termios.error, OSError):
            pass  # the terminal went away (hangup); nothing to restore
        try:
            _active.remove(self)
        except ValueError:
            pass
