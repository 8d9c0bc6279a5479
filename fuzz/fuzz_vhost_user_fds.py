#!/usr/bin/env python3
"""Fuzz target: a hostile vhost-user frontend's file descriptors and memory files, not its bytes.

``fuzz_vhost_user`` varies messages; this target keeps the messages mostly valid and varies what
travels with them and what happens to it afterwards: guest memory in a sealable memfd, an
unsealable memfd, a plain file, a memfd sealed against writing, a pipe, a socket, a directory or
/dev/null, of the right size or a wrong one; kick/call/err fds that are eventfds (blocking or not,
saturated, closed by the frontend after sending) or pipes, sockets whose peer has gone, plain
files; and, with rings running, the memory file (or a kept inflight file) shrunk, grown back or
punched, then kicks and more messages.

It shares the server and its checks with ``fuzz_vhost_user`` (``vhost_user_common``: one server for
the whole session).
Invariants: the process survives (a SIGBUS would end the run as a crash); no request makes the
backend raise anything but ProtocolError; every mapped region is sealed against shrinking or
SIGBUS-guarded; the connection is dropped within a bounded time and forgotten (no mapping, ring or
fd left); the next connection is served; no file is opened but the ones the input made.
"""

from __future__ import annotations

import array
import fcntl
import os
import socket
import struct
import sys
import tempfile

import common
import vhost_user_common as vu

RAM_SIZE, GUEST, USER, HEADER = vu.RAM_SIZE, vu.GUEST, vu.USER, vu.HEADER
_tmp = tempfile.mkdtemp(prefix="vdm-fuzz-vu-fds-")


def _check_protected(backend, violations: list[str]) -> None:
    from vdm_vhost_user.faultguard import is_guarded

    for m in backend.memory.table._mapped:
        if not m.sealed and not is_guarded(m.map):
            violations.append(f"region {m.spec} can be shrunk and is not guarded")


def one_input(data: bytes) -> None:
    import atheris
    from vdm.ring_layout import AVAIL_RING, desc_table_size

    server = vu.server()
    backend = server.handler
    opened = common.watch_files()
    opened.clear()
    path, violations, device = vu.state["path"], vu.state["violations"], vu.state["device"]
    fdp = atheris.FuzzedDataProvider(data)
    baseline = common.open_fd_count()
    own: list[int] = []

    def keep(fd: int) -> int:
        own.append(fd)
        return fd

    def memory_file(size: int) -> int:
        kind = fdp.ConsumeIntInRange(0, 9)
        if kind <= 2:  # the common cases, most often
            flags = os.MFD_CLOEXEC | (os.MFD_ALLOW_SEALING if kind == 0 else 0)
            fd = keep(os.memfd_create("fuzz-ram", flags))
        elif kind <= 4:
            name = os.path.join(_tmp, f"ram{len(own)}")
            fd = keep(os.open(name, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600))
            os.unlink(name)
        elif kind == 5:  # sealed against writes: a shared writable mapping is impossible
            fd = keep(os.memfd_create("fuzz-ram", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING))
            os.ftruncate(fd, size)
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SHRINK)
            return fd
        elif kind == 6:
            r, w = os.pipe()
            keep(r)
            return keep(w)
        elif kind == 7:
            a, b = socket.socketpair()
            b.close()
            return keep(a.detach())
        elif kind == 8:
            return keep(os.open(_tmp, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC))
        else:
            return keep(os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC))
        os.ftruncate(fd, size)
        return fd

    def ram_size() -> int:
        choice = fdp.ConsumeIntInRange(0, 3)
        if choice == 0:
            return fdp.ConsumeIntInRange(0, RAM_SIZE)  # any size: too small for the region, or odd
        return RAM_SIZE

    def notify_fd() -> int:
        kind = fdp.ConsumeIntInRange(0, 9)
        if kind <= 3:
            return keep(os.eventfd(0, os.EFD_CLOEXEC | (os.EFD_NONBLOCK if kind & 1 else 0)))
        if kind == 4:  # saturated: one more write would block
            fd = keep(os.eventfd(0, os.EFD_CLOEXEC))
            os.eventfd_write(fd, (1 << 64) - 2)
            return fd
        if kind == 5:
            r, w = os.pipe()
            keep(r)
            keep(w)
            return w if fdp.ConsumeBool() else r
        if kind == 6:
            a, b = socket.socketpair()
            b.close()
            return keep(a.detach())
        if kind == 7:
            return memory_file(4096)
        if kind == 8:  # an eventfd the frontend closes right after sending (see send())
            return keep(os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK))
        return keep(os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC))

    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(5)
    sock.connect(path)
    alive = True
    kicks: list[int] = []
    files: list[int] = []

    def send(req: int, payload: bytes, fds: list[int] = ()) -> bool:  # type: ignore[assignment]
        msg = HEADER.pack(req, 1, len(payload)) + payload
        try:
            if fds:
                sock.sendmsg([msg], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())])
            else:
                sock.sendall(msg)
        except (BrokenPipeError, ConnectionResetError):
            return False
        if fds and fdp.ConsumeIntInRange(0, 7) == 0:  # the frontend closes its copy at once
            fd = fds[0]
            if fd in own:
                own.remove(fd)
                os.close(fd)
                if fd in kicks:
                    kicks.remove(fd)
                if fd in files:
                    files.remove(fd)
        return True

    try:
        size = 1 << fdp.ConsumeIntInRange(0, 4)
        ram = memory_file(ram_size())
        files.append(ram)
        try:  # rings, when the file takes writes
            os.pwrite(ram, fdp.ConsumeBytes(desc_table_size(size)), 0)
            os.pwrite(ram, struct.pack("<HH", 0, fdp.ConsumeIntInRange(0, 0xFFFF)), 0x1000)
            os.pwrite(ram, fdp.ConsumeBytes(2 * size), 0x1000 + AVAIL_RING)
        except OSError:
            pass
        kick = notify_fd()
        kicks.append(kick)
        steps = [
            (2, struct.pack("<Q", device.features()), []),
            (5, struct.pack("<II", 1, 0) + struct.pack("<QQQQ", GUEST, RAM_SIZE, USER, 0), [ram]),
        ]
        if fdp.ConsumeBool():
            infl = memory_file(fdp.ConsumeIntInRange(0, 8192) if fdp.ConsumeBool() else 4096)
            files.append(infl)
            steps.append((32, struct.pack("<QQHH", 4096, 0, 1, size), [infl]))
        steps += [
            (8, struct.pack("<II", 0, size), []),
            (9, struct.pack("<IIQQQQ", 0, 0, USER, USER + 0x2000, USER + 0x1000, 0), []),
            (13, struct.pack("<Q", 0), [notify_fd()]),
            (14, struct.pack("<Q", 0), [notify_fd()]) if fdp.ConsumeBool() else None,
            (12, struct.pack("<Q", 0), [kick]),
        ]
        for step in steps:
            if step is not None and not send(*step):
                alive = False
                break
        for _ in range(fdp.ConsumeIntInRange(0, 12) if alive else 0):
            action = fdp.ConsumeIntInRange(0, 7)
            if action <= 1 and kicks:
                try:  # never blocking the frontend itself (a saturated kick eventfd)
                    fd = kicks[fdp.ConsumeIntInRange(0, len(kicks) - 1)]
                    os.set_blocking(fd, False)
                    os.eventfd_write(fd, 1)
                except OSError:
                    pass
            elif action == 2 and files:  # shrink a memory file under its mapping
                try:
                    fd = files[fdp.ConsumeIntInRange(0, len(files) - 1)]
                    os.ftruncate(fd, fdp.ConsumeIntInRange(0, 8192))
                except OSError:
                    pass
            elif action == 3 and files:  # grow it back (pages past the old end are zeros again)
                try:
                    os.ftruncate(files[fdp.ConsumeIntInRange(0, len(files) - 1)], RAM_SIZE)
                except OSError:
                    pass
            elif action == 4 and files:  # punch a hole: allowed even on a sealed memfd
                try:
                    fd = files[fdp.ConsumeIntInRange(0, len(files) - 1)]
                    _punch(fd, fdp.ConsumeIntInRange(0, RAM_SIZE), fdp.ConsumeIntInRange(1, RAM_SIZE))
                except OSError:
                    pass
            elif action == 5:  # a new notification fd for a ring
                req = (12, 13, 14)[fdp.ConsumeIntInRange(0, 2)]
                fd = notify_fd()
                if req == 12:
                    kicks.append(fd)
                if not send(req, struct.pack("<Q", fdp.ConsumeIntInRange(0, 1)), [fd]):
                    alive = False
                    break
            elif action == 6:  # another memory table, another file
                fd = memory_file(ram_size())
                files.append(fd)
                payload = struct.pack("<II", 1, 0) + struct.pack("<QQQQ", GUEST, RAM_SIZE, USER, 0)
                if not send(5, payload, [fd]):
                    alive = False
                    break
            else:  # the ring state, which reads the (maybe shrunk) used ring
                if not send(11, struct.pack("<II", 0, 0)):
                    alive = False
                    break
                break
        if alive:
            try:
                sock.sendall(HEADER.pack(1, 1, 0))
                vu.recv_replies(sock, 1, 5.0)
            except (BrokenPipeError, ConnectionResetError, vu.Violation):
                pass
        _check_protected(backend, violations)
    finally:
        sock.close()
        for fd in own:
            os.close(fd)
    vu.check_connection_ended()
    foreign = [f for f in common.data_files(opened) if not f.startswith(_tmp) and f != os.devnull]
    assert not foreign, f"files opened while serving a frontend: {foreign}"
    leaked = common.open_fd_count() - baseline
    assert leaked <= 0, f"{leaked} file descriptor(s) left open after the connection"


def _punch(fd: int, offset: int, length: int) -> None:
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    # FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE
    if libc.fallocate(fd, 0x02 | 0x01, ctypes.c_long(offset), ctypes.c_long(length)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


if __name__ == "__main__":
    common.run(one_input, (*vu.MODULES, "vdm_vhost_user.faultguard"))
    sys.exit(0)
