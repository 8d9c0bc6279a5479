"""One vdm device served to one vhost-user frontend at a time: the protocol's state machine.

The frontend owns the transport (virtio-pci in QEMU); it tells this backend what a transport
would: the negotiated features, where the rings are, their sizes and start indexes, and it hands
over eventfds -- *kick* (the driver notified a queue: the notify path) and *call* (interrupt the
driver). Guest RAM arrives as shared file descriptors (:mod:`.memory`).

In vdm's terms this module is one more way of serving devices: it configures the device's
:class:`~vdm.virtqueue.Virtqueue` objects (through their configuration methods, with an
:class:`~.inflight.InflightTracker` each), activates the device through
:meth:`~vdm.device.VirtioDevice.activate`, turns kick eventfds (read on the core
:class:`~vdm.eventloop.EventLoop`) into :meth:`~vdm.device.VirtioDevice.kick` and the device's
interrupts into writes to call eventfds. The device code is the same as under KVM or Xen.

The ring messages and when a ring starts and stops are :mod:`.rings` (a mixin of the handler).

The backend channel (SET_BACKEND_REQ_FD), on which configuration changes go to the frontend, is
:mod:`.backend_channel` (another mixin).
"""

from __future__ import annotations

import logging
import socket
import threading
from typing import Callable

from vdm.device import Status, VirtioDevice
from vdm.eventloop import EventLoop, drain_eventfd
from vdm.transport.common import CommonConfig
from vdm.virtqueue import Virtqueue

from . import protocol as p
from .backend_channel import BackendChannel
from .dirtylog import DirtyLog, atomic_or_available
from .faultguard import FaultWatch
from .inflight import InflightRegion, InflightTracker
from .memory import MemoryTable, RegionSpec, SharedGuestMemory
from .protocol import Message, ProtocolError, ProtocolFeature, Req
from .rings import RingMessages, Vring, close_fd, eventfd_or_refuse, signal_eventfd
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
    | 1 << ProtocolFeature.BACKEND_REQ
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


class VhostUserHandler(RingMessages, BackendChannel):
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
                device.name,
                kept,
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
        #: the backend channel (SET_BACKEND_REQ_FD); sends are serialized by its lock
        self.backend_channel: socket.socket | None = None
        self._backend_lock = threading.Lock()
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
        self.memory.set_tracking(False)  # (until LOG_SHMFD is acked: no log can come before)
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
                close_fd(vr.call_fd)
                close_fd(vr.err_fd)
                vr.call_fd = vr.err_fd = None
            close_fd(self.log_fd)
            self.log_fd = None
        self._set_backend_channel(None)
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
                        signal_eventfd(fd)
                    except OSError as e:
                        log.warning("vhost-user: cannot signal call eventfd of queue %d: %s", queue.index, e)

    def config_interrupt(self) -> None:
        # A configuration change goes to the frontend on the backend channel (module doc); a device
        # that broke (DEVICE_NEEDS_RESET) is reported on the rings' error eventfds.
        if self.device.broken is None:
            self._config_changed()
            return
        with self._fd_lock:
            for i, vr in enumerate(self.vrings):
                if vr.err_fd is not None and vr.live:
                    try:
                        signal_eventfd(vr.err_fd)
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
                    close_fd(fd)
        elif msg.need_reply and self.protocol_features & (1 << ProtocolFeature.REPLY_ACK):
            self._send(msg.request, p.U64.pack(0 if ok else 1))

    def _send(self, request: int, payload: bytes, fds: list[int] = ()) -> None:  # type: ignore[assignment]
        if self.sock is None:
            return
        log.debug("vhost-user: reply %s %s (%d fds)", Req.name(request), payload.hex(), len(fds))
        try:
            p.send_message(self.sock, request, payload, fds)
        except BlockingIOError:
            raise ProtocolError(
                f"cannot send the reply to {Req.name(request)}: the frontend does not read its replies"
            ) from None
        except OSError as e:
            raise ProtocolError(f"cannot send the reply to {Req.name(request)}: {e}") from None

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
            log.info(
                "vhost-user: %s: the frontend acked %s; accepted (the frontend's transport serves it)",
                self.device.name,
                acked.names() or "no transport features",
            )
        self.transport_features = acked.transport
        if acked.log_all != self.memory.logging:
            log.info(
                "vhost-user: %s: dirty logging %s",
                self.device.name,
                "on (migration)" if acked.log_all else "off",
            )
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
        self.memory.set_tracking(bool(value >> ProtocolFeature.LOG_SHMFD & 1))

    def _set_log_base(self, msg: Message) -> bytes:
        if not self.protocol_features & (1 << ProtocolFeature.LOG_SHMFD):
            raise ProtocolError("SET_LOG_BASE without LOG_SHMFD negotiated")
        size, offset = p.LOG_BASE.unpack(msg.payload)
        self.memory.set_dirty_log(DirtyLog(msg.fds[0], size, offset, self._faults))
        log.info("vhost-user: %s: dirty log of %d bytes", self.device.name, size)
        return p.U64.pack(0)

    def _set_log_fd(self, msg: Message) -> None:
        fd = msg.take_fd()
        fd = eventfd_or_refuse(fd, "SET_LOG_FD") if fd is not None else None
        with self._fd_lock:
            close_fd(self.log_fd)
            self.log_fd = fd

    def _set_owner(self, msg: Message) -> None:
        self.owner = True

    def _reset_device(self, msg: Message) -> None:
        self._stop_all()
        with self._fd_lock:
            for vr in self.vrings:
                close_fd(vr.call_fd)
                close_fd(vr.err_fd)
        memory = self.memory.table
        owner, proto = self.owner, self.protocol_features
        self._reset_state()
        self.memory.replace(memory)
        self.owner, self.protocol_features = owner, proto
        self.memory.set_tracking(bool(proto >> ProtocolFeature.LOG_SHMFD & 1))

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
            if self.features is None or not self.device.accept_features(self.features):
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

    _handlers: dict[int, Callable] = {
        Req.GET_FEATURES: _get_features,
        Req.SET_FEATURES: _set_features,
        Req.SET_OWNER: _set_owner,
        Req.RESET_OWNER: _reset_device,
        Req.RESET_DEVICE: _reset_device,
        Req.SET_MEM_TABLE: _set_mem_table,
        Req.SET_VRING_NUM: RingMessages._set_vring_num,
        Req.SET_VRING_ADDR: RingMessages._set_vring_addr,
        Req.SET_VRING_BASE: RingMessages._set_vring_base,
        Req.GET_VRING_BASE: RingMessages._get_vring_base,
        Req.SET_VRING_KICK: RingMessages._set_vring_kick,
        Req.SET_VRING_CALL: RingMessages._set_vring_call,
        Req.SET_VRING_ERR: RingMessages._set_vring_err,
        Req.GET_PROTOCOL_FEATURES: _get_protocol_features,
        Req.SET_PROTOCOL_FEATURES: _set_protocol_features,
        Req.GET_QUEUE_NUM: _get_queue_num,
        Req.SET_VRING_ENABLE: RingMessages._set_vring_enable,
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
        Req.SET_BACKEND_REQ_FD: BackendChannel._set_backend_req_fd,
    }
