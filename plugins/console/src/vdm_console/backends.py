"""The console backends: stdio, pty, unix socket, file and null, and ``open_backend(spec)``.

Each is a small :class:`~vdm_console.backend.ConsoleBackend`: it says how to read its source and
where output goes; buffering and flow control are the base class's.

Guest output never stalls the guest: the pty and socket backends buffer output (64 KiB) for a
writer thread; with nobody attached, or a reader that stopped reading and let the buffer fill,
output is dropped (counted in ``dropped_output``) instead of blocking the vCPU. The terminal and
a log file are written synchronously and fully.
"""

from __future__ import annotations

import errno
import logging
import os
import select
import signal
import socket
import stat
import sys
import threading
import tty
from typing import Callable, Optional

from vdm.errors import UserError

from .backend import DEFAULT_INPUT_BUFFER, ConsoleBackend
from .terminal import ESCAPE_HELP, EscapeFilter, RawTerminal, window_size

__all__ = [
    "FileBackend",
    "MemoryBackend",
    "NullBackend",
    "PtyBackend",
    "SocketBackend",
    "StdioBackend",
    "open_backend",
]

log = logging.getLogger(__name__)


def _write_all(fd: int, data: bytes, timeout: Optional[float]) -> int:
    """Write ``data`` to ``fd`` (blocking or not); give up after ``timeout`` seconds without
    progress. Returns the number of bytes written."""
    view = memoryview(data)
    done = 0
    while done < len(view):
        try:
            done += os.write(fd, view[done:])
            continue
        except BlockingIOError:
            pass
        except InterruptedError:
            continue
        p = select.poll()
        p.register(fd, select.POLLOUT)
        if not p.poll(None if timeout is None else int(timeout * 1000)):
            break
    return done


def _in_foreground(fd: int) -> bool:
    """Whether this process may read and reconfigure the terminal on ``fd``."""
    try:
        return os.tcgetpgrp(fd) == os.getpgrp()
    except OSError:
        return True  # not our controlling terminal: no job control applies


class MemoryBackend(ConsoleBackend):
    """Output collected in :attr:`output`; input given with :meth:`inject` (tests, embedding).

    :meth:`inject` stands for the source: it always succeeds, so it does not exercise flow
    control (the real backends do); :meth:`wait_output` waits for output to arrive.
    """

    kind = "memory"

    def __init__(self, input_buffer: int = DEFAULT_INPUT_BUFFER) -> None:
        super().__init__(input_buffer)
        self.output = bytearray()
        self._out_cond = threading.Condition()

    def inject(self, data: bytes) -> None:
        """Bytes typed by the user: buffered and announced to the consumer."""
        self._deliver(bytes(data))

    def window_size(self) -> Optional[tuple[int, int]]:
        return self.size

    size: Optional[tuple[int, int]] = None

    def resize(self, rows: int, cols: int) -> None:
        """Pretend the terminal was resized."""
        self.size = (rows, cols)
        self._notify_resize(rows, cols)

    def _write_out(self, data: bytes) -> None:
        with self._out_cond:
            self.output += data
            self._out_cond.notify_all()

    def take_output(self) -> bytes:
        with self._out_cond:
            data = bytes(self.output)
            self.output.clear()
            return data

    def wait_output(self, n: int, timeout: float = 5.0) -> bytes:
        """Wait until at least ``n`` bytes of output arrived; return (and keep) all of it."""
        with self._out_cond:
            self._out_cond.wait_for(lambda: len(self.output) >= n, timeout)
            return bytes(self.output)


class NullBackend(ConsoleBackend):
    """Output is discarded; there is no input."""

    kind = "null"


class FileBackend(ConsoleBackend):
    """Guest output is appended to a file (a boot log); there is no input."""

    kind = "file"

    def __init__(self, path: str, input_buffer: int = DEFAULT_INPUT_BUFFER) -> None:
        super().__init__(input_buffer)
        self.path = path
        try:
            self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as e:
            raise UserError(f"console log file {path}: {e.strerror}") from None

    @property
    def description(self) -> str:
        return f"file {self.path}"

    def _write_out(self, data: bytes) -> None:
        _write_all(self._fd, data, None)

    def _close_source(self) -> None:
        os.close(self._fd)


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
        _write_all(self.out_fd, data, None)

    def _close_source(self) -> None:
        if self._raw is not None:
            self._raw.restore()
        if self._prev_winch is not None and threading.current_thread() is threading.main_thread():
            try:
                signal.signal(signal.SIGWINCH, self._prev_winch)  # type: ignore[arg-type]
            except (ValueError, OSError, TypeError):
                pass
            self._prev_winch = None


class PtyBackend(ConsoleBackend):
    """A new pseudo-terminal; connect with ``screen /dev/pts/N`` (the path is printed).

    The slave side is raw (no echo: guest output must not come back as input). vdm does not keep
    the slave open, so it can tell whether anyone is attached: output with nobody attached is
    dropped rather than piling up, and a client may come and go.
    """

    kind = "pty"
    has_input = True
    output_buffer = 64 * 1024

    def __init__(
        self,
        *,
        announce: bool = True,
        write_timeout: float = 1.0,
        input_buffer: int = DEFAULT_INPUT_BUFFER,
    ) -> None:
        super().__init__(input_buffer)
        self.write_timeout = write_timeout
        self.master, slave = os.openpty()
        try:
            tty.setraw(slave)
            self.path = os.ttyname(slave)
        finally:
            os.close(slave)
        os.set_blocking(self.master, False)
        os.set_inheritable(self.master, False)
        log.info("console on pty %s", self.path)
        if announce:
            print(f"vdm: console on {self.path}", file=sys.stderr, flush=True)

    @property
    def description(self) -> str:
        return f"pty {self.path}"

    def connected(self) -> bool:
        """Whether some process has the slave side open."""
        p = select.poll()
        p.register(self.master, select.POLLIN)
        for _, ev in p.poll(0):
            if ev & select.POLLHUP:
                return False
        return True

    def window_size(self) -> Optional[tuple[int, int]]:
        return window_size(self.master)

    def _read_source(self, max_bytes: int) -> Optional[bytes]:
        if not self.connected():
            # Nobody attached: the master reads EIO and polls HUP until someone opens the slave.
            self._wait_readable(-1, 0.1)
            return b""
        if not self._wait_readable(self.master):
            return b""
        try:
            return os.read(self.master, max_bytes)
        except OSError as e:
            if e.errno == errno.EIO:  # the client went away between poll and read
                return b""
            raise

    def _accepts_output(self) -> bool:
        return self.connected()

    def _write_out(self, data: bytes) -> None:
        if not self.connected():
            self.dropped_output += len(data)
            return
        done = _write_all(self.master, data, self.write_timeout)
        self.dropped_output += len(data) - done

    def _close_source(self) -> None:
        os.close(self.master)


class SocketBackend(ConsoleBackend):
    """A unix socket server: one client at a time; when it leaves, the next one is accepted.

    A stale socket file at ``path`` is replaced; any other file there is an error. Output while no
    client is connected is dropped.
    """

    kind = "socket"
    has_input = True
    output_buffer = 64 * 1024

    def __init__(
        self, path: str, *, write_timeout: float = 1.0, input_buffer: int = DEFAULT_INPUT_BUFFER
    ) -> None:
        super().__init__(input_buffer)
        self.path = path
        self.write_timeout = write_timeout
        self._client: Optional[socket.socket] = None
        self._client_lock = threading.Lock()
        self.clients_served = 0
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            pass
        except OSError as e:
            raise UserError(f"console socket {path}: {e.strerror}") from None
        else:
            if not stat.S_ISSOCK(st.st_mode):
                raise UserError(f"console socket {path}: exists and is not a socket")
            os.unlink(path)
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self._listener.bind(path)
            self._listener.listen(1)
        except OSError as e:
            self._listener.close()
            raise UserError(f"console socket {path}: {e.strerror}") from None
        log.info("console on unix socket %s", path)

    @property
    def description(self) -> str:
        return f"socket {self.path}"

    @property
    def connected(self) -> bool:
        return self._client is not None

    def _accepts_output(self) -> bool:
        return self._client is not None

    def _drop_client(self, client: socket.socket) -> None:
        with self._client_lock:
            if self._client is client:
                self._client = None
        try:
            client.close()
        except OSError:
            pass

    def _read_source(self, max_bytes: int) -> Optional[bytes]:
        client = self._client
        if client is None:
            if not self._wait_readable(self._listener.fileno()):
                return b""
            try:
                conn, _ = self._listener.accept()
            except OSError as e:
                log.debug("%s: accept failed: %s", self.description, e)
                return b""
            conn.settimeout(self.write_timeout)
            with self._client_lock:
                self._client = conn
            self.clients_served += 1
            log.info("%s: client connected", self.description)
            return b""
        if not self._wait_readable(client.fileno()):
            return b""
        try:
            data = client.recv(max_bytes)
        except (socket.timeout, BlockingIOError, InterruptedError):
            return b""
        except OSError:
            data = b""
        if not data:
            log.info("%s: client disconnected", self.description)
            self._drop_client(client)
        return data

    def _write_out(self, data: bytes) -> None:
        with self._client_lock:
            client = self._client
            if client is None:
                self.dropped_output += len(data)
                return
            try:
                client.sendall(data)
            except socket.timeout:
                self.dropped_output += len(data)  # the client stopped reading
            except OSError:
                self.dropped_output += len(data)  # it went away; the input thread notices

    def _close_source(self) -> None:
        client = self._client
        if client is not None:
            self._drop_client(client)
        self._listener.close()
        try:
            if stat.S_ISSOCK(os.lstat(self.path).st_mode):
                os.unlink(self.path)
        except OSError:
            pass


def open_backend(spec: str, **kw: object) -> ConsoleBackend:
    """Open the backend ``spec`` names: ``stdio``, ``pty``, ``socket:PATH``, ``file:PATH``, ``null``.

    Raises :class:`vdm.errors.UserError` for an unknown kind or a path that cannot be used.
    """
    kind, _, arg = spec.partition(":")
    kind = kind.strip().lower()
    if kind in ("stdio", "pty", "null") and arg:
        raise UserError(f"console backend '{spec}': '{kind}' takes no path")
    if kind == "stdio":
        return StdioBackend(**kw)  # type: ignore[arg-type]
    if kind == "pty":
        return PtyBackend(**kw)  # type: ignore[arg-type]
    if kind == "null":
        return NullBackend(**kw)  # type: ignore[arg-type]
    if kind in ("socket", "unix", "file"):
        if not arg:
            raise UserError(f"console backend '{spec}': give a path, as in {kind}:/path")
        if kind == "file":
            return FileBackend(arg, **kw)  # type: ignore[arg-type]
        return SocketBackend(arg, **kw)  # type: ignore[arg-type]
    raise UserError(f"unknown console backend '{spec}' (use stdio, pty, socket:PATH, file:PATH or null)")

