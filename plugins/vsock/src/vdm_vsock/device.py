"""virtio-vsock (virtio 1.2, 5.10) whose host side is Unix sockets.

Reading top to bottom: identity and config space (the guest's CID); the packets the guest sends
on the tx queue (parsed, checked, applied to the connection table); the packets the device
sends on the rx queue (control packets first, then data read from host sockets within the
guest's credit); life cycle. The host side (the listening socket, ``CONNECT`` lines, readiness
from the core's :class:`vdm.poller.FdPoller`) is :mod:`vdm_vsock.host`, mixed in.

Queues: 0 rx (device -> driver), 1 tx (driver -> device), 2 event (the device never posts an
event: its buffers stay with the device). No feature bits (stream sockets only).

Host side, firecracker's convention: a guest REQUEST to host port P connects a Unix socket to
``PATH_P``; a host program connecting to ``PATH`` sends ``CONNECT P\\n``, the device sends the
guest a REQUEST from a fresh host port H to P and, once the guest answers RESPONSE, writes
``OK H\\n`` to the host program; from then on bytes flow both ways.

Bounds against a hostile guest (every one is one log line, at most ``WARN_LINES`` per device,
and a RST for the connection concerned): at most ``max_conns`` connections (and as many host
programs still to send their ``CONNECT`` line); at most ``buf_size`` guest bytes buffered per
connection (the credit the guest was given: a packet past it resets the connection); at most
``MAX_CTRL`` control packets waiting for rx buffers (more are dropped and counted); nothing
host -> guest is buffered (host sockets are read straight into the guest's rx buffers, within
its credit). A packet shorter than its header, or with a ``len`` its buffers do not hold, is
returned unread. Nothing a guest sends fails the device.

Hardware access is injected: ``dial(port)`` opens the host socket for a guest connection
(default: a non-blocking ``AF_UNIX`` connect to ``PATH_port``), ``listener`` is the listening
socket (default: made on ``PATH`` by :func:`vdm_vsock.host.listen_on`; tests may pass their own or none).
"""

from __future__ import annotations

import collections
import logging
import os
import socket
import struct
import threading
from typing import Callable, Optional

from vdm.device import VirtioDevice
from vdm.poller import FdPoller
from vdm.virtqueue import Virtqueue

from .config import VsockConfig
from .conn import CONNECTING, ESTABLISHED, Connection, recv_into_packet
from .host import FIRST_HOST_PORT, Handshake, HostSide, listen_on
from .packet import HDR, HOST_CID, MAX_PAYLOAD, SHUTDOWN_RCV, SHUTDOWN_SEND, TYPE_STREAM, Hdr, Op

__all__ = ["MAX_CTRL", "VIRTIO_ID_VSOCK", "VsockDevice", "listen_on"]

log = logging.getLogger(__name__)

VIRTIO_ID_VSOCK = 19
RX, TX, EVENT = 0, 1, 2
#: control packets (RSTs to connections that are gone) waiting for rx buffers
MAX_CTRL = 1024
#: warnings logged per device; later ones are counted in ``stats["warnings"]``
WARN_LINES = 64


class VsockDevice(HostSide, VirtioDevice):
    """virtio-vsock over Unix sockets.

    Invariants (under ``_lock``): ``len(_conns) <= max_conns``; every connection's
    ``buffered <= buf_size``; ``len(_ctrl) <= MAX_CTRL``; a connection's socket is open exactly
    while it is in ``_conns``.
    """

    device_id = VIRTIO_ID_VSOCK
    name = "vsock"

    def __init__(self, config: VsockConfig, *, listener: Optional[socket.socket] = None,
                 dial: Optional[Callable[[int], socket.socket]] = None) -> None:
        self.config = config
        self.queue_max_sizes = (config.queue_size,) * 3
        super().__init__()
        self._listener = listener
        self._dial = dial if dial is not None else self._dial_unix
        self._lock = threading.Lock()
        self._conns: dict[tuple[int, int], Connection] = {}
        self._handshakes: dict[int, Handshake] = {}
        #: packed RST headers for connections already gone
        self._ctrl: collections.deque[bytes] = collections.deque()
        self._held_rx = None  # an rx chain popped with nothing to put in it yet
        self._next_port = FIRST_HOST_PORT
        self._rr = 0
        self._poller: Optional[FdPoller] = None
        self._poller_lock = threading.Lock()
        self._stopped: Optional[FdPoller] = None  # the last poller stopped, for close() to wait for
        self.stats = collections.Counter()

    # ---- identity and configuration space ------------------------------------------------------

    def config_space(self) -> bytes:
        return struct.pack("<Q", self.config.cid)

    def _dial_unix(self, port: int) -> socket.socket:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK)
        try:
            s.connect(f"{self.config.path}_{port}")
        except BaseException:
            s.close()
            raise
        return s

    def _warn(self, fmt: str, *args: object) -> None:
        self.stats["warnings"] += 1
        n = self.stats["warnings"]
        if n <= WARN_LINES:
            log.warning("%s: " + fmt + ("" if n < WARN_LINES else " (further warnings are only counted)"),
                        self.name, *args)

    # ---- what the guest sends (tx queue) -------------------------------------------------------

    def process_queue(self, queue: Virtqueue) -> None:
        if queue.index == TX:
            self._process_tx(queue)
        elif queue.index == RX:
            self._process_rx(queue)
        # EVENT: the device has no event to post; the driver's buffers wait

    def _process_tx(self, queue: Virtqueue) -> None:
        while (chain := queue.pop()) is not None:
            n = chain.readable_len
            if n < HDR.size:
                self._warn("tx packet of %d bytes, shorter than the %d-byte header: dropped", n, HDR.size)
                self.stats["bad_packets"] += 1
            else:
                hdr = Hdr.unpack(chain.read(0, HDR.size))
                with self._lock:
                    self._on_packet(hdr, chain, n - HDR.size)
            queue.push(chain, 0)
        self.signal_used(queue)
        self._after_change()

    def _after_change(self) -> None:
        """Outside the lock: let the poller re-read what to watch, and fill rx if there is work."""
        poller = self._poller
        if poller is not None:
            poller.wake()
        if self._rx_work():
            self.kick(RX)

    def _rst_to(self, src_cid: int, src_port: int, dst_port: int) -> None:
        """Queue a RST to the guest's ``dst_port`` from ``src_cid:src_port`` (under the lock)."""
        if len(self._ctrl) >= MAX_CTRL:
            self.stats["ctrl_dropped"] += 1
            return
        self._ctrl.append(Hdr(src_cid, self.config.cid, src_port, dst_port, 0, TYPE_STREAM, Op.RST).pack())
        self.stats["rst_sent"] += 1

    def _reset(self, conn: Connection, why: Optional[str] = None) -> None:
        """End ``conn`` at once: close the host socket, forget it, RST the guest (under the lock)."""
        if why is not None:
            self._warn("connection host port %d <-> guest port %d reset: %s",
                       conn.host_port, conn.guest_port, why)
        self._drop(conn)
        self._rst_to(HOST_CID, conn.host_port, conn.guest_port)

    def _drop(self, conn: Connection) -> None:
        self._conns.pop(conn.key, None)
        conn.close()

    def _on_packet(self, hdr: Hdr, chain, payload_room: int) -> None:
        cid = self.config.cid
        if hdr.src_cid != cid:
            self._warn("tx packet from cid %d (the guest is cid %d): dropped", hdr.src_cid, cid)
            self.stats["bad_packets"] += 1
            return
        if hdr.dst_cid != HOST_CID or hdr.type != TYPE_STREAM:
            if hdr.op != Op.RST:  # only the host (cid 2) is reachable, and only stream sockets
                self._rst_to(hdr.dst_cid, hdr.dst_port, hdr.src_port)
            return
        key = (hdr.dst_port, hdr.src_port)
        conn = self._conns.get(key)
        if hdr.op == Op.REQUEST:
            self._on_request(hdr, conn)
            return
        if conn is None:
            if hdr.op != Op.RST:  # a connection that is gone (or never was): tell the guest
                self._rst_to(HOST_CID, hdr.dst_port, hdr.src_port)
            return
        conn.note_peer(hdr.buf_alloc, hdr.fwd_cnt)
        op = hdr.op
        if op == Op.RST:
            self._drop(conn)
        elif op == Op.RESPONSE:
            if conn.state != CONNECTING:
                self._reset(conn, "RESPONSE on an established connection")
            else:
                conn.answer_ok()
                self._flush(conn)
        elif op == Op.RW:
            self._on_rw(conn, hdr, chain, payload_room)
        elif op == Op.CREDIT_UPDATE:
            pass  # the credit was noted above; the poller re-reads what to watch
        elif op == Op.CREDIT_REQUEST:
            conn.want(Op.CREDIT_UPDATE)
        elif op == Op.SHUTDOWN:
            conn.guest_shut |= hdr.flags & (SHUTDOWN_RCV | SHUTDOWN_SEND)
            self._flush(conn)
        else:
            self._reset(conn, f"unknown op {op}")

    def _on_request(self, hdr: Hdr, conn: Optional[Connection]) -> None:
        if conn is not None:
            self._reset(conn, "REQUEST for a connection that exists")
            return
        if len(self._conns) >= self.config.max_conns:
            self._warn("guest port %d -> host port %d refused: %d connections already (max_conns)",
                       hdr.src_port, hdr.dst_port, len(self._conns))
            self._rst_to(HOST_CID, hdr.dst_port, hdr.src_port)
            return
        try:
            sock = self._dial(hdr.dst_port)
        except OSError as e:
            log.debug("%s: guest port %d -> host port %d: %s", self.name, hdr.src_port, hdr.dst_port, e)
            self.stats["refused"] += 1
            self._rst_to(HOST_CID, hdr.dst_port, hdr.src_port)
            return
        conn = Connection(sock, hdr.dst_port, hdr.src_port, self.config.buf_size)
        conn.note_peer(hdr.buf_alloc, hdr.fwd_cnt)
        conn.want(Op.RESPONSE)
        self._conns[conn.key] = conn
        self.stats["connections"] += 1

    def _on_rw(self, conn: Connection, hdr: Hdr, chain, payload_room: int) -> None:
        if conn.state != ESTABLISHED or conn.guest_shut & SHUTDOWN_SEND:
            self._reset(conn, "data before the connection was established or after the guest's SHUTDOWN")
            return
        if hdr.len > MAX_PAYLOAD or hdr.len > payload_room:
            self._reset(conn, f"RW packet of len {hdr.len} with {payload_room} payload bytes "
                              f"(at most {MAX_PAYLOAD})")
            return
        if not conn.take(chain.read(HDR.size, hdr.len)):
            self._reset(conn, f"{hdr.len} bytes past the credit given "
                              f"({conn.buffered} of {conn.buf_alloc} buffered)")
            return
        self.stats["bytes_to_host"] += hdr.len
        self._flush(conn)

    def _flush(self, conn: Connection) -> None:
        """Write what waits for the host; then see if credit is due or the connection is over."""
        if conn.key not in self._conns:
            return
        try:
            conn.flush()
        except OSError as e:
            self._reset(conn, f"host socket: {e.strerror or e}")
            return
        if conn.update_due():
            conn.want(Op.CREDIT_UPDATE)
        if conn.guest_shut & SHUTDOWN_SEND and not conn.to_host and not conn.host_wr_shut:
            conn.host_wr_shut = True
            try:
                conn.sock.shutdown(socket.SHUT_WR)
            except OSError:
                pass
        if conn.done():
            self._drop(conn)
            self._rst_to(HOST_CID, conn.host_port, conn.guest_port)

    # ---- what the device sends (rx queue) ------------------------------------------------------

    def _rx_work(self) -> bool:
        with self._lock:
            if self._ctrl:
                return True
            return any(c.ops or self._can_read(c) for c in self._conns.values())

    def _can_read(self, c: Connection) -> bool:
        return (c.readable and c.state == ESTABLISHED and not c.host_eof and not c.guest_shut & SHUTDOWN_RCV
                and c.credit() > 0)

    def _process_rx(self, queue: Virtqueue) -> None:
        while True:
            chain, self._held_rx = self._held_rx, None
            if chain is not None and chain.epoch != queue.epoch:
                chain = None  # taken before a reset: that ring is gone
            if chain is None:
                if not self._rx_work():
                    break
                chain = queue.pop()
                if chain is None:
                    break
            room = chain.writable_len - HDR.size
            if room < 0:
                self._warn("rx buffer of %d bytes, shorter than the %d-byte header: returned empty",
                           chain.writable_len, HDR.size)
                self.stats["bad_packets"] += 1
                queue.push(chain, 0)
                continue
            with self._lock:
                packet = self._next_packet(room)
            if packet is None and room == 0:  # only a header fits, and data is what waits
                self._warn("rx buffer of %d bytes has no room for data: returned empty", chain.writable_len)
                self.stats["bad_packets"] += 1
                queue.push(chain, 0)
                continue
            if packet is None:
                self._held_rx = chain
                break
            written = chain.write(packet)
            queue.push(chain, written)
        self.signal_used(queue)
        poller = self._poller
        if poller is not None:
            poller.wake()

    def _header(self, conn: Connection, op: int, length: int = 0, flags: int = 0) -> bytes:
        conn.sent(length)
        return Hdr(HOST_CID, self.config.cid, conn.host_port, conn.guest_port, length, TYPE_STREAM, op, flags,
                   conn.buf_alloc, conn.fwd_cnt).pack()

    def _next_packet(self, room: int) -> Optional[bytes]:
        """The next packet for the guest (at most ``room`` payload bytes), or None (under the lock)."""
        if self._ctrl:
            return self._ctrl.popleft()
        conns = list(self._conns.values())
        if not conns:
            return None
        start = self._rr % len(conns)
        for conn in conns[start:] + conns[:start]:
            if conn.ops:
                op = conn.ops.pop(0)
                flags = SHUTDOWN_SEND if op == Op.SHUTDOWN else 0
                if op == Op.SHUTDOWN:
                    conn.shut_sent = True
                packet = self._header(conn, op, flags=flags)
                if conn.done():
                    self._drop(conn)
                    self._rst_to(HOST_CID, conn.host_port, conn.guest_port)
                self._rr = start + 1
                return packet
            if not room or not self._can_read(conn):  # recv(0) would read as the socket's end
                continue
            try:
                data = recv_into_packet(conn.sock, min(room, conn.credit(), MAX_PAYLOAD))
            except OSError as e:
                self._reset(conn, f"host socket: {e.strerror or e}")
                return self._ctrl.popleft() if self._ctrl else None
            if data is None:
                conn.readable = False
                continue
            self._rr = start + 1
            if not data:  # the host program closed its end: tell the guest it sends no more
                conn.host_eof = True
                conn.shut_sent = True
                packet = self._header(conn, Op.SHUTDOWN, flags=SHUTDOWN_SEND)
                if conn.done():
                    self._drop(conn)
                    self._rst_to(HOST_CID, conn.host_port, conn.guest_port)
                return packet
            self.stats["bytes_to_guest"] += len(data)
            if len(data) == conn.credit():
                conn.want(Op.CREDIT_REQUEST)  # out of credit after this: ask for news
            return self._header(conn, Op.RW, len(data)) + data
        return None

    # ---- life cycle -----------------------------------------------------------------------------

    def buffered_bytes(self) -> int:
        """Host memory held for the guest: bytes waiting for host sockets, and control packets."""
        with self._lock:
            return sum(len(c.to_host) for c in self._conns.values()) + HDR.size * len(self._ctrl)

    def connection_count(self) -> int:
        with self._lock:
            return len(self._conns)

    def on_activate(self) -> None:
        with self._poller_lock:
            self._poller = FdPoller(self._interest, self._ready, self.kick,
                                    name=f"vdm-vsock-io:{self.config.cid}")
            self._poller.start()

    def on_reset(self) -> None:
        with self._poller_lock:
            poller, self._poller = self._poller, None
        if poller is not None:
            poller.stop()  # from its own thread (a kick it made failed the device) it ends by itself
            earlier, self._stopped = self._stopped, poller  # close() waits for it
            if earlier is not None:
                earlier.join()
        with self._lock:
            for conn in list(self._conns.values()):
                conn.close()
            self._conns.clear()
            for hs in self._handshakes.values():
                hs.sock.close()
            self._handshakes.clear()
            self._ctrl.clear()
            chain, self._held_rx = self._held_rx, None
        if chain is not None:
            self.queues[RX].discard(chain)

    def close(self) -> None:
        """Reset, close the listening socket and remove its path (idempotent)."""
        self.reset()
        stopped, self._stopped = self._stopped, None
        if stopped is not None:
            stopped.join()
        listener, self._listener = self._listener, None
        if listener is not None:
            listener.close()
            if self.config.path and os.path.exists(self.config.path):
                try:
                    os.unlink(self.config.path)
                except OSError:
                    pass
        log.info("%s: %s", self.name, dict(self.stats))
