"""The host side of a vsock device: the listening socket, ``CONNECT`` lines, socket readiness.

:class:`HostSide` is a part of :class:`vdm_vsock.device.VsockDevice` (which it is mixed into):
the poller thread (:class:`vdm.poller.FdPoller`) calls :meth:`HostSide._interest` for what to watch and
:meth:`HostSide._ready` when a socket is ready; both work on the device's connection table under
its lock. A host program connects to ``PATH`` and sends ``CONNECT <port>\\n`` (at most
``MAX_LINE`` bytes, peeked so nothing after it is lost); the device then sends the guest a
REQUEST from a fresh host port and answers ``OK <hostport>\\n`` when the guest accepts. At most
``max_conns`` host programs may be still sending their line; more are closed with one warning.
"""

from __future__ import annotations

import selectors
import socket
from typing import TYPE_CHECKING, Iterable

from .conn import CONNECTING, Connection
from .packet import SHUTDOWN_RCV, Op

if TYPE_CHECKING:
    from .device import VsockDevice

__all__ = ["FIRST_HOST_PORT", "LAST_HOST_PORT", "MAX_LINE", "Handshake", "HostSide", "listen_on"]

RX = 0
#: the longest ``CONNECT <port>\n`` line a host program may send
MAX_LINE = 32
#: host ports given to host-initiated connections: from here up, wrapping within the range
FIRST_HOST_PORT, LAST_HOST_PORT = 1 << 30, (1 << 31) - 1

def listen_on(path: str) -> socket.socket:
    """A non-blocking Unix listening socket at ``path`` (OSError if it cannot be made)."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        s.bind(path)
        s.listen(128)
        s.setblocking(False)
    except BaseException:
        s.close()
        raise
    return s


class Handshake:
    """A host program that connected to PATH and has not yet sent its whole CONNECT line."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        #: the line's bytes so far (at most MAX_LINE)
        self.line = bytearray()



class HostSide:
    """The host-socket half of VsockDevice (see the module doc); only VsockDevice uses it."""

    def _interest(self: VsockDevice) -> dict[int, tuple[int, object]]:
        """What the poller watches now (called by its thread)."""
        read, write = selectors.EVENT_READ, selectors.EVENT_WRITE
        out: dict[int, tuple[int, object]] = {}
        with self._lock:
            busy = len(self._conns) + len(self._handshakes)
            if self._listener is not None and busy < 2 * self.config.max_conns:
                out[self._listener.fileno()] = (read, self._listener)
            for fd, hs in self._handshakes.items():
                out[fd] = (read, hs)
            for conn in self._conns.values():
                mask = 0
                if conn.state == CONNECTING:
                    mask = 0 if conn.readable else read  # a host program that gives up before OK
                elif (not conn.readable and not conn.host_eof and not conn.guest_shut & SHUTDOWN_RCV
                      and conn.credit() > 0):
                    mask = read
                if conn.blocked and conn.to_host:
                    mask |= write
                if mask:
                    out[conn.sock.fileno()] = (mask, conn)
        return out

    def _ready(self: VsockDevice, tag: object, events: int) -> Iterable[int]:
        """A watched socket is ready (the poller's thread); returns the queues to kick."""
        with self._lock:
            if tag is self._listener:
                self._accept()
            elif isinstance(tag, Handshake):
                self._read_connect_line(tag)
            elif isinstance(tag, Connection) and tag.key in self._conns and self._conns[tag.key] is tag:
                conn = tag
                if events & selectors.EVENT_WRITE:
                    self._flush(conn)
                if events & selectors.EVENT_READ and conn.key in self._conns:
                    if conn.state == CONNECTING:
                        try:
                            gone = conn.sock.recv(1, socket.MSG_PEEK) == b""
                        except BlockingIOError:
                            gone = False
                        except OSError:
                            gone = True
                        if gone:  # the host program left before the guest answered
                            self._reset(conn)
                        else:
                            conn.readable = True  # its bytes wait for the guest's RESPONSE
                    else:
                        conn.readable = True
        return (RX,)

    def _accept(self: VsockDevice) -> None:
        assert self._listener is not None
        try:
            sock, _ = self._listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        except OSError as e:
            self._warn("accepting on %s: %s", self.config.path, e.strerror or e)
            return
        if len(self._handshakes) >= self.config.max_conns:
            self._warn("host connection on %s closed: %d others have not sent their CONNECT line yet",
                       self.config.path, len(self._handshakes))
            sock.close()
            return
        sock.setblocking(False)
        self._handshakes[sock.fileno()] = Handshake(sock)

    def _read_connect_line(self: VsockDevice, hs: Handshake) -> None:
        """Read ``CONNECT <port>\\n``. Bytes before the newline are taken as they come (kept in
        ``hs.line``, so the thread is not woken for them again); the newline is found by peeking,
        so bytes after the line stay in the socket for the guest."""
        try:
            data = hs.sock.recv(MAX_LINE - len(hs.line), socket.MSG_PEEK)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        end = data.find(b"\n")
        complete = end >= 0
        taken = data[: end + 1] if complete else data
        try:
            if taken:
                hs.sock.recv(len(taken))
        except OSError:
            complete = False
        hs.line += taken
        if not complete and taken and len(hs.line) < MAX_LINE:
            return  # the rest of the line is still coming
        self._handshakes.pop(hs.sock.fileno(), None)
        words = bytes(hs.line).split() if complete else []
        port = int(words[1]) if len(words) == 2 and words[0] == b"CONNECT" and words[1].isdigit() else -1
        if not 0 <= port <= 0xFFFF_FFFF or not self.activated:
            if hs.line:
                self._warn("host connection on %s: expected 'CONNECT <port>\\n', got %r: closed",
                           self.config.path, bytes(hs.line))
            hs.sock.close()
            return
        if len(self._conns) >= self.config.max_conns:
            self._warn("host connection to guest port %d refused: %d connections already (max_conns)",
                       port, len(self._conns))
            hs.sock.close()
            return
        host_port = self._free_host_port(port)
        conn = Connection(hs.sock, host_port, port, self.config.buf_size, state=CONNECTING)
        conn.want(Op.REQUEST)
        self._conns[conn.key] = conn
        self.stats["connections"] += 1

    def _free_host_port(self: VsockDevice, guest_port: int) -> int:
        while True:
            port = self._next_port
            self._next_port = port + 1 if port < LAST_HOST_PORT else FIRST_HOST_PORT
            if (port, guest_port) not in self._conns:
                return port
