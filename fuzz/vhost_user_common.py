"""What the vhost-user fuzz targets share: one server for the session and the checks after each
connection.

``fuzz_vhost_user`` (a hostile frontend's messages) and ``fuzz_vhost_user_fds`` (its file
descriptors and memory files) both talk to one :class:`~vdm_vhost_user.server.VhostUserServer`
serving :class:`vdm.testing.devices.EchoDevice`, started on first use (:func:`server`), whose
handler checks after every request that each mapped region lies inside the file it maps and every
running ring inside the mapped regions (violations are collected in ``state["violations"]``).
:func:`check_connection_ended` holds what must be true once a frontend has closed its connection.
"""

from __future__ import annotations

import array
import os
import socket
import struct
import tempfile
import time

import common

RAM_SIZE = 64 << 10
GUEST = 0x1_0000_0000
USER = 0x7F00_0000_0000
HEADER = struct.Struct("<III")

#: the session's server: server, path, violations (list[str]), device
state: dict = {}


class Violation(AssertionError):
    pass


def server():
    """The server, started once; its backend's handle() is wrapped to check invariants."""
    if state:
        return state["server"]
    from vdm.testing.devices import EchoDevice
    from vdm_vhost_user.protocol import ProtocolError
    from vdm_vhost_user.server import VhostUserServer

    path = os.path.join(tempfile.mkdtemp(prefix="vdm-fuzz-vu-"), "vu.sock")
    server = VhostUserServer(path, EchoDevice()).start()
    backend = server.handler
    original = backend.handle
    violations: list[str] = []

    def checked(msg):
        try:
            original(msg)
        except (ProtocolError, OSError):
            raise
        except Exception as e:  # the server survives it, but it is a bug in the backend
            violations.append(f"{msg.name}: internal error {type(e).__name__}: {e}")
            raise
        finally:
            check_mappings(backend, violations)

    backend.handle = checked
    state.update(server=server, path=path, violations=violations, device=server.device)
    return server


def check_mappings(backend, violations: list[str]) -> None:
    from vdm.ring_layout import avail_ring_size, desc_table_size, used_ring_size

    table = backend.memory.table
    for m in table._mapped:
        s = m.spec
        if s.mmap_offset + s.size > len(m.map) or len(m.map) > RAM_SIZE:
            violations.append(f"region {s} maps outside its file ({len(m.map)} bytes mapped)")
    for q in backend.device.queues:
        if not q.ready:
            continue
        for what, addr, n in (
            ("descriptor table", q.desc_addr, desc_table_size(q.size)),
            ("available ring", q.avail_addr, avail_ring_size(q.size)),
            ("used ring", q.used_addr, used_ring_size(q.size)),
        ):
            if not backend.memory.contains(addr, n):
                violations.append(f"queue {q.index} {what} 0x{addr:x}+{n} outside the shared memory")


def recv_replies(sock: socket.socket, until: int, timeout: float) -> bool:
    """Read replies (closing any fds) until one for request ``until``; False on EOF."""
    deadline = time.monotonic() + timeout
    buf = b""
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise Violation("the server neither answered nor closed the connection in time")
        sock.settimeout(left)
        try:
            data, anc, _, _ = sock.recvmsg(4096, socket.CMSG_SPACE(8 * 4))
        except (ConnectionResetError, BrokenPipeError):
            return False
        except socket.timeout:
            continue
        for level, kind, cdata in anc:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds = array.array("i")
                fds.frombytes(cdata[: len(cdata) - len(cdata) % 4])
                for fd in fds:
                    os.close(fd)
        if not data:
            return False
        buf += data
        while len(buf) >= HEADER.size:
            req, _flags, size = HEADER.unpack_from(buf)
            if len(buf) < HEADER.size + size:
                break
            buf = buf[HEADER.size + size :]
            if req == until:
                return True



def check_connection_ended(detail: str = "") -> None:
    """After the frontend closed its connection: within 5 s the server forgets it (no mapping,
    ring, notification fd or inflight region stays), no violation was recorded, and a new
    connection is served -- GET_FEATURES answers with the device's features -- and its clean
    disconnect noticed. ``detail`` goes into the first message."""
    srv, path, violations, device = state["server"], state["path"], state["violations"], state["device"]
    if not srv.wait_for(lambda s: s.conn is None, 5.0):
        raise Violation(f"the server still holds the connection 5 s after it closed {detail}".rstrip())
    backend = srv.handler
    assert len(backend.memory.table) == 0, "a mapping outlived the connection"
    assert not any(q.ready for q in device.queues), "a ring outlived the connection"
    assert all(vr.kick_fd is None and vr.call_fd is None and vr.err_fd is None for vr in backend.vrings)
    assert backend.inflight is None
    if violations:
        found = list(violations)
        violations.clear()
        raise Violation("; ".join(found))
    s2 = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s2.settimeout(5)
    try:
        s2.connect(path)
        s2.sendall(HEADER.pack(1, 1, 0))
        reply = s2.recv(HEADER.size + 8, socket.MSG_WAITALL)
        req, _flags, size = HEADER.unpack_from(reply)
        (features,) = struct.unpack_from("<Q", reply, HEADER.size)
        # what the backend offers: the device's features, PROTOCOL_FEATURES (bit 30) and, where
        # vdm can mark a dirty log, LOG_ALL
        from vdm_vhost_user.handler import LOGGING_OFFERED
        from vdm_vhost_user.protocol import F_LOG_ALL

        log_all = 1 << F_LOG_ALL if LOGGING_OFFERED else 0
        assert req == 1 and size == 8 and features & ~(1 << 30) == device.features() | log_all, reply
    finally:
        s2.close()
    if not srv.wait_for(lambda s: s.conn is None, 5.0):
        raise Violation("the server did not notice a clean disconnect")


#: what the vhost-user targets instrument (fuzz_vhost_user_fds adds the SIGBUS guard)
MODULES = (
    "vdm_vhost_user.protocol",
    "vdm_vhost_user.handler",
    "vdm_vhost_user.rings",
    "vdm_vhost_user.backend_channel",
    "vdm_vhost_user.memory",
    "vdm_vhost_user.inflight",
    "vdm_vhost_user.server",
    *common.QUEUE_MODULES,
    "vdm.transport.common",
    "vdm.memory",
    "vdm.testing.devices",
)
