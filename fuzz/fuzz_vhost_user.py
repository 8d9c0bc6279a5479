#!/usr/bin/env python3
"""Fuzz target: vhost-user message parsing and handling -- a hostile frontend.

One vhost-user server (vdm_vhost_user.server, serving a small echo device) runs for the whole
fuzzing session. Each input is one connection: a series of messages -- any request number, flags,
payload sizes and fields, file descriptors (memfds for guest RAM and inflight regions, eventfds
for kick/call/err, too many or too few) -- built so that most are nearly valid and get past the
framing checks, sometimes ending in raw garbage or a cut-off message; guest RAM (a memfd) holds
fuzzed rings that kicks make the device walk. Then the connection is closed.

Invariants: no request makes the backend raise anything but ProtocolError (an internal error
would be a bug); after every request each mapped region lies inside the file it maps and every
running ring lies inside the mapped regions; the server drops the connection within a bounded
time and forgets it (no mapping, no ring, no received file descriptor stays open); and a new
connection is served again -- GET_FEATURES answers with the device's features.
"""

from __future__ import annotations

import array
import os
import socket
import struct
import sys
import tempfile
import time

import common

RAM_SIZE = 64 << 10
GUEST = 0x1_0000_0000
USER = 0x7F00_0000_0000
HEADER = struct.Struct("<III")
REQUESTS = (1, 2, 3, 4, 5, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 24, 25, 31, 32, 34, 36, 37, 38, 39, 40)

_state: dict = {}


class Violation(AssertionError):
    pass


def _server():
    """The server, started once; its backend's handle() is wrapped to check invariants."""
    if _state:
        return _state["server"]
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
            _check_mappings(backend, violations)

    backend.handle = checked
    _state.update(server=server, path=path, violations=violations, device=server.device)
    return server


def _check_mappings(backend, violations: list[str]) -> None:
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


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def _recv_replies(sock: socket.socket, until: int, timeout: float) -> bool:
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


def one_input(data: bytes) -> None:
    import atheris
    from vdm.ring_layout import AVAIL_RING, desc_table_size

    server = _server()
    opened = common.watch_files()
    opened.clear()
    path, violations, device = _state["path"], _state["violations"], _state["device"]
    fdp = atheris.FuzzedDataProvider(data)
    baseline = _open_fds()
    ram = os.memfd_create("vdm-fuzz-ram", os.MFD_CLOEXEC)
    os.ftruncate(ram, RAM_SIZE)
    for _ in range(fdp.ConsumeIntInRange(0, 4)):  # rings and buffers: whatever the input says
        os.pwrite(
            ram, fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 256)), fdp.ConsumeIntInRange(0, RAM_SIZE - 1)
        )
    own: list[int] = [ram]
    kicks: list[int] = []

    def efd() -> int:
        fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        own.append(fd)
        return fd

    def u64(small: int) -> int:
        return (
            fdp.ConsumeIntInRange(0, small)
            if fdp.ConsumeIntInRange(0, 3)
            else fdp.ConsumeIntInRange(0, (1 << 64) - 1)
        )

    def region() -> bytes:
        if fdp.ConsumeIntInRange(0, 3):
            size = RAM_SIZE >> fdp.ConsumeIntInRange(0, 4)
            off = RAM_SIZE - size if fdp.ConsumeBool() else 0
            return struct.pack("<QQQQ", GUEST + off, size, USER + off, off)
        return struct.pack("<QQQQ", u64(RAM_SIZE), u64(RAM_SIZE * 2), u64(RAM_SIZE), u64(RAM_SIZE))

    def ring_addr() -> int:
        if fdp.ConsumeIntInRange(0, 3):
            return USER + fdp.ConsumeIntInRange(0, RAM_SIZE // 16) * 16
        return u64(1 << 48)

    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(5)
    sock.connect(path)
    open_conn = True
    try:
        if fdp.ConsumeBool():  # a well-behaved start, so that rings run and kicks walk fuzzed chains
            size = 1 << fdp.ConsumeIntInRange(0, 4)
            os.pwrite(ram, fdp.ConsumeBytes(desc_table_size(size)), 0)  # descriptor table
            os.pwrite(ram, struct.pack("<HH", 0, fdp.ConsumeIntInRange(0, 0xFFFF)), 0x1000)  # avail idx
            os.pwrite(ram, fdp.ConsumeBytes(2 * size), 0x1000 + AVAIL_RING)  # avail ring
            kick = efd()
            kicks.append(kick)
            setup = [
                (2, struct.pack("<Q", device.features()), []),
                (5, struct.pack("<II", 1, 0) + struct.pack("<QQQQ", GUEST, RAM_SIZE, USER, 0), [ram]),
                (8, struct.pack("<II", 0, size), []),
                (9, struct.pack("<IIQQQQ", 0, 0, USER, USER + 0x2000, USER + 0x1000, 0), []),
                (13, struct.pack("<Q", 0), [efd()]),
                (12, struct.pack("<Q", 0), [kick]),
            ]
            for req, payload, fds in setup:
                anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())] if fds else []
                sock.sendmsg([HEADER.pack(req, 1, len(payload)) + payload], anc)
            os.eventfd_write(kick, 1)
        for _ in range(fdp.ConsumeIntInRange(1, 24)):
            kind = fdp.ConsumeIntInRange(0, 20)
            if kind == 0:  # raw bytes, possibly a cut-off message: the connection's last words
                try:
                    sock.sendall(fdp.ConsumeBytes(fdp.ConsumeIntInRange(1, 64)))
                except (BrokenPipeError, ConnectionResetError):
                    pass
                break
            if kind == 1 and kicks:
                os.eventfd_write(kicks[fdp.ConsumeIntInRange(0, len(kicks) - 1)], 1)
                continue
            req = (
                REQUESTS[fdp.ConsumeIntInRange(0, len(REQUESTS) - 1)]
                if kind != 2
                else fdp.ConsumeIntInRange(0, 60)
            )
            flags = 1 | (8 if fdp.ConsumeBool() else 0)
            if fdp.ConsumeIntInRange(0, 15) == 0:
                flags = fdp.ConsumeIntInRange(0, 0xFFFFFFFF)
            fds: list[int] = []
            if req == 5:  # SET_MEM_TABLE
                n = fdp.ConsumeIntInRange(1, 3)
                payload = struct.pack("<II", fdp.ConsumeIntInRange(0, 4) if fdp.ConsumeBool() else n, 0)
                payload += b"".join(region() for _ in range(n))
                fds = [ram] * fdp.ConsumeIntInRange(0, n + 1)
            elif req in (37, 38):  # ADD_MEM_REG / REM_MEM_REG
                payload = bytes(8) + region()
                fds = [ram] * fdp.ConsumeIntInRange(0, 2)
            elif req in (8, 10, 11, 18):  # vring state
                payload = struct.pack(
                    "<II",
                    fdp.ConsumeIntInRange(0, 2),
                    (1 << fdp.ConsumeIntInRange(0, 5))
                    if fdp.ConsumeBool()
                    else fdp.ConsumeIntInRange(0, 0xFFFFFFFF),
                )
            elif req == 9:  # SET_VRING_ADDR
                payload = struct.pack(
                    "<IIQQQQ", fdp.ConsumeIntInRange(0, 2), 0, ring_addr(), ring_addr(), ring_addr(), 0
                )
            elif req in (12, 13, 14):  # kick / call / err
                nofd = fdp.ConsumeIntInRange(0, 5) == 0
                payload = struct.pack("<Q", fdp.ConsumeIntInRange(0, 2) | (0x100 if nofd else 0))
                if fdp.ConsumeIntInRange(0, 7) == 0:
                    payload = struct.pack("<Q", u64(0x1FF))
                if not nofd or fdp.ConsumeIntInRange(0, 5) == 0:
                    fd = efd()
                    fds = [fd]
                    if req == 12:
                        kicks.append(fd)
            elif req in (2, 16, 39):  # features, status
                payload = struct.pack("<Q", u64((1 << 33) - 1) | (1 << 32 if fdp.ConsumeBool() else 0))
            elif req in (24, 25):  # GET/SET_CONFIG
                size = fdp.ConsumeIntInRange(0, 260)
                body = fdp.ConsumeBytes(size)
                payload = (
                    struct.pack("<III", fdp.ConsumeIntInRange(0, 300), size, fdp.ConsumeIntInRange(0, 2))
                    + body
                )
            elif req in (31, 32):  # inflight
                payload = struct.pack(
                    "<QQHH",
                    u64(1 << 16),
                    u64(4096),
                    fdp.ConsumeIntInRange(0, 3),
                    1 << fdp.ConsumeIntInRange(0, 6),
                )
                if fdp.ConsumeBool():
                    payload += bytes(4)
                if req == 32:
                    fds = [ram]
            else:
                payload = b""
            if fdp.ConsumeIntInRange(0, 9) == 0:  # a wrong payload size, still framed correctly
                payload = payload[: fdp.ConsumeIntInRange(0, len(payload))] + fdp.ConsumeBytes(
                    fdp.ConsumeIntInRange(0, 16)
                )
            if fdp.ConsumeIntInRange(0, 15) == 0:
                fds = fds + [efd() for _ in range(fdp.ConsumeIntInRange(1, 9))]
            msg = HEADER.pack(req, flags, len(payload)) + payload
            try:
                if fds:
                    anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())]
                    sock.sendmsg([msg], anc)
                else:
                    sock.sendall(msg)
            except (BrokenPipeError, ConnectionResetError):
                open_conn = False  # the server closed it: a bad message
                break
        else:
            # everything sent was framed: make sure the server got through all of it
            try:
                sock.sendall(HEADER.pack(1, 1, 0))
                open_conn = _recv_replies(sock, 1, 5.0)
            except (BrokenPipeError, ConnectionResetError):
                open_conn = False
    finally:
        sock.close()
        for fd in own:
            os.close(fd)
    if not server.wait_for(lambda s: s.conn is None, 5.0):
        raise Violation(f"the server still holds the connection 5 s after it closed (open={open_conn})")
    backend = server.handler
    assert len(backend.memory.table) == 0, "a mapping outlived the connection"
    assert not any(q.ready for q in device.queues), "a ring outlived the connection"
    assert all(vr.kick_fd is None and vr.call_fd is None and vr.err_fd is None for vr in backend.vrings)
    assert backend.inflight is None
    if violations:
        found = list(violations)
        violations.clear()
        raise Violation("; ".join(found))
    # the server keeps serving
    s2 = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s2.settimeout(5)
    try:
        s2.connect(path)
        s2.sendall(HEADER.pack(1, 1, 0))
        reply = s2.recv(HEADER.size + 8, socket.MSG_WAITALL)
        req, flags, size = HEADER.unpack_from(reply)
        (features,) = struct.unpack_from("<Q", reply, HEADER.size)
        # what the backend offers: the device's features, PROTOCOL_FEATURES (bit 30) and, where
        # vdm can mark a dirty log, LOG_ALL
        from vdm_vhost_user.handler import LOGGING_OFFERED
        from vdm_vhost_user.protocol import F_LOG_ALL

        log_all = 1 << F_LOG_ALL if LOGGING_OFFERED else 0
        assert req == 1 and size == 8 and features & ~(1 << 30) == device.features() | log_all, reply
    finally:
        s2.close()
    if not server.wait_for(lambda s: s.conn is None, 5.0):
        raise Violation("the server did not notice a clean disconnect")
    assert not common.data_files(opened), f"files opened while serving a frontend: {opened}"
    leaked = _open_fds() - baseline
    assert leaked <= 0, f"{leaked} file descriptor(s) left open after the connection"


#: what this target instruments (fuzz_vhost_user_fds adds the SIGBUS guard)
MODULES = (
    "vdm_vhost_user.protocol",
    "vdm_vhost_user.handler",
    "vdm_vhost_user.rings",
    "vdm_vhost_user.memory",
    "vdm_vhost_user.inflight",
    "vdm_vhost_user.server",
    *common.QUEUE_MODULES,
    "vdm.transport.common",
    "vdm.memory",
    "vdm.testing.devices",
)


if __name__ == "__main__":
    common.run(one_input, MODULES)
    sys.exit(0)
