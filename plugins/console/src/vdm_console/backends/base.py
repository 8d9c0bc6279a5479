"""The console backend interface, shared by the 16550A UART and virtio-console.

A backend is where a guest's console goes: the terminal vdm runs in, a pty, a unix socket, a log
file, or nowhere. Its two halves:

* **output** -- :meth:`ConsoleBackend.write` takes what the guest transmitted;
* **input** -- a *pull* model with a bounded buffer. :meth:`ConsoleBackend.start` is given an
  ``on_input()`` callback, called (from the backend's input thread, with no lock held) whenever
  new bytes are waiting. The consumer then takes as many as it has room for with
  :meth:`ConsoleBackend.read` -- the UART up to the free space of its 16-byte RX FIFO, virtio-console
  as many as its receive buffers hold -- and takes the rest later, when room appears (the guest read
  RBR, or posted new buffers). While the buffer is full the input thread stops reading its source,
  so the kernel's own buffers (tty, socket) hold further input and nothing is ever dropped.

``on_input`` may be called when there is nothing to read (spurious wake-ups are harmless), and a
consumer may call :meth:`read` at any time; it never blocks.

Subclasses implement :meth:`_read_source` (block until some input or :attr:`_closing`) and
:meth:`_write_out`; :class:`ConsoleBackend` owns the buffer, the thread and the flow control.
"""

from __future__ import annotations

import errno
import logging
import os
import select
import threading
from typing import Callable, Optional

__all__ = ["DEFAULT_INPUT_BUFFER", "ConsoleBackend", "WakePipe", "write_all"]

log = logging.getLogger(__name__)

#: bytes of input a backend holds for a consumer that has no room (then it stops reading)
DEFAULT_INPUT_BUFFER = 4096


def write_all(fd: int, data: bytes, timeout: Optional[float]) -> int:
    """Write ``data`` to ``fd`` (blocking or not); give up after ``timeout`` seconds without
    progress, or when the reader hung up (a pty master whose client left polls HUP while writes
    still say EAGAIN: waiting on it would spin). Returns the number of bytes written."""
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
        ready = p.poll(None if timeout is None else int(timeout * 1000))
        if not ready or not ready[0][1] & select.POLLOUT:
            break
    return done


class WakePipe:
    """A self-pipe that interrupts a ``select`` in the input thread (close, resize, ...)."""

    def __init__(self) -> None:
        self.rfd, self.wfd = os.pipe()
        for fd in (self.rfd, self.wfd):
            os.set_blocking(fd, False)
            os.set_inheritable(fd, False)

    def wake(self) -> None:
        try:
            os.write(self.wfd, b"x")
        except (BlockingIOError, OSError):
            pass  # already pending, or closed

    def drain(self) -> None:
        try:
            while os.read(self.rfd, 256):
                pass
        except (BlockingIOError, OSError):
            pass

    def close(self) -> None:
        for fd in (self.rfd, self.wfd):
            try:
                os.close(fd)
            except OSError:
                pass


class ConsoleBackend:
    """Base of every console backend: bounded, flow-controlled input and plain output."""

    #: short kind name: "stdio", "pty", "socket", "file", "null"
    kind = "null"

    def __init__(self, input_buffer: int = DEFAULT_INPUT_BUFFER) -> None:
        if input_buffer < 1:
            raise ValueError("input_buffer must be at least 1 byte")
        self.capacity = input_buffer
        self._buf = bytearray()
        self._cond = threading.Condition()
        self._on_input: Optional[Callable[[], None]] = None
        self._resize_listeners: list[Callable[[int, int], None]] = []
        self._thread: Optional[threading.Thread] = None
        self._closing = False
        self._wake = WakePipe()
        self._write_lock = threading.Lock()
        #: bytes of guest output that could not be delivered (no reader attached, reader too slow)
        self.dropped_output = 0
        self._out = bytearray()
        self._out_cond = threading.Condition()
        self._writing = False
        self._writer: Optional[threading.Thread] = None

    # ---- what a consumer (UART, virtio-console) calls --------------------------------------------

    @property
    def description(self) -> str:
        """Where the console is, for a log line ("pty /dev/pts/3", "socket /run/vm.sock")."""
        return self.kind

    def start(self, on_input: Callable[[], None]) -> None:
        """Start delivering input; ``on_input()`` is called whenever bytes are waiting."""
        with self._cond:
            self._on_input = on_input
            pending = bool(self._buf)
            if self._thread is None and self.has_input and not self._closing:
                self._thread = threading.Thread(target=self._input_loop, name=f"vdm-console-{self.kind}",
                                                daemon=True)
                self._thread.start()
        if pending:
            on_input()

    def read(self, max_bytes: int) -> bytes:
        """Take up to ``max_bytes`` of waiting input (never blocks; b"" when none)."""
        if max_bytes <= 0:
            return b""
        with self._cond:
            if not self._buf:
                return b""
            data = bytes(self._buf[:max_bytes])
            del self._buf[:max_bytes]
            self._cond.notify_all()  # the input thread may be waiting for room
            return data

    def pending(self) -> int:
        """How many input bytes are waiting."""
        with self._cond:
            return len(self._buf)

    def write(self, data: bytes) -> None:
        """Deliver guest output. Never raises: a vanished reader is logged and counted.

        Backends with :attr:`output_buffer` set never block the caller (a vCPU): output goes to a
        bounded buffer that a writer thread drains in large writes, and what does not fit while a
        reader is not reading is dropped and counted -- a stalled client must not stall the guest.
        """
        if not data:
            return
        if self.output_buffer:
            if not self._accepts_output():
                self.dropped_output += len(data)
                return
            with self._out_cond:
                room = self.output_buffer - len(self._out)
                if len(data) > room:
                    self.dropped_output += len(data) - max(room, 0)
                    data = data[: max(room, 0)]
                if data:
                    self._out += data
                    self._out_cond.notify_all()
                    if self._writer is None and not self._closing:
                        self._writer = threading.Thread(target=self._writer_loop,
                                                        name=f"vdm-console-{self.kind}-out", daemon=True)
                        self._writer.start()
            return
        with self._write_lock:
            try:
                self._write_out(bytes(data))
            except OSError as e:
                self.dropped_output += len(data)
                log.debug("%s: guest output dropped: %s", self.description, e)

    def flush(self, timeout: float = 5.0) -> bool:
        """Wait until buffered output was handed to the destination (True) or ``timeout``."""
        with self._out_cond:
            return self._out_cond.wait_for(lambda: not self._out and not self._writing, timeout)

    def _writer_loop(self) -> None:
        while True:
            with self._out_cond:
                self._out_cond.wait_for(lambda: self._out or self._closing)
                if not self._out:
                    return
                data = bytes(self._out)
                self._out.clear()
                self._writing = True
            try:
                with self._write_lock:
                    self._write_out(data)
            except OSError as e:
                self.dropped_output += len(data)
                log.debug("%s: guest output dropped: %s", self.description, e)
            finally:
                with self._out_cond:
                    self._writing = False
                    self._out_cond.notify_all()

    def window_size(self) -> Optional[tuple[int, int]]:
        """The terminal's (rows, cols), or None if this backend is not a terminal."""
        return None

    def add_resize_listener(self, callback: Callable[[int, int], None]) -> None:
        """Call ``callback(rows, cols)`` whenever the terminal is resized."""
        self._resize_listeners.append(callback)

    def close(self) -> None:
        """Stop the input thread and release the source. Idempotent."""
        if self.output_buffer:
            self.flush(2.0)  # the guest's last words, if a reader takes them
        with self._cond:
            if self._closing:
                return
            self._closing = True
            self._cond.notify_all()
        with self._out_cond:
            self._out_cond.notify_all()
        self._wake.wake()
        for t in (self._thread, self._writer):
            if t is not None and t is not threading.current_thread():
                t.join(timeout=5)
        self._close_source()
        self._wake.close()

    def __enter__(self) -> ConsoleBackend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- what a backend implements --------------------------------------------------------------

    #: whether the backend has an input side at all (file and null do not)
    has_input = False
    #: bytes of output buffered for a writer thread (0: write synchronously, blocking the caller)
    output_buffer = 0

    def _accepts_output(self) -> bool:
        """Whether anyone is there to take output now (buffered backends drop it otherwise)."""
        return True

    def _read_source(self, max_bytes: int) -> Optional[bytes]:
        """Block until input arrives; return it (b"" to try again), or None when input ended."""
        return None

    def _write_out(self, data: bytes) -> None:
        """Write guest output to the destination (may raise OSError)."""

    def _close_source(self) -> None:
        """Release file descriptors (called once, after the input thread stopped)."""

    # ---- helpers for subclasses -----------------------------------------------------------------

    def _wait_readable(self, fd: int, timeout: Optional[float] = None) -> bool:
        """Block until ``fd`` is readable (True) or the backend is closing, woken or the
        ``timeout`` passed (False). ``fd`` may be -1 to just wait for a wake-up or the timeout."""
        p = select.poll()
        p.register(self._wake.rfd, select.POLLIN)
        if fd >= 0:
            p.register(fd, select.POLLIN)
        try:
            events = p.poll(None if timeout is None else int(timeout * 1000))
        except OSError as e:  # EINTR is retried by Python; anything else: back off, try again
            log.debug("%s: poll failed: %s", self.description, e)
            events = []
            threading.Event().wait(0.1)
        ready = False
        for efd, _ in events:
            if efd == self._wake.rfd:
                self._wake.drain()
            elif efd == fd:
                ready = True  # readable, or hung up / error: the read tells which
        return ready and not self._closing

    def _notify_resize(self, rows: int, cols: int) -> None:
        for cb in list(self._resize_listeners):
            try:
                cb(rows, cols)
            except Exception:  # a consumer bug must not kill the input thread
                log.exception("%s: resize listener failed", self.description)

    def _deliver(self, data: bytes) -> None:
        """Append input to the buffer (the caller made sure it fits) and tell the consumer."""
        if not data:
            return
        with self._cond:
            self._buf += data
            cb = self._on_input
        if cb is not None:
            try:
                cb()
            except Exception:
                log.exception("%s: input consumer failed", self.description)

    def _input_loop(self) -> None:
        while True:
            with self._cond:
                # flow control: no room, no reading -- the source keeps the bytes
                while len(self._buf) >= self.capacity and not self._closing:
                    self._cond.wait()
                if self._closing:
                    return
                room = self.capacity - len(self._buf)
            try:
                data = self._read_source(room)
            except OSError as e:
                if e.errno not in (errno.EAGAIN, errno.EINTR):
                    log.warning("%s: input stopped: %s", self.description, e)
                    return
                continue
            if data is None:
                log.debug("%s: end of input", self.description)
                return
            self._deliver(data)  # never truncate: a source that overshoots only overfills a little
