"""One vsock stream connection between a guest port and a host Unix socket, with its credit.

Counters (32-bit wrapping, as on the wire):

* guest -> host: ``rx_cnt`` payload bytes taken from the guest, ``fwd_cnt`` of them written to
  the host socket; the rest wait in ``to_host``. The guest was told ``buf_alloc`` (the
  configured ``buf_size``), so a guest that keeps to its credit never makes ``to_host`` hold
  more than ``buf_alloc`` of its bytes: :meth:`take` refuses a packet that would (the device
  then resets the connection). ``to_host`` may also start with the ``OK <port>\\n`` answer of a
  host-initiated connection (``prefix`` bytes, not guest data, not counted).
* host -> guest: ``tx_cnt`` bytes sent to the guest; ``peer_buf_alloc``/``peer_fwd_cnt`` are the
  guest's credit from its last header. Nothing host -> guest is buffered here: the device reads
  the host socket only into a guest rx buffer, at most :meth:`credit` bytes.

Invariant: ``len(to_host) - prefix <= buf_alloc``. Changed only under the device's lock.
"""

from __future__ import annotations

import socket
from typing import Optional

__all__ = ["CONNECTING", "ESTABLISHED", "Connection"]

#: a host-initiated connection waiting for the guest's RESPONSE
CONNECTING = "connecting"
ESTABLISHED = "established"

#: most bytes handed to one send() call
SEND_CHUNK = 256 * 1024
U32 = 0xFFFF_FFFF


class Connection:
    def __init__(self, sock: socket.socket, host_port: int, guest_port: int, buf_alloc: int,
                 *, state: str = ESTABLISHED) -> None:
        self.sock = sock
        self.host_port = host_port
        self.guest_port = guest_port
        self.buf_alloc = buf_alloc
        self.state = state
        self.to_host = bytearray()
        self.prefix = 0
        self.rx_cnt = 0
        self.fwd_cnt = 0
        #: the fwd_cnt the guest last heard from us
        self.reported_fwd = 0
        self.tx_cnt = 0
        self.peer_buf_alloc = 0
        self.peer_fwd_cnt = 0
        #: SHUTDOWN flags the guest sent (RCV: it reads no more; SEND: it sends no more)
        self.guest_shut = 0
        #: the host socket reached its end (recv gave b"")
        self.host_eof = False
        #: our SHUTDOWN(SEND) went to the guest
        self.shut_sent = False
        #: shutdown(SHUT_WR) done on the host socket (the guest's data all written first)
        self.host_wr_shut = False
        #: the poller saw the host socket readable; the rx path reads it (cleared on EAGAIN)
        self.readable = False
        #: the last send() was cut short: the poller watches for writability
        self.blocked = False
        #: control ops to send the guest, in order, each at most once
        self.ops: list[int] = []

    @property
    def key(self) -> tuple[int, int]:
        return (self.host_port, self.guest_port)

    @property
    def buffered(self) -> int:
        """Guest bytes waiting for the host socket."""
        return len(self.to_host) - self.prefix

    def want(self, op: int) -> None:
        if op not in self.ops:
            self.ops.append(op)

    def note_peer(self, buf_alloc: int, fwd_cnt: int) -> None:
        self.peer_buf_alloc = buf_alloc
        self.peer_fwd_cnt = fwd_cnt

    def credit(self) -> int:
        """Bytes the guest may receive now (0 if its counters claim more in flight than it has room)."""
        in_flight = (self.tx_cnt - self.peer_fwd_cnt) & U32
        return max(0, self.peer_buf_alloc - in_flight)

    def sent(self, n: int) -> None:
        """``n`` payload bytes went to the guest; the header carried our fwd_cnt."""
        self.tx_cnt = (self.tx_cnt + n) & U32
        self.reported_fwd = self.fwd_cnt

    def take(self, data: bytes) -> bool:
        """Queue guest bytes for the host; False (nothing queued) if they exceed the credit given."""
        if self.buffered + len(data) > self.buf_alloc:
            return False
        self.to_host += data
        self.rx_cnt = (self.rx_cnt + len(data)) & U32
        return True

    def answer_ok(self) -> None:
        """Put ``OK <host port>\\n`` ahead of everything for the host (a host-initiated connection)."""
        line = f"OK {self.host_port}\n".encode()
        self.to_host[0:0] = line
        self.prefix += len(line)
        self.state = ESTABLISHED

    def flush(self) -> int:
        """Write what waits for the host socket, without blocking; returns the guest bytes written.

        Raises OSError for a socket that failed (EPIPE, ECONNRESET...)."""
        written = 0
        while self.to_host:
            try:
                n = self.sock.send(memoryview(self.to_host)[:SEND_CHUNK])
            except (BlockingIOError, InterruptedError):
                self.blocked = True
                break
            del self.to_host[:n]
            own = min(n, self.prefix)
            self.prefix -= own
            written += n - own
        else:
            self.blocked = False
        self.fwd_cnt = (self.fwd_cnt + written) & U32
        return written

    def update_due(self) -> bool:
        """The guest believes less than half its credit is free, and more is free now."""
        unreported = (self.fwd_cnt - self.reported_fwd) & U32
        believed_free = self.buf_alloc - ((self.rx_cnt - self.reported_fwd) & U32)
        return unreported > 0 and believed_free < self.buf_alloc // 2

    def done(self) -> bool:
        """Both directions are over: the guest sends no more and its bytes reached the host, and
        either the guest reads no more or the host's end went to it."""
        if not (self.guest_shut & 2) or self.to_host:
            return False
        return bool(self.guest_shut & 1) or (self.host_eof and self.shut_sent)

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


def recv_into_packet(sock: socket.socket, room: int) -> Optional[bytes]:
    """Up to ``room`` bytes from a non-blocking socket; None if none are ready now; b"" at its end.

    Raises OSError for a failed socket."""
    try:
        return sock.recv(room)
    except (BlockingIOError, InterruptedError):
        return None
