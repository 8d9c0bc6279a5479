"""The listening socket: one frontend at a time, the next one accepted after it leaves.

Everything runs on one core :class:`~vdm.eventloop.EventLoop` thread -- accepting, reading
messages, and the kick eventfds -- so that a message never races with queue processing. A message
that breaks the protocol closes that connection with one log line; the server keeps listening.

That loop may serve other devices too (``vdm vhost-user`` with several sockets), so nothing here
waits for a frontend's bytes: a connection's message is assembled as its bytes arrive
(:class:`~.protocol.MessageReader`) and handled once whole; a message left incomplete for
:data:`MESSAGE_TIMEOUT` is ended by a timer on the loop (a timerfd), which closes that connection
alone with one log line. Replies are sent as before, blocking for at most :data:`MESSAGE_TIMEOUT`.

Client mode (``connect=True``, ``vdm vhost-user --connect PATH``): the frontend listens (QEMU
``-chardev socket,server=on,wait=off``, cloud-hypervisor's server mode) and vdm connects. A
connector thread tries until the socket answers (retrying every :data:`RECONNECT_MAX` seconds at
most, one log line while it waits), hands the connection to the loop thread, and connects again
whenever the connection ends -- the frontend restarted, or closed it for an error -- until
:meth:`VhostUserServer.close`. The frontend's socket file is never removed.
"""

from __future__ import annotations

import ctypes
import logging
import os
import socket
import threading
import time

from vdm.device import VirtioDevice
from vdm.errors import UserError
from vdm.eventloop import EventLoop
from vdm.socket_path import clear_stale_socket

from .handler import VhostUserHandler
from .protocol import MessageReader, PeerClosed, ProtocolError

__all__ = ["VhostUserServer"]

log = logging.getLogger(__name__)

#: how long a whole message (header, payload, descriptors) may take once its first bytes arrived
MESSAGE_TIMEOUT = 10.0
#: client mode: the longest wait between two connection attempts (seconds)
RECONNECT_MAX = 1.0

_CLOCK_MONOTONIC = 1
_TFD_FLAGS = os.O_NONBLOCK | os.O_CLOEXEC  # TFD_NONBLOCK, TFD_CLOEXEC


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


class _Itimerspec(ctypes.Structure):
    _fields_ = [("it_interval", _Timespec), ("it_value", _Timespec)]


class _Timer:
    """A one-shot timerfd (CLOCK_MONOTONIC): readable once the time set with :meth:`set` passed."""

    _libc = None

    def __init__(self) -> None:
        if _Timer._libc is None:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.timerfd_create.argtypes = [ctypes.c_int, ctypes.c_int]
            libc.timerfd_settime.argtypes = [
                ctypes.c_int,
                ctypes.c_int,
                ctypes.POINTER(_Itimerspec),
                ctypes.c_void_p,
            ]
            _Timer._libc = libc
        self.fd = self._check(_Timer._libc.timerfd_create(_CLOCK_MONOTONIC, _TFD_FLAGS))
        self.armed = False

    @staticmethod
    def _check(ret: int) -> int:
        if ret < 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))
        return ret

    def set(self, seconds: float | None) -> None:
        """Fire ``seconds`` from now (at least 1 ms); None disarms it."""
        spec = _Itimerspec()
        if seconds is not None:
            ns = max(int(seconds * 1e9), 1_000_000)
            spec.it_value.tv_sec, spec.it_value.tv_nsec = divmod(ns, 1_000_000_000)
        self._check(_Timer._libc.timerfd_settime(self.fd, 0, ctypes.byref(spec), None))
        self.armed = seconds is not None

    def clear(self) -> None:
        """Consume an expiry (the fd is no longer readable) and disarm."""
        try:
            os.read(self.fd, 8)
        except BlockingIOError:
            pass
        self.armed = False

    def close(self) -> None:
        os.close(self.fd)


class VhostUserServer:
    """Serves one device on a Unix socket."""

    def __init__(
        self, socket_path: str, device: VirtioDevice, loop: EventLoop | None = None, *, connect: bool = False
    ) -> None:
        self.path = socket_path
        #: client mode (module doc): connect to a listening frontend instead of listening
        self.connect = connect
        self._connector: threading.Thread | None = None
        self._handover: list[socket.socket] = []
        self._handover_r = self._handover_w = -1
        self.device = device
        self._own_loop = loop is None
        self.loop = loop if loop is not None else EventLoop("vdm-vhost-user")
        self.handler = VhostUserHandler(device, self.loop)
        self.handler.on_failure = self._fail
        self.listener: socket.socket | None = None
        self.conn: socket.socket | None = None
        self._reader: MessageReader | None = None
        #: ends a message left incomplete for MESSAGE_TIMEOUT (armed only while one is open)
        self._timer: _Timer | None = None
        self._inode: tuple[int, int] | None = None
        #: connections served so far and those closed for a protocol error (for logs and tests)
        self.connections = 0
        self.rejected = 0
        self.changed = threading.Condition()
        self._closed = False
        self._started = False

    def start(self) -> VhostUserServer:
        if self.connect:
            return self._start_client()
        clear_stale_socket(self.path, "--socket-path")
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            listener.bind(self.path)
        except OSError as e:
            listener.close()
            raise UserError(f"{self.path}: cannot listen: {e.strerror}") from None
        st = os.stat(self.path)
        self._inode = (st.st_dev, st.st_ino)
        listener.listen(4)
        listener.setblocking(False)
        self.listener = listener
        # kicks arrive on this loop: each is bounded by the core's budget and the rest resumed
        # there, so a device with a long (or hostile) ring cannot starve the others on the loop
        self.device.serve_on(self.loop)
        self._start_loop()
        self.loop.add_reader(listener.fileno(), self._accept)
        log.info("vhost-user: serving %s on %s", self.device.name, self.path)
        return self

    def _start_client(self) -> VhostUserServer:
        self._handover_r, self._handover_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        self.device.serve_on(self.loop)
        self._start_loop()
        self.loop.add_reader(self._handover_r, self._adopt)
        self._connector = threading.Thread(
            target=self._connect_loop, name="vdm-vhost-user-connect", daemon=True
        )
        self._connector.start()
        log.info("vhost-user: serving %s to the frontend listening on %s", self.device.name, self.path)
        return self

    def _start_loop(self) -> None:
        self._timer = _Timer()
        self.loop.start()
        self._started = True
        self.loop.add_reader(self._timer.fd, self._timed_out)

    def _connect_loop(self) -> None:
        """The connector thread (client mode): connect, hand over, wait for the end, again."""
        delay, waiting = 0.05, False
        while not self._closed:
            with self.changed:
                self.changed.wait_for(lambda: self._closed or (self.conn is None and not self._handover), 5)
                if self._closed or self.conn is not None or self._handover:
                    continue
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(MESSAGE_TIMEOUT)
            try:
                sock.connect(self.path)
            except OSError as e:
                sock.close()
                if not waiting:
                    log.info("vhost-user: waiting for a frontend to listen on %s (%s)", self.path, e.strerror)
                    waiting = True
                with self.changed:
                    self.changed.wait_for(lambda: self._closed, delay)
                delay = min(delay * 2, RECONNECT_MAX)
                continue
            delay, waiting = 0.05, False
            with self.changed:
                self._handover.append(sock)
            try:
                os.write(self._handover_w, b"x")
            except OSError:  # closed meanwhile
                return

    # ---- on the loop thread --------------------------------------------------------------------

    def _adopt(self) -> None:
        """Client mode: the connector thread connected; serve that connection here."""
        try:
            os.read(self._handover_r, 64)
        except BlockingIOError:
            pass
        with self.changed:  # kept listed until served: the connector does not connect meanwhile
            taken = list(self._handover)
        for conn in taken:
            if self.conn is not None or self._closed:
                conn.close()
                continue
            self._serve_connection(conn)
        with self.changed:
            del self._handover[: len(taken)]
            self.changed.notify_all()

    def _accept(self) -> None:
        assert self.listener is not None
        try:
            conn, _ = self.listener.accept()
        except BlockingIOError:
            return
        if self.conn is not None:  # not reached: the listener is not watched while connected
            conn.close()
            return
        self.loop.remove_reader(self.listener.fileno())
        self._serve_connection(conn)

    def _serve_connection(self, conn: socket.socket) -> None:
        conn.setblocking(True)
        conn.settimeout(MESSAGE_TIMEOUT)
        self.conn = conn
        self._reader = MessageReader(conn)
        self.connections += 1
        self.handler.attach(conn)
        self.loop.add_reader(conn.fileno(), self._readable)
        log.info("vhost-user: frontend connected (%d)", self.connections)
        self._notify()

    def _readable(self) -> None:
        """The connection has bytes: take them; handle the message if it is whole now (one
        message per call: the loop calls again while more are waiting)."""
        reader = self._reader
        if self.conn is None or reader is None:
            return
        try:
            msg = reader.read()
            timer = self._timer
            if msg is None:
                if reader.started is not None and timer is not None and not timer.armed:
                    timer.set(reader.started + MESSAGE_TIMEOUT - time.monotonic())
                return
            if timer is not None and timer.armed:
                timer.set(None)
            self.handler.handle(msg)
        except PeerClosed:
            self._disconnect("the frontend closed the connection")
        except ProtocolError as e:
            self.rejected += 1
            log.error("vhost-user: %s; closing the connection", e)
            self._disconnect(None)
        except OSError as e:
            self._disconnect(f"connection error: {e}")
        except Exception:
            self.rejected += 1
            log.exception("vhost-user: internal error; closing the connection")
            self._disconnect(None)

    def _timed_out(self) -> None:
        """The timer fired: end the connection if its open message is MESSAGE_TIMEOUT old; a
        message that began after the timer was set gets the rest of its own time."""
        timer, reader = self._timer, self._reader
        if timer is None:
            return
        timer.clear()
        if self.conn is None or reader is None or reader.started is None:
            return
        left = reader.started + MESSAGE_TIMEOUT - time.monotonic()
        if left > 0:
            timer.set(left)
            return
        self.rejected += 1
        log.error("vhost-user: timed out waiting for the rest of %s; closing the connection", reader.what)
        self._disconnect(None)

    def _fail(self, why: str) -> None:
        """The frontend broke something outside a message (a kick fd, its memory): one line, closed."""
        if self.conn is None:
            return
        self.rejected += 1
        log.error("vhost-user: %s; closing the connection", why)
        self._disconnect(None)

    def _disconnect(self, why: str | None) -> None:
        conn = self.conn
        if conn is None:
            return
        if why:
            log.info("vhost-user: %s", why)
        self.loop.remove_reader(conn.fileno())
        if self._timer is not None and self._timer.armed:
            self._timer.set(None)
        try:
            self.handler.detach()
        finally:
            if self._reader is not None:
                self._reader.close()  # an open message's descriptors
                self._reader = None
            conn.close()
            self.conn = None
            if self.listener is not None and not self._closed:
                self.loop.add_reader(self.listener.fileno(), self._accept)
            self._notify()

    def _notify(self) -> None:
        with self.changed:
            self.changed.notify_all()

    # ---- from any thread -----------------------------------------------------------------------

    def wait_for(self, predicate, timeout: float = 10.0) -> bool:
        """Wait until ``predicate(server)`` holds (connections, disconnections); for tests."""
        with self.changed:
            return self.changed.wait_for(lambda: predicate(self), timeout)

    def close(self) -> None:
        """Stop serving: drop the frontend, stop the device, remove the socket file."""
        if self._closed:
            return
        self._closed = True
        self._notify()  # the connector thread (client mode) ends
        done = threading.Event()

        def shutdown() -> None:
            try:
                if self.listener is not None:
                    self.loop.remove_reader(self.listener.fileno())
                if self._timer is not None:
                    self.loop.remove_reader(self._timer.fd)
                self._disconnect("shutting down")
            finally:
                done.set()

        if self._started:  # run the teardown on the loop thread, where messages are handled
            wake_r, wake_w = os.pipe()

            def on_wake() -> None:
                self.loop.remove_reader(wake_r)
                shutdown()

            self.loop.add_reader(wake_r, on_wake)
            os.write(wake_w, b"x")
            done.wait(60)
            os.close(wake_r)
            os.close(wake_w)
        else:
            shutdown()
        if self.listener is not None:
            self.listener.close()
            self.listener = None
        if self._connector is not None:
            self._connector.join(MESSAGE_TIMEOUT + 1)
            self._connector = None
            for conn in self._handover:
                conn.close()
            self._handover.clear()
        if self._handover_r >= 0:
            if self._started:
                self.loop.remove_reader(self._handover_r)
            os.close(self._handover_r)
            os.close(self._handover_w)
            self._handover_r = self._handover_w = -1
        if self._timer is not None:
            self._timer.close()
            self._timer = None
        self._unlink()
        self.device.stop_serving()
        if self._own_loop:
            self.loop.stop()

    def _unlink(self) -> None:
        try:
            st = os.stat(self.path)
            if (st.st_dev, st.st_ino) == self._inode:  # only our own socket, never a newer one
                os.unlink(self.path)
        except FileNotFoundError:
            return
        except PermissionError:  # after --user, the folder may not be ours to look into or change
            log.warning("vhost-user: cannot remove %s (permission denied); remove it by hand", self.path)
