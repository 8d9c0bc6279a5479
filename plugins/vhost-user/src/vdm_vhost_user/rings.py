"""vhost-user's rings: the SET_VRING_* / GET_VRING_BASE messages, and starting and stopping a ring.

:class:`RingMessages` is the ring half of :class:`~.handler.VhostUserHandler` (a mixin that works
on the handler's state; the handler's message table points at its methods). It keeps what the
frontend said about each ring in a :class:`Vring`, apart from the device's
:class:`~vdm.virtqueue.Virtqueue`, which it configures only through the queue's configuration
methods when the ring starts.

A ring is *live* once it has a size, addresses inside the shared memory, a kick eventfd and is
enabled; the first live ring activates the device, a later one is enabled through the transport
rule every transport shares (:meth:`vdm.transport.common.CommonConfig.enable_queue`).
GET_VRING_BASE stops a ring; when no ring is live any more the device is reset (which waits for
requests still being served), so the index handed back covers every request taken.
"""

from __future__ import annotations

import logging
import os
import struct
import threading
from dataclasses import dataclass
from typing import Callable

from vdm.device import VirtioDevice
from vdm.eventloop import EventLoop, drain_eventfd
from vdm.memory import GuestMemoryError
from vdm.ring_layout import (
    AVAIL_ALIGN,
    DESC_ALIGN,
    USED_ALIGN,
    avail_ring_size,
    desc_table_size,
    used_ring_size,
)
from vdm.transport.common import CommonConfig

from . import protocol as p
from .inflight import InflightRegion, InflightTracker
from .memory import MemoryTable, SharedGuestMemory
from .protocol import Message, ProtocolError

__all__ = ["RingMessages", "Vring", "close_fd", "eventfd_or_refuse", "signal_eventfd"]

# (the handler's logger: one name for the protocol state machine's lines)
log = logging.getLogger("vdm_vhost_user.handler")


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


def close_fd(fd: int | None) -> None:
    if fd is not None:
        try:
            os.close(fd)
        except OSError:
            pass


def eventfd_or_refuse(fd: int, what: str) -> int:
    """``fd`` if it is an eventfd, made non-blocking; otherwise close it and raise ProtocolError.

    A pipe or socket as a call fd blocks vdm once nobody reads it, and a kick fd that is not an
    eventfd does not read as one. Non-blocking: a write to a saturated counter fails at once.
    """
    try:
        kind = os.readlink(f"/proc/self/fd/{fd}")
    except OSError as e:
        close_fd(fd)
        raise ProtocolError(f"{what}: cannot check the file descriptor: {e}") from None
    if kind != "anon_inode:[eventfd]":
        close_fd(fd)
        raise ProtocolError(f"{what}: the file descriptor is not an eventfd ({kind})")
    os.set_blocking(fd, False)
    return fd


def signal_eventfd(fd: int) -> None:
    """Add 1 to a (non-blocking) eventfd. A counter at its maximum is signalled already: the
    reader wakes anyway, so a write that would block is simply dropped."""
    try:
        os.eventfd_write(fd, 1)
    except BlockingIOError:
        pass


class RingMessages:
    """The ring messages and ring start/stop of a vhost-user handler (module doc)."""

    device: VirtioDevice
    loop: EventLoop
    memory: SharedGuestMemory
    vrings: list[Vring]
    trackers: list[InflightTracker]
    common: CommonConfig
    inflight: InflightRegion | None
    features: int | None
    protocol_negotiated: bool
    on_failure: Callable[[str], None]
    _fd_lock: threading.Lock

    # ---- ring messages ---------------------------------------------------------------------------

    def _ring(self, index: int, what: str) -> Vring:
        if not 0 <= index < len(self.vrings):
            raise ProtocolError(f"{what}: queue index {index}, the device has {len(self.vrings)} queues")
        return self.vrings[index]

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
        if desc % DESC_ALIGN or avail % AVAIL_ALIGN or used % USED_ALIGN:
            raise ProtocolError(f"SET_VRING_ADDR: queue {index}: misaligned ring address")
        # Checked now against the ring size known so far, and again when the ring starts.
        num = vr.num or 1
        table = self.memory.table
        for what, addr, length in (
            ("descriptor table", desc, desc_table_size(num)),
            ("available ring", avail, avail_ring_size(num)),
            ("used ring", used, used_ring_size(num)),
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
        return index, vr, eventfd_or_refuse(fd, f"{what}: queue {index}")

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
            close_fd(old)
            if fd is not None and vr.live:
                # an interrupt may have gone to the old eventfd meanwhile: a spurious one is harmless
                signal_eventfd(fd)

    def _set_vring_err(self, msg: Message) -> None:
        _, vr, fd = self._vring_fd(msg, "SET_VRING_ERR")
        with self._fd_lock:
            old, vr.err_fd = vr.err_fd, fd
            close_fd(old)

    def _set_vring_enable(self, msg: Message) -> None:
        index, num = p.VRING_STATE.unpack(msg.payload)
        vr = self._ring(index, "SET_VRING_ENABLE")
        if num not in (0, 1):
            raise ProtocolError(f"SET_VRING_ENABLE: queue {index} value {num}")
        vr.enabled = bool(num)
        if vr.live and vr.enabled:
            self.device.kick(index)
        self._update_rings()

    # ---- rings: start and stop -----------------------------------------------------------------

    def _translate(self, index: int, vr: Vring, table: MemoryTable) -> tuple[int, int, int]:
        num = vr.num or 0
        try:
            return (
                table.user_to_guest(vr.desc_user or 0, desc_table_size(num)),
                table.user_to_guest(vr.avail_user, avail_ring_size(num)),
                table.user_to_guest(vr.used_user, used_ring_size(num)),
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
            close_fd(vr.kick_fd)
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
        self.memory.log_write(used, used_ring_size(size))
        return base
