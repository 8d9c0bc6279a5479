"""The vhost-user wire format (QEMU's docs/interop/vhost-user.rst): numbers, structs, framing.

A message is a 12-byte header -- request, flags, payload size, native (little) endian -- and a
payload whose layout depends on the request. File descriptors travel as SCM_RIGHTS ancillary data
with the header. :class:`MessageReader` assembles messages from a connection as their bytes come,
never waiting for them (one event loop serves many connections), and checks everything that does
not depend on the backend's state: the version bits, the payload size against the request's
layout, the number of file descriptors. Anything wrong raises :class:`ProtocolError`, and the
caller closes the connection; received descriptors are always closed unless the caller keeps them.
"""

from __future__ import annotations

import array
import errno
import os
import socket
import struct
import time
from dataclasses import dataclass, field

__all__ = [
    "HEADER",
    "MAX_FDS",
    "BackendReq",
    "Message",
    "MessageReader",
    "PeerClosed",
    "ProtocolError",
    "Req",
    "send_backend_request",
    "send_message",
]

HEADER = struct.Struct("<III")
U64 = struct.Struct("<Q")
VRING_STATE = struct.Struct("<II")
VRING_ADDR = struct.Struct("<IIQQQQ")
MEM_REGION = struct.Struct("<QQQQ")  # guest address, size, user address, mmap offset
MEM_TABLE_HEAD = struct.Struct("<II")  # number of regions, padding
SINGLE_REGION = struct.Struct("<QQQQQ")  # padding, then a region
CONFIG_HEAD = struct.Struct("<III")  # offset, size, flags
LOG_BASE = struct.Struct("<QQ")  # mmap size, mmap offset of the dirty log
INFLIGHT = struct.Struct("<QQHH")  # mmap size, mmap offset, number of queues, queue size
#: QEMU sends the inflight description with C struct padding (24 bytes); the spec lists 20
INFLIGHT_PADDED = 24

VERSION = 0x1
VERSION_MASK = 0x3
FLAG_REPLY = 1 << 2
FLAG_NEED_REPLY = 1 << 3

#: VHOST_USER_F_PROTOCOL_FEATURES: the (virtio-reserved) feature bit that says "protocol features"
F_PROTOCOL_FEATURES = 30
#: VHOST_F_LOG_ALL: dirty logging for migration (offered where :mod:`.dirtylog` can work)
F_LOG_ALL = 26

#: at most this many regions in SET_MEM_TABLE (VHOST_MEMORY_BASELINE_NREGIONS)
MAX_TABLE_REGIONS = 8
#: at most this many file descriptors with one message
MAX_FDS = 8
#: memory slots offered with CONFIGURE_MEM_SLOTS (ADD_MEM_REG / REM_MEM_REG)
MAX_MEM_SLOTS = 32
#: the largest configuration space a frontend may ask for (VHOST_USER_MAX_CONFIG_SIZE)
MAX_CONFIG_SIZE = 256
#: the largest payload any request has (SET_MEM_TABLE with 8 regions is 264 bytes)
MAX_PAYLOAD = 4096
#: the largest ring SET_VRING_NUM may set: a split virtqueue's size is a power of two up to 32768
#: (virtio 1.x). The frontend owns the transport and picks the size (QEMU 10 lets the guest choose,
#: up to 1024), so this -- not the device's own queue size -- is the limit.
MAX_RING_SIZE = 32768
#: bits 0-7 of a SET_VRING_KICK/CALL/ERR payload are the ring index, bit 8 says "no fd"
VRING_IDX_MASK = 0xFF
VRING_NOFD = 1 << 8


class Req:
    """Frontend request numbers."""

    GET_FEATURES = 1
    SET_FEATURES = 2
    SET_OWNER = 3
    RESET_OWNER = 4
    SET_MEM_TABLE = 5
    SET_LOG_BASE = 6
    SET_LOG_FD = 7
    SET_VRING_NUM = 8
    SET_VRING_ADDR = 9
    SET_VRING_BASE = 10
    GET_VRING_BASE = 11
    SET_VRING_KICK = 12
    SET_VRING_CALL = 13
    SET_VRING_ERR = 14
    GET_PROTOCOL_FEATURES = 15
    SET_PROTOCOL_FEATURES = 16
    GET_QUEUE_NUM = 17
    SET_VRING_ENABLE = 18
    SEND_RARP = 19
    NET_SET_MTU = 20
    SET_BACKEND_REQ_FD = 21
    IOTLB_MSG = 22
    SET_VRING_ENDIAN = 23
    GET_CONFIG = 24
    SET_CONFIG = 25
    CREATE_CRYPTO_SESSION = 26
    CLOSE_CRYPTO_SESSION = 27
    POSTCOPY_ADVISE = 28
    POSTCOPY_LISTEN = 29
    POSTCOPY_END = 30
    GET_INFLIGHT_FD = 31
    SET_INFLIGHT_FD = 32
    GPU_SET_SOCKET = 33
    RESET_DEVICE = 34
    VRING_KICK = 35
    GET_MAX_MEM_SLOTS = 36
    ADD_MEM_REG = 37
    REM_MEM_REG = 38
    SET_STATUS = 39
    GET_STATUS = 40
    GET_SHARED_OBJECT = 41
    SET_DEVICE_STATE_FD = 42
    CHECK_DEVICE_STATE = 43

    @classmethod
    def name(cls, value: int) -> str:
        for k, v in vars(cls).items():
            if v == value and k.isupper():
                return k
        return f"request {value}"


class BackendReq:
    """Backend request numbers: messages vdm sends on the backend channel (SET_BACKEND_REQ_FD)."""

    IOTLB_MSG = 1
    #: the configuration space changed (needs PROTOCOL_F_CONFIG); the frontend reads it again with
    #: GET_CONFIG and, if it differs, raises the config-change interrupt (QEMU 7.2's
    #: vhost-user-blk does so for a new capacity)
    CONFIG_CHANGE_MSG = 2


class ProtocolFeature:
    """VHOST_USER_PROTOCOL_F_* bit numbers (vhost-user.rst as of QEMU 10; which are offered: backend.py)."""

    MQ = 0
    LOG_SHMFD = 1
    RARP = 2
    REPLY_ACK = 3
    MTU = 4
    BACKEND_REQ = 5
    CROSS_ENDIAN = 6
    CRYPTO_SESSION = 7
    PAGEFAULT = 8
    CONFIG = 9
    BACKEND_SEND_FD = 10
    HOST_NOTIFIER = 11
    INFLIGHT_SHMFD = 12
    RESET_DEVICE = 13
    INBAND_NOTIFICATIONS = 14
    CONFIGURE_MEM_SLOTS = 15
    STATUS = 16
    XEN_MMAP = 17
    SHARED_OBJECT = 18
    DEVICE_STATE = 19


class ProtocolError(Exception):
    """The frontend broke the protocol: the connection is closed (the process keeps serving)."""


def _exactly(n: int):
    return lambda size: size == n


#: request -> (payload size check, (min fds, max fds)); requests not listed are not supported
LAYOUT = {
    Req.GET_FEATURES: (_exactly(0), (0, 0)),
    Req.SET_FEATURES: (_exactly(U64.size), (0, 0)),
    Req.SET_OWNER: (_exactly(0), (0, 0)),
    Req.RESET_OWNER: (_exactly(0), (0, 0)),
    Req.SET_MEM_TABLE: (
        lambda s: (
            s >= MEM_TABLE_HEAD.size
            and (s - MEM_TABLE_HEAD.size) % MEM_REGION.size == 0
            and (s - MEM_TABLE_HEAD.size) // MEM_REGION.size <= MAX_TABLE_REGIONS
        ),
        (1, MAX_TABLE_REGIONS),
    ),
    Req.SET_VRING_NUM: (_exactly(VRING_STATE.size), (0, 0)),
    Req.SET_VRING_ADDR: (_exactly(VRING_ADDR.size), (0, 0)),
    Req.SET_VRING_BASE: (_exactly(VRING_STATE.size), (0, 0)),
    Req.GET_VRING_BASE: (_exactly(VRING_STATE.size), (0, 0)),
    Req.SET_VRING_KICK: (_exactly(U64.size), (0, 1)),
    Req.SET_VRING_CALL: (_exactly(U64.size), (0, 1)),
    Req.SET_VRING_ERR: (_exactly(U64.size), (0, 1)),
    Req.GET_PROTOCOL_FEATURES: (_exactly(0), (0, 0)),
    Req.SET_PROTOCOL_FEATURES: (_exactly(U64.size), (0, 0)),
    Req.GET_QUEUE_NUM: (_exactly(0), (0, 0)),
    Req.SET_VRING_ENABLE: (_exactly(VRING_STATE.size), (0, 0)),
    Req.GET_CONFIG: (lambda s: CONFIG_HEAD.size <= s <= CONFIG_HEAD.size + MAX_CONFIG_SIZE, (0, 0)),
    Req.SET_CONFIG: (lambda s: CONFIG_HEAD.size <= s <= CONFIG_HEAD.size + MAX_CONFIG_SIZE, (0, 0)),
    Req.GET_INFLIGHT_FD: (lambda s: s in (INFLIGHT.size, INFLIGHT_PADDED), (0, 0)),
    Req.SET_INFLIGHT_FD: (lambda s: s in (INFLIGHT.size, INFLIGHT_PADDED), (1, 1)),
    Req.RESET_DEVICE: (_exactly(0), (0, 0)),
    Req.GET_MAX_MEM_SLOTS: (_exactly(0), (0, 0)),
    Req.ADD_MEM_REG: (_exactly(SINGLE_REGION.size), (1, 1)),
    # the spec allows (and says to close) one stray fd from older frontends
    Req.REM_MEM_REG: (_exactly(SINGLE_REGION.size), (0, 1)),
    Req.SET_STATUS: (_exactly(U64.size), (0, 0)),
    Req.SET_LOG_BASE: (_exactly(LOG_BASE.size), (1, 1)),
    Req.SET_LOG_FD: (lambda s: s in (0, U64.size), (0, 1)),  # the spec: no payload
    Req.GET_STATUS: (_exactly(0), (0, 0)),
    Req.SET_BACKEND_REQ_FD: (_exactly(0), (1, 1)),
}


@dataclass
class Message:
    """One request as received: its header fields, payload and file descriptors (owned)."""

    request: int
    flags: int
    payload: bytes
    fds: list[int] = field(default_factory=list)

    @property
    def need_reply(self) -> bool:
        return bool(self.flags & FLAG_NEED_REPLY)

    @property
    def name(self) -> str:
        return Req.name(self.request)

    def take_fd(self) -> int | None:
        """Hand the first descriptor to the caller (who must close it); None if there is none."""
        return self.fds.pop(0) if self.fds else None

    def close_fds(self) -> None:
        for fd in self.fds:
            try:
                os.close(fd)
            except OSError:
                pass
        self.fds.clear()


def _close_all(fds: list[int]) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


class PeerClosed(Exception):
    """The frontend closed the connection between two messages (not an error)."""


class MessageReader:
    """Assembles one connection's requests from its socket without ever waiting for bytes.

    :meth:`read` takes what the socket holds now -- never more than the open message still needs,
    so the bytes (and descriptors) of the next message stay in the socket -- and returns the
    message once the whole of it is there. Invariants: every descriptor received is either in a
    returned :class:`Message` (the caller owns it) or closed here, by a :class:`ProtocolError` or
    by :meth:`close`; :attr:`started` is the ``time.monotonic()`` at which the open message's first
    bytes arrived, None between messages -- the caller bounds how long a message may stay open.
    """

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.started: float | None = None
        self._data = bytearray()
        self._fds: list[int] = []
        self._size = -1  # the open message's payload size once its header is complete

    @property
    def what(self) -> str:
        """What the open message is, for a log line: its request name, or "a message header"."""
        if self._size < 0:
            return "a message header"
        return Req.name(HEADER.unpack_from(self._data)[0])

    def read(self) -> Message | None:
        """The next message if all of it has arrived, else None (more bytes are to come).

        Raises :class:`PeerClosed` when the frontend closed the connection between messages and
        :class:`ProtocolError` for anything wrong (the open message's descriptors are closed).
        """
        timeout = self.sock.gettimeout()
        self.sock.settimeout(0)
        try:
            return self._read()
        except ProtocolError:
            self.close()
            raise
        finally:
            self.sock.settimeout(timeout)

    def close(self) -> None:
        """Forget the open message and close its descriptors."""
        _close_all(self._fds)
        self._fds = []
        self._data.clear()
        self._size = -1
        self.started = None

    def _read(self) -> Message | None:
        while True:
            want = (HEADER.size if self._size < 0 else HEADER.size + self._size) - len(self._data)
            if want:
                if not self._recv(want):
                    return None
                if len(self._data) == HEADER.size and self._size < 0:
                    self._size = _check_header(self._data)
                continue
            fds, self._fds = self._fds, []
            request, flags, _ = HEADER.unpack_from(self._data)
            payload = bytes(self._data[HEADER.size :])
            self._data.clear()
            self._size = -1
            self.started = None
            try:
                _check_fds(request, len(fds))
            except ProtocolError:
                _close_all(fds)
                raise
            return Message(request, flags, payload, fds)

    def _recv(self, want: int) -> bool:
        """One recvmsg of at most ``want`` bytes; False when the socket holds nothing now."""
        try:
            data, ancdata, msg_flags, _ = self.sock.recvmsg(want, _ANC_SPACE)
        except (BlockingIOError, InterruptedError):
            return False
        except ConnectionResetError:
            data, ancdata, msg_flags = b"", [], 0
        for level, kind, cdata in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds = array.array("i")
                fds.frombytes(cdata[: len(cdata) - len(cdata) % fds.itemsize])
                self._fds.extend(fds)
        if msg_flags & socket.MSG_CTRUNC or len(self._fds) > MAX_FDS:
            raise ProtocolError(f"more than {MAX_FDS} file descriptors with one message")
        if not data:
            if self._data:
                raise ProtocolError(f"connection closed in the middle of {self.what}")
            if self._fds:
                raise ProtocolError("file descriptors without a message")
            raise PeerClosed()
        if self.started is None:
            self.started = time.monotonic()
        self._data += data
        return True


#: room for MAX_FDS descriptors: more arrive truncated (MSG_CTRUNC), and the kernel closes the rest
_ANC_SPACE = socket.CMSG_SPACE(MAX_FDS * array.array("i").itemsize)


def _check_header(header: bytes | bytearray) -> int:
    """The payload size a request's header announces, once the header passes every check."""
    request, flags, size = HEADER.unpack_from(header)
    name = Req.name(request)
    if flags & VERSION_MASK != VERSION:
        raise ProtocolError(f"{name}: unsupported protocol version {flags & VERSION_MASK}")
    if flags & FLAG_REPLY:
        raise ProtocolError(f"{name}: a request with the reply flag set")
    if size > MAX_PAYLOAD:
        raise ProtocolError(f"{name}: payload of {size} bytes is too large")
    layout = LAYOUT.get(request)
    if layout is None:
        raise ProtocolError(f"{name} is not supported")
    if not layout[0](size):
        raise ProtocolError(f"{name}: wrong payload size {size}")
    return size


def _check_fds(request: int, count: int) -> None:
    name = Req.name(request)
    min_fds, max_fds = LAYOUT[request][1]
    if count > max_fds:
        raise ProtocolError(f"{name}: {count} file descriptors, at most {max_fds} allowed")
    if count < min_fds:
        raise ProtocolError(f"{name}: {count} file descriptors, {min_fds} needed")


def send_message(
    sock: socket.socket, request: int, payload: bytes, fds: list[int] | tuple[int, ...] = ()
) -> None:
    """Send a reply (the reply flag is set) with optional file descriptors, without waiting.

    A frontend reads each reply before it sends the next request that asks for one, so the
    socket always has room for it; a frontend that sends requests and leaves their replies
    unread until the socket's buffers are full gets :class:`BlockingIOError` here (and its
    connection closed by the caller) instead of holding up the loop that serves other devices.
    """
    data = HEADER.pack(request, VERSION | FLAG_REPLY, len(payload)) + payload
    anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())] if fds else []
    timeout = sock.gettimeout()
    sock.settimeout(0)  # (with a timeout set, Python would first wait up to it for room)
    try:
        sent = sock.sendmsg([data], anc)
    finally:
        sock.settimeout(timeout)
    if sent != len(data):
        raise BlockingIOError(errno.EAGAIN, f"only {sent} of the reply's {len(data)} bytes fit")


def send_backend_request(sock: socket.socket, request: int, payload: bytes = b"") -> None:
    """Send a backend request on the backend channel (no reply asked for: NEED_REPLY is not set)."""
    sock.sendall(HEADER.pack(request, VERSION, len(payload)) + payload)
