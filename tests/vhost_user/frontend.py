"""A vhost-user frontend in Python, for tests: what QEMU does, in a few hundred lines.

Guest RAM is a memfd shared with the backend (SCM_RIGHTS), seen by the backend at a guest-physical
base and by this "frontend" at a different user address, so that ring address translation is
exercised. Rings are laid out in that RAM by :class:`vdm.testing.ring.DriverRing` (the one driver-side ring
of the project); kick and call are eventfds.
Raw helpers (:meth:`Frontend.send`, :meth:`Frontend.send_raw`) let tests send malformed messages.
"""

from __future__ import annotations

import array
import mmap
import os
import select
import socket
import time

from vdm.memory import FlatGuestMemory, MemoryRegion
from vdm.testing.ring import DriverRing, RingMemory, Used
from vdm_vhost_user import protocol as p
from vdm_vhost_user.protocol import Req

GUEST_BASE = 0x1_0000_0000  # guest-physical address of RAM
USER_BASE = 0x7F12_3400_0000  # where the "frontend process" has it mapped
F_VERSION_1 = 1 << 32
F_EVENT_IDX = 1 << 29
F_INDIRECT = 1 << 28


class SharedRam:
    """Guest RAM in a memfd, with a bump allocator."""

    def __init__(
        self,
        size: int = 8 << 20,
        base: int = GUEST_BASE,
        user: int = USER_BASE,
        sealing: bool = False,
        path: str | None = None,
    ) -> None:
        """RAM in a memfd (``sealing``: one that allows file seals, as QEMU's memfd backend makes
        it), or in the plain file ``path`` (QEMU's memory-backend-file share=on)."""
        self.size = size
        self.base = base
        self.user = user
        if path is not None:
            self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        else:
            flags = os.MFD_CLOEXEC | (os.MFD_ALLOW_SEALING if sealing else 0)
            self.fd = os.memfd_create("test-guest-ram", flags)
        os.ftruncate(self.fd, size)
        self.map = mmap.mmap(self.fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        self.memory = FlatGuestMemory([MemoryRegion(base, memoryview(self.map))])
        self._next = base

    def alloc(self, size: int, align: int = 16) -> int:
        addr = -(-self._next // align) * align
        if addr + size > self.base + self.size:
            raise MemoryError("test guest RAM exhausted")
        self._next = addr + size
        return addr

    def free(self, addr: int, size: int) -> None:
        """A bump allocator: freed space is not reused (a test's RAM outlives its requests)."""

    def to_user(self, gpa: int) -> int:
        return gpa - self.base + self.user

    def read(self, addr: int, n: int) -> bytes:
        return self.memory.read(addr, n)

    def write(self, addr: int, data: bytes) -> None:
        self.memory.write(addr, data)

    def close(self) -> None:
        if self.fd < 0:
            return
        self.memory = FlatGuestMemory()
        try:
            self.map.close()
        except BufferError:
            pass
        os.close(self.fd)
        self.fd = -1


class Queue(DriverRing):
    """One ring in the frontend's RAM, with its kick and call eventfds."""

    def __init__(self, ram: RingMemory, index: int, size: int, desc: int, avail: int, used: int) -> None:
        super().__init__(ram, index, size, desc, avail, used)
        self.kick = os.eventfd(0, os.EFD_CLOEXEC)
        self.call = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)


class Frontend:
    """One connection to a vhost-user backend."""

    def __init__(self, path: str, ram: SharedRam | None = None, timeout: float = 10.0) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.sock.connect(path)
                break
            except (FileNotFoundError, ConnectionRefusedError):
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.02)
        self.ram = ram if ram is not None else SharedRam()
        self.queues: dict[int, Queue] = {}
        self.reply_ack = False
        self.interrupts = 0
        self.path = path
        self.timeout = timeout
        #: the inflight region (fd, size, queues, queue size) once the backend gave one
        self.inflight: tuple[int, int, int, int] | None = None

    def close(self) -> None:
        self.sock.close()
        if self.inflight is not None:
            os.close(self.inflight[0])
            self.inflight = None
        for q in self.queues.values():
            os.close(q.kick)
            os.close(q.call)
        self.queues.clear()

    # ---- raw messages ---------------------------------------------------------------------------

    def send_raw(self, data: bytes, fds: list[int] | tuple[int, ...] = ()) -> None:
        if fds:
            self.sock.sendmsg(
                [data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())]
            )
        else:
            self.sock.sendall(data)

    def send(self, request: int, payload: bytes = b"", fds=(), need_reply: bool = False) -> None:
        flags = p.VERSION | (p.FLAG_NEED_REPLY if need_reply else 0)
        self.send_raw(p.HEADER.pack(request, flags, len(payload)) + payload, fds)

    def recv(self, request: int) -> tuple[bytes, list[int]]:
        fds = array.array("i")
        data, anc, _, _ = self.sock.recvmsg(p.HEADER.size, socket.CMSG_SPACE(8 * 4))
        for level, kind, cdata in anc:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds.frombytes(cdata[: len(cdata) - len(cdata) % 4])
        if not data:
            raise ConnectionError("the backend closed the connection")
        while len(data) < p.HEADER.size:
            more = self.sock.recv(p.HEADER.size - len(data))
            if not more:
                raise ConnectionError("the backend closed the connection")
            data += more
        req, flags, size = p.HEADER.unpack(data)
        assert req == request, f"reply to {Req.name(req)}, expected {Req.name(request)}"
        assert flags & p.FLAG_REPLY and flags & p.VERSION_MASK == p.VERSION
        payload = b""
        while len(payload) < size:
            more = self.sock.recv(size - len(payload))
            if not more:
                raise ConnectionError("the backend closed the connection")
            payload += more
        return payload, list(fds)

    def call(self, request: int, payload: bytes = b"", fds=()) -> None:
        """A request without a reply of its own; with REPLY_ACK, wait for the ack and check it."""
        self.send(request, payload, fds, need_reply=self.reply_ack)
        if self.reply_ack:
            data, _ = self.recv(request)
            (status,) = p.U64.unpack(data)
            if status:
                raise RuntimeError(f"{Req.name(request)} failed: {status}")

    def get_u64(self, request: int) -> int:
        self.send(request)
        data, _ = self.recv(request)
        return p.U64.unpack(data)[0]

    def closed_by_backend(self, timeout: float = 5.0) -> bool:
        """Whether the backend closed the connection (EOF) within ``timeout``."""
        self.sock.settimeout(timeout)
        try:
            while True:
                data = self.sock.recv(4096)
                if not data:
                    return True
        except socket.timeout:
            return False
        except ConnectionResetError:
            return True

    # ---- the usual requests --------------------------------------------------------------------

    def get_features(self) -> int:
        return self.get_u64(Req.GET_FEATURES)

    def set_features(self, features: int) -> None:
        self.call(Req.SET_FEATURES, p.U64.pack(features))

    def get_protocol_features(self) -> int:
        return self.get_u64(Req.GET_PROTOCOL_FEATURES)

    def set_protocol_features(self, features: int) -> None:
        self.call(Req.SET_PROTOCOL_FEATURES, p.U64.pack(features))
        self.reply_ack = bool(features >> p.ProtocolFeature.REPLY_ACK & 1)

    def set_mem_table(self) -> None:
        ram = self.ram
        payload = p.MEM_TABLE_HEAD.pack(1, 0) + p.MEM_REGION.pack(ram.base, ram.size, ram.user, 0)
        self.call(Req.SET_MEM_TABLE, payload, [ram.fd])

    def get_config(self, offset: int, size: int) -> bytes:
        self.send(Req.GET_CONFIG, p.CONFIG_HEAD.pack(offset, size, 0) + bytes(size))
        data, _ = self.recv(Req.GET_CONFIG)
        assert p.CONFIG_HEAD.unpack_from(data) == (offset, size, 0)
        return data[p.CONFIG_HEAD.size :]

    def get_vring_base(self, index: int) -> int:
        self.send(Req.GET_VRING_BASE, p.VRING_STATE.pack(index, 0))
        data, _ = self.recv(Req.GET_VRING_BASE)
        i, num = p.VRING_STATE.unpack(data)
        assert i == index
        return num

    def get_inflight_fd(self, num_queues: int, queue_size: int) -> tuple[int, int]:
        """(fd, mmap size) of a new inflight region."""
        self.send(Req.GET_INFLIGHT_FD, p.INFLIGHT.pack(0, 0, num_queues, queue_size))
        data, fds = self.recv(Req.GET_INFLIGHT_FD)
        size, offset, nq, qs = p.INFLIGHT.unpack(data)
        assert (offset, nq, qs) == (0, num_queues, queue_size) and len(fds) == 1
        return fds[0], size

    def set_inflight_fd(self, fd: int, size: int, num_queues: int, queue_size: int) -> None:
        self.call(Req.SET_INFLIGHT_FD, p.INFLIGHT.pack(size, 0, num_queues, queue_size), [fd])

    # ---- migration: the dirty log --------------------------------------------------------------

    def set_log_base(self, size: int | None = None) -> tuple[int, mmap.mmap]:
        """Give the backend a dirty log (a memfd, as QEMU's ``vhost_log_alloc`` makes it) covering
        guest-physical 0 up to the end of RAM; returns (fd, a mapping of it). Waits for the reply."""
        if size is None:
            pages = -(-(self.ram.base + self.ram.size) // 4096)
            size = -(-pages // 8)
        fd = os.memfd_create("test-vhost-log", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        os.ftruncate(fd, size)
        self.send(Req.SET_LOG_BASE, p.LOG_BASE.pack(size, 0), [fd])
        self.recv(Req.SET_LOG_BASE)
        return fd, mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)

    def set_logging(self, on: bool) -> None:
        """SET_FEATURES with VHOST_F_LOG_ALL set or cleared (what QEMU does as migration starts/ends)."""
        log_all = 1 << p.F_LOG_ALL if on else 0
        self.set_features(self._acked | 1 << p.F_PROTOCOL_FEATURES | log_all)

    # ---- rings -----------------------------------------------------------------------------------

    def layout_queue(self, index: int, size: int) -> Queue:
        """Rings in guest RAM, zeroed, and fresh kick/call eventfds (not yet sent)."""
        q = Queue.allocate(self.ram, index, size)
        self.queues[index] = q
        return q

    def send_queue(self, q: Queue, base: int = 0, enable: bool = True) -> None:
        """NUM, BASE, ADDR, KICK, CALL (and ENABLE) for one queue, as QEMU sends them."""
        ram = self.ram
        self.call(Req.SET_VRING_NUM, p.VRING_STATE.pack(q.index, q.size))
        self.call(Req.SET_VRING_BASE, p.VRING_STATE.pack(q.index, base))
        self.call(
            Req.SET_VRING_ADDR,
            p.VRING_ADDR.pack(q.index, 0, ram.to_user(q.desc), ram.to_user(q.used), ram.to_user(q.avail), 0),
        )
        self.call(Req.SET_VRING_KICK, p.U64.pack(q.index), [q.kick])
        self.call(Req.SET_VRING_CALL, p.U64.pack(q.index), [q.call])
        if enable:
            self.call(Req.SET_VRING_ENABLE, p.VRING_STATE.pack(q.index, 1))

    def start(
        self,
        features: int | None = None,
        queues: dict[int, int] | None = None,
        protocol: int | None = None,
        inflight: bool = False,
    ) -> int:
        """The whole handshake; returns the virtio features acked.

        ``inflight``: get an inflight region from the backend and hand it back (QEMU's
        vhost-user-blk does this at every start; it keeps the region across reconnects).
        """
        offered = self.get_features()
        assert offered >> p.F_PROTOCOL_FEATURES & 1
        proto = self.get_protocol_features() if protocol is None else protocol
        self.set_protocol_features(proto)
        self.call(Req.SET_OWNER)
        # like QEMU: VHOST_F_LOG_ALL only while migrating (set_logging)
        acked = offered & ~(1 << p.F_LOG_ALL) if features is None else features
        acked &= ~(1 << p.F_PROTOCOL_FEATURES)
        self.set_features(acked | 1 << p.F_PROTOCOL_FEATURES)
        self.set_mem_table()
        sizes = queues or {0: 16}
        if inflight:
            if self.inflight is None:
                qs = max(sizes.values())
                fd, size = self.get_inflight_fd(len(sizes), qs)
                self.inflight = (fd, size, len(sizes), qs)
            self.set_inflight_fd(*self.inflight)
        for index, size in sizes.items():
            q = self.queues.get(index) or self.layout_queue(index, size)
            # after a backend crash QEMU restarts a ring at the used index the guest sees
            self.send_queue(q, base=self.used_idx(index) if index in self.queues else 0)
        self._acked = acked
        return acked

    def reconnect(self, inflight: bool = True) -> int:
        """Connect again (the backend went away) and restart the same rings where they are."""
        self.sock.close()
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        deadline = time.monotonic() + self.timeout
        while True:
            try:
                self.sock.connect(self.path)
                break
            except (FileNotFoundError, ConnectionRefusedError):
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.02)
        self.reply_ack = False
        return self.start(self._acked, {i: q.size for i, q in self.queues.items()}, inflight=inflight)

    def inflight_heads(self, qi: int = 0) -> list[int]:
        """Heads the backend marked in flight in the shared region (what a new backend resubmits)."""
        assert self.inflight is not None
        fd, size, nq, _ = self.inflight
        # the layout is the backend's choice (vdm: a slot per queue with room for any ring, the
        # size split evenly); the entries' format is the spec's. The ring may exceed the queue size.
        stride = size // nq // 64 * 64
        ring = self.queues[qi].size
        region = os.pread(fd, 16 + 16 * ring, qi * stride)
        return [i for i in range(ring) if region[16 + 16 * i] == 1]

    def post(self, qi: int, out: list[bytes] = (), in_lens: list[int] = (), kick: bool = True,  # type: ignore[assignment]
             in_align: int = 16) -> int:
        """Put one chain on the available ring; returns its head (writable buffers ``in_align``ed).
        ``used_event`` is kept at the last used index seen: an interrupt for every completion."""
        head = self.queues[qi].add(out, in_lens, out_align=16, in_align=in_align, used_event=True)
        if kick:
            self.kick(qi)
        return head

    def kick(self, qi: int) -> None:
        os.eventfd_write(self.queues[qi].kick, 1)

    def used_idx(self, qi: int) -> int:
        return self.queues[qi].used_idx()

    def collect(self, qi: int) -> list[Used]:
        """Every used element published since the last call (no waiting)."""
        return self.queues[qi].collect(used_event=True)

    def wait_used(self, qi: int, count: int = 1, timeout: float = 10.0) -> list[Used]:
        """Wait (on the call eventfd) until ``count`` more chains are used."""
        q = self.queues[qi]

        def on_call(left: float) -> None:
            r, _, _ = select.select([q.call], [], [], min(left, 0.5))
            if r:
                try:
                    self.interrupts += os.eventfd_read(q.call)
                except BlockingIOError:
                    pass

        return q.wait(count, timeout, on_call, used_event=True)

    def poll_used(self, qi: int, count: int = 1, timeout: float = 10.0) -> list[Used]:
        """Like :meth:`wait_used`, but never reads the call fd (for tests that leave it unread)."""
        return self.queues[qi].wait(count, timeout, lambda left: time.sleep(min(left, 0.01)), used_event=True)

    def request(self, qi: int, out: list[bytes] = (), in_lens: list[int] = (), timeout: float = 10.0) -> Used:  # type: ignore[assignment]
        head = self.post(qi, out, in_lens)
        used = self.wait_used(qi, 1, timeout)
        assert used[0].head == head
        return used[0]
