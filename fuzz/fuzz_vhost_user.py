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

import common
import vhost_user_common as vu

RAM_SIZE, GUEST, USER, HEADER = vu.RAM_SIZE, vu.GUEST, vu.USER, vu.HEADER
REQUESTS = (1, 2, 3, 4, 5, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 24, 25, 31, 32, 34, 36, 37, 38, 39, 40)


def one_input(data: bytes) -> None:
    import atheris
    from vdm.ring_layout import AVAIL_RING, desc_table_size

    vu.server()
    opened = common.watch_files()
    opened.clear()
    path, device = vu.state["path"], vu.state["device"]
    fdp = atheris.FuzzedDataProvider(data)
    baseline = common.open_fd_count()
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
                open_conn = vu.recv_replies(sock, 1, 5.0)
            except (BrokenPipeError, ConnectionResetError):
                open_conn = False
    finally:
        sock.close()
        for fd in own:
            os.close(fd)
    vu.check_connection_ended(f"(open={open_conn})")
    assert not common.data_files(opened), f"files opened while serving a frontend: {opened}"
    leaked = common.open_fd_count() - baseline
    assert leaked <= 0, f"{leaked} file descriptor(s) left open after the connection"


if __name__ == "__main__":
    common.run(one_input, vu.MODULES)
    sys.exit(0)
