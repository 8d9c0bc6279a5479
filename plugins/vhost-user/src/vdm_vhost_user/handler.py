"""One vdm device served to one vhost-user frontend at a time: the protocol's state machine.

The frontend owns the transport (virtio-pci in QEMU); it tells this backend what a transport
would: the negotiated features, where the rings are, their sizes and start indexes, and it hands
over eventfds -- *kick* (the driver notified a queue: the notify path) and *call* (interrupt the
driver). Guest RAM arrives as shared file descriptors (:mod:`.memory`).

In vdm's terms this module is one more hypervisor interface: it fills the device's
:class:`~vdm.virtqueue.Virtqueue` fields, activates the device through
:meth:`~vdm.device.VirtioDevice.activate`, turns kick eventfds (read on the core
:class:`~vdm.eventloop.EventLoop`) into :meth:`~vdm.device.VirtioDevice.kick` and the device's
interrupts into writes to call eventfds. The device code is the same as under KVM or Xen.

A ring is *live* once it has a size, addresses inside the shared memory, a kick eventfd and is
enabled; the first live ring activates the device. GET_VRING_BASE stops a ring; when no ring is
live any more the device is reset (which waits for requests still being served), so the index
handed back covers every request taken.
"""

from __future__ import annotations

import logging
import os
import socket
import struct
import threading
from dataclasses import dataclass
from typing import Callable

from vdm.device import Status, VirtioDevice
from vdm.eventloop import EventLoop, drain_eventfd
from vdm.memory import GuestMemoryError
from vdm.transport.common import CommonConfig
from vdm.virtqueue import Virtqueue

from . import protocol as p
from .dirtylog import DirtyLog, atomic_or_available
from .faultguard import FaultWatch
from .inflight import InflightRegion, InflightTracker
from .memory import MemoryTable, RegionSpec, SharedGuestMemory
from .protocol import Message, ProtocolError, ProtocolFeature, Req
from .transport import split_features

__all__ = ["OFFERED_PROTOCOL_FEATURES", "VhostUserHandler"]

log = logging.getLogger(__name__)

OFFERED_PROTOCOL_FEATURES = (
    1 << ProtocolFeature.MQ
    | 1 << ProtocolFeature.REPLY_ACK
    | 1 << ProtocolFeature.CONFIG
    | 1 << ProtocolFeature.INFLIGHT_SHMFD
    | 1 << ProtocolFeature.RESET_DEVICE
    | 1 << ProtocolFeature.CONFIGURE_MEM_SLOTS
    | 1 << ProtocolFeature.STATUS
)
#: live migration (VHOST_F_LOG_ALL with a shared log, :mod:`.dirtylog`) needs an atomic OR
LOGGING_OFFERED = atomic_or_available()
if LOGGING_OFFERED:
    OFFERED_PROTOCOL_FEATURES |= 1 << ProtocolFeature.LOG_SHMFD

#: requests that carry their own reply (REPLY_ACK adds nothing to them)
_HAS_REPLY = {
    Req.GET_FEATURES,
    Req.GET_PROTOCOL_FEATURES,
    Req.GET_VRING_BASE,
    Req.GET_QUEUE_NUM,
    Req.GET_CONFIG,
    Req.GET_INFLIGHT_FD,
    Req.GET_MAX_MEM_SLOTS,
    Req.GET_STATUS,
    Req.SET_LOG_BASE,
}


class Refused(Exception):
    """A request that is well-formed but cannot be done: answered with a failure, not fatal."""


@dataclass
class Vring:
    """What the frontend told us about one ring (kept apart from the device's Virtqueue)."""

    num: int | None = None
    desc_user: int | None = None
    avail_user: int = 0
    used_user: int = 0
    base: int = 0
    kick_fd: int | None = None
    call_fd: int | None = None
    err_fd: int | None = None
    enabled: bool = False
    #: the ring is mapped and the device serves it
    live: bool = False


def _close(fd: int | None) -> None:
    if fd is not None:
        try:
            os.close(fd)
        except OSError:
            pass


def _eventfd_or_refuse(fd: int, what: str) -> int:
    """``fd`` if it is an eventfd, made non-blocking; otherwise close it and raise ProtocolError.

    A pipe or socket as a call fd blocks vdm once nobody reads it, and a kick fd that is not an
    eventfd does not read as one. Non-blocking: a write to a saturated counter fails at once.
    """
    try:
        kind = os.readlink(f"/proc/self/fd/{fd}")
    except OSError as e:
        _close(fd)
        raise ProtocolError(f"{what}: cannot check the file descriptor: {e}") from None
    if kind != "anon_inode:[eventfd]":
        _close(fd)
        raise ProtocolError(f"{what}: the file descriptor is not an eventfd ({kind})")
    os.set_blocking(fd, False)
    return fd


def _signal(fd: int) -> None:
    """Add 1 to a (non-blocking) eventfd. A counter at its maximum is signalled already: the
    reader wakes anyway, so a write that would block is simply dropped."""
    try:
        os.eventfd_write(fd, 1)
    except BlockingIOError:
        pass


class VhostUserHandler:
    """Serves ``device`` to the frontend on one connection at a time."""

    def __init__(self, device: VirtioDevice, loop: EventLoop) -> None:
        self.device = device
        self.loop = loop
        # The device keeps its queues; each gets a tracker that notes in-flight heads in the
        # shared inflight region, and a new limit: the frontend picks the ring's size
        # (SET_VRING_NUM), any a split ring may have, so the queue's maximum is the spec's.
        # Nothing else of the device is touched.
        self.trackers: list[InflightTracker] = []
        for q in device.queues:
            q.set_max_size(p.MAX_RING_SIZE)
            tracker = InflightTracker(q)
            q.set_tracker(tracker)
            self.trackers.append(tracker)
        device.interrupts = self
        #: the transport rules shared with virtio-mmio/pci (a ring enabled while the device runs)
        self.common = CommonConfig(device)
        kept = device.features() & device.control_queue_features
        if kept:
            log.warning(
                "vhost-user: %s features 0x%x are not offered: they work through the control queue, "
                "which the frontend serves itself (a virtio-net guest uses one queue pair)",
                device.name, kept,
            )
        self.memory = SharedGuestMemory()
        self._fd_lock = threading.Lock()
        #: called (on the loop thread) when the connection must end outside a message, e.g. a kick
        #: fd that fails; the server closes the connection. The default only logs.
        self.on_failure: Callable[[str], None] = lambda why: log.error("vhost-user: %s", why)
        # SIGBUS caught in a mapping of a file the frontend could shrink (.faultguard): the watch
        # lives as long as the backend, since mappings may outlive their connection
        self._faults = FaultWatch()
        self._faults_seen = 0
        loop.add_reader(self._faults.fd, self._on_fault)
        self.sock: socket.socket | None = None
        #: SET_LOG_FD's eventfd, kept (QEMU does not send one; the log itself is what it reads)
        self.log_fd: int | None = None
        self._reset_state()

    def _reset_state(self) -> None:
        self.vrings = [Vring() for _ in self.device.queues]
        self.features: int | None = None
        self.protocol_features = 0
        self.protocol_negotiated = False
        self.status = 0
        self.owner = False
        self.inflight: InflightRegion | None = None
        self.memory.replace(MemoryTable())
        self.memory.logging = False
        self.memory.set_dirty_log(None)
        #: transport feature bits acked without being offered (.transport)
        self.transport_features = 0

    # ---- connection life -----------------------------------------------------------------------

    def attach(self, sock: socket.socket) -> None:
        """A frontend connected."""
        self.sock = sock
        self._faults_seen = self._faults.faults

    def _on_fault(self) -> None:
        drain_eventfd(self._faults.fd)
        if self.sock is not None and self._faults.faults != self._faults_seen:
            self._faults_seen = self._faults.faults
            self.on_failure(
                "the frontend shrank a shared memory file under its mapping (SIGBUS caught; "
                "the pages past its end now read as zeros)"
            )

    def detach(self) -> None:
        """The frontend went away (or was thrown out): stop the device, forget everything."""
        self._stop_all()
        with self._fd_lock:
            for vr in self.vrings:
                _close(vr.call_fd)
                _close(vr.err_fd)
                vr.call_fd = vr.err_fd = None
            _close(self.log_fd)
            self.log_fd = None
        self._reset_state()
        self.sock = None

    def _stop_all(self) -> None:
        for i, vr in enumerate(self.vrings):
            self._drop_kick(i, vr)
            vr.live = False
            self.device.queues[i].set_ready(False)
        self.device.reset()

    # ---- interrupts: what the device calls (DeviceInterrupts) ----------------------------------

    def queue_interrupt(self, queue: Virtqueue) -> None:
        with self._fd_lock:
            if 0 <= queue.index < len(self.vrings):
                fd = self.vrings[queue.index].call_fd
                if fd is not None:
                    try:
                        _signal(fd)
                    except OSError as e:
                        log.warning("vhost-user: cannot signal call eventfd of queue %d: %s", queue.index, e)

    def config_interrupt(self) -> None:
        # Without a backend request channel a configuration change cannot be announced; a device
        # that broke (DEVICE_NEEDS_RESET) is reported on the rings' error eventfds.
        if self.device.broken is None:
            return
        with self._fd_lock:
            for i, vr in enumerate(self.vrings):
                if vr.err_fd is not None and vr.live:
                    try:
                        _signal(vr.err_fd)
                    except OSError as e:
                        log.warning("vhost-user: cannot signal error eventfd of queue %d: %s", i, e)

    # ---- messages ------------------------------------------------------------------------------

    def handle(self, msg: Message) -> None:
        """Act on one request and send its reply. Raises ProtocolError to close the connection."""
        handler: Callable[[Message], bytes | tuple[bytes, list[int]] | None] = self._handlers[msg.request]
        log.debug("vhost-user: %s %s (%d fds)", msg.name, msg.payload.hex(), len(msg.fds))
        ok = True
        try:
            reply = handler(self, msg)
        except Refused as e:
            log.warning("vhost-user: %s refused: %s", msg.name, e)
            reply, ok = None, False
        finally:
            msg.close_fds()
        if msg.request in _HAS_REPLY:
            payload, fds = reply if isinstance(reply, tuple) else (reply or b"", [])
            try:
                self._send(msg.request, payload, fds)
            finally:
                for fd in fds:
                    _close(fd)
        elif msg.need_reply and self.protocol_features & (1 << ProtocolFeature.REPLY_ACK):
            self._send(msg.request, p.U64.pack(0 if ok else 1))

    def _send(self, request: int, payload: bytes, fds: list[int] = ()) -> None:  # type: ignore[assignment]
        if self.sock is None:
            return
        log.debug("vhost-user: reply %s %s (%d fds)", Req.name(request), payload.hex(), len(fds))
        try:
            p.send_message(self.sock, request, payload, fds)
        except OSError as e:
            raise ProtocolError(f"cannot send the reply to {Req.name(request)}: {e}") from None

    def _ring(self, index: int, what: str) -> Vring:
        if not 0 <= index < len(self.vrings):
            raise ProtocolError(f"{what}: queue index {index}, the device has {len(self.vrings)} queues")
        return self.vrings[index]

    # features

    def offered_features(self) -> int:
        """The device's features as offered to a vhost-user frontend (without the protocol bit).

        A vhost-user frontend keeps the device's control queue (QEMU serves virtio-net's and never
        hands it over), so features that only work through it are left out: offered, virtio-net's
        MQ would be negotiated and the driver's VQ_PAIRS_SET would never reach the device.
        """
        return self.device.features() & ~self.device.control_queue_features

    def _get_features(self, msg: Message) -> bytes:
        log_all = 1 << p.F_LOG_ALL if LOGGING_OFFERED else 0
        return p.U64.pack(self.offered_features() | 1 << p.F_PROTOCOL_FEATURES | log_all)

    def _set_features(self, msg: Message) -> None:
        (value,) = p.U64.unpack(msg.payload)
        acked = split_features(value, self.offered_features(), LOGGING_OFFERED)
        virtio = acked.device
        self.protocol_negotiated = acked.protocol
        # VHOST_F_LOG_ALL comes and goes while the rings run (migration starts, fails, ends)
        if self.device.activated and self.features is not None and virtio != self.features:
            raise ProtocolError("SET_FEATURES: features changed while the device runs")
        if acked.transport != self.transport_features:
            log.info("vhost-user: %s: the frontend acked %s; accepted (the frontend's transport serves "
                     "it)", self.device.name, acked.names() or "no transport features")
        self.transport_features = acked.transport
        if acked.log_all != self.memory.logging:
            log.info("vhost-user: %s: dirty logging %s", self.device.name,
                     "on (migration)" if acked.log_all else "off")
            self.memory.logging = acked.log_all
            if acked.log_all:
                for q, tracker in zip(self.device.queues, self.trackers):
                    if q.ready:  # flags and avail_event written before logging started
                        tracker.log_used_ring()
        self.features = virtio
        why = self.device.set_driver_features(virtio)
        if why is not None:
            raise ProtocolError(f"SET_FEATURES: {why}")

    def _get_protocol_features(self, msg: Message) -> bytes:
        return p.U64.pack(OFFERED_PROTOCOL_FEATURES)

    def _set_protocol_features(self, msg: Message) -> None:
        (value,) = p.U64.unpack(msg.payload)
        extra = value & ~OFFERED_PROTOCOL_FEATURES
        if extra:
            raise ProtocolError(f"SET_PROTOCOL_FEATURES: 0x{extra:x} were not offered")
        self.protocol_features = value

    def _set_log_base(self, msg: Message) -> bytes:
        if not self.protocol_features & (1 << ProtocolFeature.LOG_SHMFD):
            raise ProtocolError("SET_LOG_BASE without LOG_SHMFD negotiated")
        size, offset = p.LOG_BASE.unpack(msg.payload)
        self.memory.set_dirty_log(DirtyLog(msg.fds[0], size, offset, self._faults))
        log.info("vhost-user: %s: dirty log of %d bytes", self.device.name, size)
        return p.U64.pack(0)

    def _set_log_fd(self, msg: Message) -> None:
        fd = msg.take_fd()
        fd = _eventfd_or_refuse(fd, "SET_LOG_FD") if fd is not None else None
        with self._fd_lock:
            _close(self.log_fd)
            self.log_fd = fd

    def _set_owner(self, msg: Message) -> None:
        self.owner = True

    def _reset_device(self, msg: Message) -> None:
        self._stop_all()
        with self._fd_lock:
            for vr in self.vrings:
                _close(vr.call_fd)
                _close(vr.err_fd)
        memory = self.memory.table
        owner, proto = self.owner, self.protocol_features
        self._reset_state()
        self.memory.replace(memory)
        self.owner, self.protocol_features = owner, proto

    def _get_queue_num(self, msg: Message) -> bytes:
        return p.U64.pack(len(self.device.queues))

    def _get_status(self, msg: Message) -> bytes:
        status = self.status
        if self.device.broken is not None:
            status |= Status.DEVICE_NEEDS_RESET
        return p.U64.pack(status)

    def _set_status(self, msg: Message) -> None:
        (value,) = p.U64.unpack(msg.payload)
        if value > 0xFF:
            raise ProtocolError(f"SET_STATUS: 0x{value:x} is not a status byte")
        # Recorded only: rings start and stop through the ring messages (QEMU sends status 0
        # before it asks for the ring indexes, which must survive it).
        if value & Status.FEATURES_OK and not self.status & Status.FEATURES_OK:
            if self.features is None or self.device.set_driver_features(self.features) is not None:
                value &= ~Status.FEATURES_OK
        self.status = value

    # memory

    def _set_mem_table(self, msg: Message) -> None:
        count, _ = p.MEM_TABLE_HEAD.unpack_from(msg.payload)
        listed = (len(msg.payload) - p.MEM_TABLE_HEAD.size) // p.MEM_REGION.size
        if not 1 <= count <= listed:
            raise ProtocolError(f"SET_MEM_TABLE: {count} regions in a message with room for {listed}")
        if len(msg.fds) != count:
            raise ProtocolError(f"SET_MEM_TABLE: {count} regions but {len(msg.fds)} file descriptors")
        specs = [
            RegionSpec(*p.MEM_REGION.unpack_from(msg.payload, p.MEM_TABLE_HEAD.size + i * p.MEM_REGION.size))
            for i in range(count)
        ]
        table = MemoryTable.build(specs, msg.fds, self._faults)
        self._check_live_rings(table)
        self.memory.replace(table)
        self._update_rings()

    def _get_max_mem_slots(self, msg: Message) -> bytes:
        return p.U64.pack(p.MAX_MEM_SLOTS)

    def _add_mem_reg(self, msg: Message) -> None:
        spec = RegionSpec(*p.SINGLE_REGION.unpack(msg.payload)[1:])
        if len(self.memory.table) >= p.MAX_MEM_SLOTS:
            raise ProtocolError(f"ADD_MEM_REG: more than {p.MAX_MEM_SLOTS} regions")
        self.memory.replace(self.memory.table.with_region(spec, msg.fds[0], self._faults))
        self._update_rings()

    def _rem_mem_reg(self, msg: Message) -> None:
        spec = RegionSpec(*p.SINGLE_REGION.unpack(msg.payload)[1:])
        table = self.memory.table.without_region(spec)
        self._check_live_rings(table)
        self.memory.replace(table)

    def _check_live_rings(self, table: MemoryTable) -> None:
        for i, vr in enumerate(self.vrings):
            if vr.live:
                self._translate(i, vr, table)

    # rings

    def _set_vring_num(self, msg: Message) -> None:
        index, num = p.VRING_STATE.unpack(msg.payload)
        vr = self._ring(index, "SET_VRING_NUM")
        # a split ring: a power of two up to 32768, whatever the device's own queue size (the
        # largest ring vdm's KVM/Xen transports offer); work per kick is bounded by the core's budget
        if not 1 <= num <= p.MAX_RING_SIZE or num & (num - 1):
            raise ProtocolError(
                f"SET_VRING_NUM: queue {index} size {num} (a split ring's is a power of two up to "
                f"{p.MAX_RING_SIZE})"
            )
        if vr.live and num != vr.num:
            raise ProtocolError(f"SET_VRING_NUM: queue {index} is running")
        vr.num = num

    def _set_vring_addr(self, msg: Message) -> None:
        index, _flags, desc, used, avail, _log = p.VRING_ADDR.unpack(msg.payload)
        vr = self._ring(index, "SET_VRING_ADDR")
        if vr.live and (desc, avail, used) != (vr.desc_user, vr.avail_user, vr.used_user):
            raise ProtocolError(f"SET_VRING_ADDR: queue {index} is running")
        if desc % 16 or avail % 2 or used % 4:
            raise ProtocolError(f"SET_VRING_ADDR: queue {index}: misaligned ring address")
        # Checked now against the ring size known so far, and again when the ring starts.
        num = vr.num or 1
        table = self.memory.table
        for what, addr, length in (
            ("descriptor table", desc, 16 * num),
            ("available ring", avail, 6 + 2 * num),
            ("used ring", used, 6 + 8 * num),
        ):
            try:
                table.user_to_guest(addr, length)
            except ProtocolError as e:
                raise ProtocolError(f"SET_VRING_ADDR: queue {index} {what}: {e}") from None
        vr.desc_user, vr.avail_user, vr.used_user = desc, avail, used
        self._update_rings()

    def _set_vring_base(self, msg: Message) -> None:
        index, num = p.VRING_STATE.unpack(msg.payload)
        vr = self._ring(index, "SET_VRING_BASE")
        if num > 0xFFFF:
            raise ProtocolError(f"SET_VRING_BASE: queue {index} base {num} (split rings only)")
        if vr.live:
            raise ProtocolError(f"SET_VRING_BASE: queue {index} is running")
        vr.base = num

    def _get_vring_base(self, msg: Message) -> bytes:
        index, _ = p.VRING_STATE.unpack(msg.payload)
        vr = self._ring(index, "GET_VRING_BASE")
        base = self._stop_ring(index, vr)
        return p.VRING_STATE.pack(index, base)

    def _vring_fd(self, msg: Message, what: str) -> tuple[int, Vring, int | None]:
        (value,) = p.U64.unpack(msg.payload)
        if value & ~(p.VRING_IDX_MASK | p.VRING_NOFD):
            raise ProtocolError(f"{what}: unknown bits in 0x{value:x}")
        index = value & p.VRING_IDX_MASK
        vr = self._ring(index, what)
        if value & p.VRING_NOFD:
            if msg.fds:
                raise ProtocolError(f"{what}: queue {index} says 'no fd' but sent one")
            return index, vr, None
        if not msg.fds:
            raise ProtocolError(f"{what}: queue {index} without a file descriptor")
        fd = msg.take_fd()
        assert fd is not None
        return index, vr, _eventfd_or_refuse(fd, f"{what}: queue {index}")

    def _set_vring_kick(self, msg: Message) -> None:
        index, vr, fd = self._vring_fd(msg, "SET_VRING_KICK")
        if fd is None:
            raise ProtocolError(f"SET_VRING_KICK: queue {index}: polling (no kick eventfd) is not supported")
        self._drop_kick(index, vr)
        vr.kick_fd = fd
        if vr.live:
            self.loop.add_reader(fd, self._kick_handler(index, fd))
            self.device.kick(index)
        else:
            self._update_rings()

    def _set_vring_call(self, msg: Message) -> None:
        _, vr, fd = self._vring_fd(msg, "SET_VRING_CALL")
        with self._fd_lock:
            old, vr.call_fd = vr.call_fd, fd
            _close(old)
            if fd is not None and vr.live:
                # an interrupt may have gone to the old eventfd meanwhile: a spurious one is harmless
                _signal(fd)

    def _set_vring_err(self, msg: Message) -> None:
        _, vr, fd = self._vring_fd(msg, "SET_VRING_ERR")
        with self._fd_lock:
            old, vr.err_fd = vr.err_fd, fd
            _close(old)

    def _set_vring_enable(self, msg: Message) -> None:
        index, num = p.VRING_STATE.unpack(msg.payload)
        vr = self._ring(index, "SET_VRING_ENABLE")
        if num not in (0, 1):
            raise ProtocolError(f"SET_VRING_ENABLE: queue {index} value {num}")
        vr.enabled = bool(num)
        if vr.live and vr.enabled:
            self.device.kick(index)
        self._update_rings()

    # config space

    def _config_args(self, msg: Message, what: str) -> tuple[int, int, int]:
        offset, size, flags = p.CONFIG_HEAD.unpack_from(msg.payload)
        if len(msg.payload) != p.CONFIG_HEAD.size + size:
            raise ProtocolError(
                f"{what}: {size} bytes announced, {len(msg.payload) - p.CONFIG_HEAD.size} sent"
            )
        if offset + size > p.MAX_CONFIG_SIZE:
            raise ProtocolError(f"{what}: bytes {offset}+{size} are past the configuration space")
        return offset, size, flags

    def _get_config(self, msg: Message) -> bytes:
        offset, size, flags = self._config_args(msg, "GET_CONFIG")
        return p.CONFIG_HEAD.pack(offset, size, flags) + self.device.read_config(offset, size)

    def _set_config(self, msg: Message) -> None:
        offset, _, flags = self._config_args(msg, "SET_CONFIG")
        if flags not in (0, 1):
            raise ProtocolError(f"SET_CONFIG: unknown flags {flags}")
        self.device.write_config(offset, bytes(msg.payload[p.CONFIG_HEAD.size :]))

    # inflight tracking

    def _inflight_args(self, msg: Message) -> tuple[int, int, int, int]:
        size, offset, nq, qs = p.INFLIGHT.unpack_from(msg.payload)
        InflightRegion.check_geometry(nq, qs, len(self.device.queues))
        return size, offset, nq, qs

    def _get_inflight_fd(self, msg: Message) -> tuple[bytes, list[int]]:
        _, _, nq, qs = self._inflight_args(msg)
        region, fd = InflightRegion.create(nq, qs)
        self.inflight = region
        reply = p.INFLIGHT.pack(region.size, 0, nq, qs)
        return reply.ljust(len(msg.payload), b"\0"), [fd]

    def _set_inflight_fd(self, msg: Message) -> None:
        size, offset, nq, qs = self._inflight_args(msg)
        if any(vr.live for vr in self.vrings):
            raise ProtocolError("SET_INFLIGHT_FD while rings run")
        self.inflight = InflightRegion.open(msg.fds[0], size, offset, nq, qs, self._faults)

    # ---- rings: start and stop -----------------------------------------------------------------

    def _translate(self, index: int, vr: Vring, table: MemoryTable) -> tuple[int, int, int]:
        num = vr.num or 0
        try:
            return (
                table.user_to_guest(vr.desc_user or 0, 16 * num),
                table.user_to_guest(vr.avail_user, 6 + 2 * num),
                table.user_to_guest(vr.used_user, 6 + 8 * num),
            )
        except ProtocolError as e:
            raise ProtocolError(f"queue {index}: ring not inside the shared memory: {e}") from None

    def _update_rings(self) -> None:
        for i, vr in enumerate(self.vrings):
            if (
                not vr.live
                and vr.kick_fd is not None
                and (vr.enabled or not self.protocol_negotiated)
                and vr.num is not None
                and vr.desc_user is not None
                and self.features is not None
                and len(self.memory.table)
            ):
                self._start_ring(i, vr)

    def _start_ring(self, index: int, vr: Vring) -> None:
        desc, avail, used = self._translate(index, vr, self.memory.table)
        assert vr.num is not None and vr.kick_fd is not None
        q = self.device.queues[index]
        if self.inflight is not None:
            self.inflight.check_queue(index, vr.num)
        try:
            used_idx = self.memory.read_u16(used + 2)
        except GuestMemoryError as e:
            raise ProtocolError(f"queue {index}: {e}") from None
        tracker = self.trackers[index]
        tracker.set_region(self.inflight.queue(index) if self.inflight is not None else None)
        next_avail, resubmit = tracker.start(vr.num, used_idx, vr.base)
        q.set_size(vr.num)
        q.set_addresses(desc, avail, used)
        q.restore(next_avail, used_idx, resubmit)
        started = self.common.enable_queue(q)  # mapped at once if the device already runs
        vr.live = True
        self.loop.add_reader(vr.kick_fd, self._kick_handler(index, vr.kick_fd))
        device = self.device
        log.info(
            "vhost-user: queue %d starts: size %d, avail index %d, used index %d%s",
            index,
            vr.num,
            vr.base,
            used_idx,
            ", inflight tracked" if self.inflight is not None else "",
        )
        if started:
            device.kick(index)
        elif not device.activated and device.broken is None:
            # the first live ring activates the device (a transport's DRIVER_OK)
            assert self.features is not None
            why = device.set_driver_features(self.features)
            if why is not None:
                raise ProtocolError(why)
            device.activate(self.memory)
        if resubmit:
            log.info(
                "vhost-user: queue %d: %d request(s) in flight before the reconnect served again",
                index,
                len(resubmit),
            )

    def _kick_handler(self, index: int, fd: int) -> Callable[[], None]:
        device = self.device
        vr = self.vrings[index]

        def on_kick() -> None:
            try:
                drain_eventfd(fd)
            except (OSError, ValueError, struct.error) as e:
                # not readable as an eventfd any more: stop watching it, end the connection once
                self._drop_kick(index, vr)
                self.on_failure(f"queue {index}: cannot read the kick eventfd ({e or type(e).__name__})")
                return
            if vr.enabled or not self.protocol_negotiated:
                device.kick(index)

        return on_kick

    def _drop_kick(self, index: int, vr: Vring) -> None:
        if vr.kick_fd is not None:
            self.loop.remove_reader(vr.kick_fd)
            _close(vr.kick_fd)
            vr.kick_fd = None

    def _stop_ring(self, index: int, vr: Vring) -> int:
        """GET_VRING_BASE: stop serving the ring; return the next available index to take."""
        self._drop_kick(index, vr)
        if not vr.live:
            return vr.base
        q = self.device.queues[index]
        vr.live = False
        used, size = q.used_addr, q.size
        base = q.last_avail_idx
        if any(v.live for v in self.vrings):
            self.common.disable_queue(q)
        else:
            # the rings stay mapped until the reset: requests still being served complete into them
            q.set_ready(False)
            self.device.reset()  # waits for requests being served; they complete into the rings
        vr.base = base
        # the used ring as it is left (flags, avail_event) goes to the destination of a migration
        self.memory.log_write(used, 6 + 8 * size)
        return base

    _handlers: dict[int, Callable] = {
        Req.GET_FEATURES: _get_features,
        Req.SET_FEATURES: _set_features,
        Req.SET_OWNER: _set_owner,
        Req.RESET_OWNER: _reset_device,
        Req.RESET_DEVICE: _reset_device,
        Req.SET_MEM_TABLE: _set_mem_table,
        Req.SET_VRING_NUM: _set_vring_num,
        Req.SET_VRING_ADDR: _set_vring_addr,
        Req.SET_VRING_BASE: _set_vring_base,
        Req.GET_VRING_BASE: _get_vring_base,
        Req.SET_VRING_KICK: _set_vring_kick,
        Req.SET_VRING_CALL: _set_vring_call,
        Req.SET_VRING_ERR: _set_vring_err,
        Req.GET_PROTOCOL_FEATURES: _get_protocol_features,
        Req.SET_PROTOCOL_FEATURES: _set_protocol_features,
        Req.GET_QUEUE_NUM: _get_queue_num,
        Req.SET_VRING_ENABLE: _set_vring_enable,
        Req.GET_CONFIG: _get_config,
        Req.SET_CONFIG: _set_config,
        Req.GET_INFLIGHT_FD: _get_inflight_fd,
        Req.SET_INFLIGHT_FD: _set_inflight_fd,
        Req.GET_MAX_MEM_SLOTS: _get_max_mem_slots,
        Req.ADD_MEM_REG: _add_mem_reg,
        Req.REM_MEM_REG: _rem_mem_reg,
        Req.SET_STATUS: _set_status,
        Req.GET_STATUS: _get_status,
        Req.SET_LOG_BASE: _set_log_base,
        Req.SET_LOG_FD: _set_log_fd,
    }
