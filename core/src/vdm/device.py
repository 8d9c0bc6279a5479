"""The virtio device base: features, status, config space and queues, independent of transport.

A device plugin subclasses :class:`VirtioDevice` and fills in, top to bottom like kvmtool's
``virtio/blk.c``:

* ``device_id``, ``name`` and ``queue_max_sizes``;
* :meth:`~VirtioDevice.device_features` and optionally :meth:`~VirtioDevice.validate_features`;
* :meth:`~VirtioDevice.config_space` (and :meth:`~VirtioDevice.write_config` for writable fields);
* :meth:`~VirtioDevice.process_queue`, called when the driver kicks a queue;
* :meth:`~VirtioDevice.on_activate` / :meth:`~VirtioDevice.on_reset` for backend work.

A transport (virtio-mmio, virtio-pci, through :mod:`vdm.transport.common`) or a vhost-user
server drives the base through :meth:`set_driver_features`, :meth:`accept_features` (FEATURES_OK),
:meth:`set_status` (or :meth:`activate`), :meth:`kick` and :meth:`reset`; it is told about
interrupts through the :class:`DeviceInterrupts` it installs. The device never learns which
transport or hypervisor carries it.

Threads (docs/architecture.md has the whole list): :meth:`kick` may be called from any thread and
runs ``process_queue`` there unless another thread is inside it for that queue (which then looks
again), so ``process_queue`` of one queue never runs twice at once. ``pop`` and the other reads of
the available ring take no lock: only ``process_queue`` calls them; a host thread with data for
the driver calls :meth:`kick` instead. Completions (``push``) may come from any thread.
``on_activate`` and ``on_reset`` run under the base's state lock, which :meth:`fail`,
:meth:`reset` and :meth:`set_status` also take: ``on_reset`` may wait for the device's own threads
only with a bound.

Fairness: a transport whose kicks arrive on an event loop hands that loop to
:meth:`VirtioDevice.serve_on` (:class:`vdm.vmm.Vmm` does for every device it attaches: ``vdm run``,
``vdm dm-only``; a vhost-user backend should do the same with its loop). From then on one call of
:meth:`kick` walks at most ``kick_budget`` descriptors of that queue (:data:`KICK_BUDGET`; see
:mod:`vdm.virtqueue` for how the budget is charged); when the budget is spent the queue reads as
empty to ``process_queue``, the kick returns, and the rest is served by a later ``kick`` that the
device's own resume eventfd brings on that loop, after every other callback that was ready. So
another device's request waits at most one slice (the budget plus one chain), never the whole of
a hostile ring. A device author sees only this: ``process_queue`` may stop early because ``pop``
returned None with chains left, and is then called again for the rest. Without :meth:`serve_on`
(a device driven directly, as by vdm.testing's driver) a kick serves the queue to the end.
"""

from __future__ import annotations

import logging
import os
import threading
from typing import Callable, Protocol, Sequence

from .eventfd import EFD_CLOEXEC, EFD_NONBLOCK, eventfd, eventfd_read, eventfd_write
from .memory import GuestMemory, GuestMemoryError
from .virtqueue import Virtqueue, VirtqueueError

__all__ = [
    "F_EVENT_IDX",
    "F_INDIRECT_DESC",
    "F_VERSION_1",
    "KICK_BUDGET",
    "DeviceInterrupts",
    "Status",
    "VirtioDevice",
]

log = logging.getLogger(__name__)

F_INDIRECT_DESC = 28
F_EVENT_IDX = 29
F_VERSION_1 = 32
F_ACCESS_PLATFORM = 33

#: descriptors one kick may walk before the rest of the queue waits for the loop's next pass.
#: A slice costs at most this plus one chain (MAX_CHAIN + MAX_INDIRECT descriptors, see virtqueue).
KICK_BUDGET = 1024


class Status:
    """Device status bits (virtio 1.2, 2.1)."""

    ACKNOWLEDGE = 1
    DRIVER = 2
    DRIVER_OK = 4
    FEATURES_OK = 8
    DEVICE_NEEDS_RESET = 64
    FAILED = 128


class DeviceInterrupts(Protocol):
    """What a transport gives a device to notify the driver."""

    def queue_interrupt(self, queue: Virtqueue) -> None:
        """The device used buffers of ``queue`` and the driver asked to be told."""

    def config_interrupt(self) -> None:
        """The configuration space (or DEVICE_NEEDS_RESET) changed."""


class KickLoop(Protocol):
    """The part of :class:`vdm.eventloop.EventLoop` :meth:`VirtioDevice.serve_on` uses."""

    def add_reader(self, fd: int, callback: Callable[[], None]) -> None: ...

    def remove_reader(self, fd: int) -> None: ...


class _NoInterrupts:
    def queue_interrupt(self, queue: Virtqueue) -> None:
        pass

    def config_interrupt(self) -> None:
        pass


def bit(n: int) -> int:
    return 1 << n


class _CoreState:
    """What :class:`VirtioDevice` keeps for itself, out of the subclass's attribute namespace.

    Invariants: ``kick_locks``, ``rekick`` and ``deferred`` have one entry per queue; ``resume_fd``
    and ``resume_loop`` are both set (by ``serve_on``) or both None, changed under ``resume_lock``.
    """

    __slots__ = ("deferred", "kick_locks", "rekick", "resume_fd", "resume_lock", "resume_loop", "state_lock")

    def __init__(self, nqueues: int) -> None:
        self.state_lock = threading.RLock()
        self.kick_locks = [threading.Lock() for _ in range(nqueues)]
        self.rekick = [False] * nqueues
        #: queues whose last kick spent its budget with work left: the resume fd brings them back
        self.deferred = [False] * nqueues
        self.resume_lock = threading.Lock()
        self.resume_fd: int | None = None
        self.resume_loop: KickLoop | None = None


class VirtioDevice:
    """Base of every virtio device."""

    #: virtio device id (1 net, 2 block, 3 console, 4 entropy, ...)
    device_id: int = 0
    #: short name used in logs
    name: str = "virtio"
    #: the maximum size of each queue; the number of entries is the number of queues
    queue_max_sizes: Sequence[int] = (256,)
    #: features the core itself implements for every device
    core_features: int = bit(F_VERSION_1) | bit(F_EVENT_IDX) | bit(F_INDIRECT_DESC)
    #: device features that only work through the device's own control queue. A transport whose
    #: frontend keeps the control queue for itself (vhost-user: QEMU serves virtio-net's) must not
    #: offer them, since the device would never see what the driver asks there.
    control_queue_features: int = 0
    #: descriptors one kick walks before it yields (only once :meth:`serve_on` gave it a loop)
    kick_budget: int = KICK_BUDGET
    #: the console a Linux guest gets from this device (``"hvc0"`` for virtio-console), or None;
    #: ``vdm run`` puts the first one on the kernel command line (``console=``), else ``ttyS0``
    guest_console: str | None = None

    def __init__(self) -> None:
        self.queues = [Virtqueue(i, n) for i, n in enumerate(self.queue_max_sizes)]
        self.interrupts: DeviceInterrupts = _NoInterrupts()
        self.memory: GuestMemory | None = None
        self.driver_features = 0
        self.status = 0
        self.config_generation = 0
        self.broken: str | None = None
        self.activated = False
        # The base's own state lives in one name-mangled holder (and its helpers are name-mangled
        # methods), so a subclass's ``self._stop``, ``self._state_lock``... cannot collide with it.
        self.__core = _CoreState(len(self.queues))

    # ---- what a device implements --------------------------------------------------------------

    def device_features(self) -> int:
        """Device-specific feature bits offered to the driver."""
        return 0

    def validate_features(self, features: int) -> str | None:
        """Return why ``features`` (what the driver accepted) is unacceptable, or None."""
        return None

    def config_space(self) -> bytes:
        """The device-specific configuration space as the driver reads it now."""
        return b""

    def write_config(self, offset: int, data: bytes) -> None:
        """The driver wrote ``data`` at ``offset`` of the configuration space (default: ignored)."""

    def on_activate(self) -> None:
        """DRIVER_OK: queues are set up and :attr:`memory` is valid. Start backend work here."""

    def process_queue(self, queue: Virtqueue) -> None:
        """The driver kicked ``queue``: pop chains, serve them, push them, :meth:`signal_used`."""
        raise NotImplementedError

    def on_reset(self) -> None:
        """The driver reset the device: stop backend work, forget in-flight requests."""

    # ---- features --------------------------------------------------------------------------------

    def features(self) -> int:
        """Every feature bit this device offers (device-specific and core)."""
        return self.device_features() | self.core_features

    def has_feature(self, n: int) -> bool:
        """Whether feature bit ``n`` was negotiated."""
        return bool(self.driver_features >> n & 1)

    def set_driver_features(self, features: int) -> str | None:
        """Record what the driver accepted; return why it is refused, or None if fine."""
        offered = self.features()
        self.driver_features = features
        if features & ~offered:
            return f"driver accepted features the device did not offer: 0x{features & ~offered:x}"
        if not features & bit(F_VERSION_1):
            return "driver did not accept VIRTIO_F_VERSION_1 (legacy drivers are not supported)"
        return self.validate_features(features)

    def accept_features(self, features: int) -> bool:
        """The driver sets FEATURES_OK with ``features``: record them; False if they are refused
        (one log line saying why; FEATURES_OK must then read back clear). The one rule for every
        transport: virtio-mmio/pci status writes here, vhost-user's SET_STATUS."""
        why = self.set_driver_features(features)
        if why is not None:
            log.warning("%s: refusing features: %s", self.name, why)
            return False
        return True

    # ---- configuration space -------------------------------------------------------------------

    def read_config(self, offset: int, size: int) -> bytes:
        """``size`` bytes of config space at ``offset``; bytes past its end read as zero."""
        cfg = self.config_space()
        chunk = cfg[offset : offset + size] if 0 <= offset < len(cfg) else b""
        return chunk + bytes(size - len(chunk))

    def signal_config(self) -> None:
        """Tell the driver the configuration changed (bumps the generation counter).

        Interrupts once the driver runs the device: DRIVER_OK written, or activated by a transport
        that keeps the status register itself (vhost-user: the frontend's)."""
        self.config_generation = (self.config_generation + 1) & 0xFFFFFFFF
        if self.status & Status.DRIVER_OK or self.activated:
            self.interrupts.config_interrupt()

    # ---- status state machine (transports that carry a status register) ------------------------

    def set_status(self, value: int) -> None:
        """The driver wrote the device status register."""
        with self.__core.state_lock:
            value &= 0xFF
            if value == 0:
                self.reset()
                return
            old = self.status
            if old & ~value & ~Status.DEVICE_NEEDS_RESET:
                self.fail(f"driver cleared status bits (0x{old:x} -> 0x{value:x}) without a reset")
                return
            if value & Status.FAILED:
                self.status = value | (old & Status.DEVICE_NEEDS_RESET)
                log.info("%s: driver gave up on the device (status FAILED)", self.name)
                self.__stop_backend()
                return
            if value & Status.FEATURES_OK and not old & Status.FEATURES_OK:
                if not self.accept_features(self.driver_features):
                    value &= ~Status.FEATURES_OK
            self.status = value | (old & Status.DEVICE_NEEDS_RESET)
            if value & Status.DRIVER_OK and not old & Status.DRIVER_OK:
                if not value & Status.FEATURES_OK:
                    self.fail("DRIVER_OK without FEATURES_OK")
                    return
                if self.memory is None:
                    self.fail("DRIVER_OK before guest memory was known")
                    return
                self.activate(self.memory)

    # ---- activation, kicks and interrupts ------------------------------------------------------

    def activate(self, memory: GuestMemory) -> None:
        """Start serving: map every ready queue with the negotiated ring features."""
        with self.__core.state_lock:
            self.memory = memory
            try:
                for q in self.queues:
                    if q.ready:
                        self.start_queue(q)
            except VirtqueueError as e:
                self.fail(str(e))
                return
            self.activated = True
            try:
                self.on_activate()
            except Exception as e:
                log.exception("%s: activation failed", self.name)
                self.fail(f"activation failed: {e}")
                return
        for q in self.queues:
            if q.active:
                self.kick(q.index)

    def start_queue(self, q: Virtqueue) -> None:
        """Map one queue's rings (raises VirtqueueError if the driver's addresses are bad)."""
        assert self.memory is not None
        q.activate(
            self.memory,
            event_idx=self.has_feature(F_EVENT_IDX),
            indirect=self.has_feature(F_INDIRECT_DESC),
        )

    def kick(self, index: int) -> None:
        """The driver notified queue ``index``. Safe from any thread; never raises.

        With a loop from :meth:`serve_on`, one call walks at most :attr:`kick_budget` descriptors
        (plus the chain that crosses it) and leaves the rest to a later call on that loop.
        """
        if self.broken is not None or not self.activated or not 0 <= index < len(self.queues):
            return
        q = self.queues[index]
        if not q.active:
            return
        core = self.__core
        lock = core.kick_locks[index]
        rekick = core.rekick
        limited = core.resume_fd is not None
        left = self.kick_budget  # one budget for the whole call, however many kicks arrive meanwhile
        process = self.process_queue
        # One thread processes a queue at a time; a kick that arrives meanwhile makes it look again.
        rekick[index] = True
        while rekick[index]:
            if not lock.acquire(False):
                return
            more = False
            try:
                if limited:
                    q.limit_walk(left)
                    try:
                        while rekick[index] and self.broken is None:
                            rekick[index] = False
                            q.charge(1)  # a call that takes nothing still costs something
                            process(q)
                            if q.walk_spent():
                                break
                    finally:
                        left = q.end_walk_limit()
                        more = left <= 0  # the queue may hold more than it showed
                else:
                    while rekick[index] and self.broken is None:
                        rekick[index] = False
                        process(q)
            except (VirtqueueError, GuestMemoryError) as e:
                self.fail(str(e))
            except Exception as e:  # a device bug must not take the host process down
                log.exception("%s: internal error on queue %d", self.name, index)
                self.fail(f"internal error: {e!r}")
            finally:
                lock.release()
            if self.broken is not None:
                return
            if more:
                self.__defer(index)
                return

    # ---- yielding to the event loop (see the module doc) ----------------------------------------

    def serve_on(self, loop: KickLoop) -> None:
        """Kicks of this device arrive on ``loop``: bound each one and resume the rest there.

        Makes the device's resume eventfd (non-blocking, close-on-exec) and watches it on ``loop``.
        Call :meth:`stop_serving` before the loop or the device goes away. Calling it again with a
        loop already set does nothing.
        """
        core = self.__core
        with core.resume_lock:
            if core.resume_fd is not None:
                return
            fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC)
            core.resume_fd, core.resume_loop = fd, loop
        loop.add_reader(fd, self.__resume)

    def stop_serving(self) -> None:
        """Undo :meth:`serve_on` (also after the loop was stopped): close the resume eventfd; from
        now on kicks run to the end."""
        core = self.__core
        with core.resume_lock:
            fd, loop = core.resume_fd, core.resume_loop
            core.resume_fd = core.resume_loop = None
            if fd is None:
                return
            if loop is not None:
                try:
                    loop.remove_reader(fd)
                except (OSError, ValueError):
                    pass  # the loop was stopped (and its selector closed) first: nothing to remove
            os.close(fd)

    def __defer(self, index: int) -> None:
        core = self.__core
        core.deferred[index] = True
        with core.resume_lock:
            fd = core.resume_fd
            if fd is None:  # stop_serving() meanwhile: nobody would come back, finish here
                deferred_here = True
            else:
                deferred_here = False
                try:
                    eventfd_write(fd, 1)
                except BlockingIOError:
                    pass  # the counter is full: a resume is due anyway
        if deferred_here:
            core.deferred[index] = False
            self.kick(index)

    def __resume(self) -> None:
        """On the loop: serve another slice of every queue whose last kick left work."""
        core = self.__core
        fd = core.resume_fd
        if fd is None:
            return
        try:
            eventfd_read(fd)
        except BlockingIOError:
            pass
        for index, deferred in enumerate(core.deferred):
            if deferred:
                core.deferred[index] = False
                self.kick(index)

    def signal_used(self, queue: Virtqueue) -> None:
        """Interrupt the driver for ``queue`` if it asked for it (EVENT_IDX / NO_INTERRUPT)."""
        if queue.should_notify():
            self.interrupts.queue_interrupt(queue)

    def fail(self, reason: str) -> None:
        """The guest broke the rules: log it, set DEVICE_NEEDS_RESET, stop serving."""
        with self.__core.state_lock:
            if self.broken is None:
                log.error("%s: device marked broken (DEVICE_NEEDS_RESET): %s", self.name, reason)
            self.broken = reason
            self.status |= Status.DEVICE_NEEDS_RESET
            self.__stop_backend()
        if self.status & Status.DRIVER_OK:
            self.interrupts.config_interrupt()

    def __stop_backend(self) -> None:
        if self.activated:
            self.activated = False
            try:
                self.on_reset()
            except Exception:
                log.exception("%s: error while stopping", self.name)

    def reset(self) -> None:
        """Back to the initial state (the driver wrote 0 to status, or the frontend went away)."""
        with self.__core.state_lock:
            self.__stop_backend()
            for q in self.queues:
                with q.lock:
                    q.deactivate()
                    q.reset()
            self.driver_features = 0
            self.status = 0
            self.broken = None
