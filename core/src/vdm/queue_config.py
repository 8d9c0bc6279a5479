"""What a transport configures in a virtqueue, and how it reads it back (plugin API 2).

:class:`QueueConfig` is the configuration half of :class:`vdm.virtqueue.Virtqueue`: the ring size,
the three ring addresses, ready, the indexes a resumed ring starts from, and the
:class:`QueueTracker` told about heads. Every transport (virtio-mmio, virtio-pci through
:mod:`vdm.transport.common`, vhost-user's handler) sets them through these methods only; the
values read back through read-only properties.

Invariants: the configuration changes only while the rings are not mapped (``active`` False); a
setter called on an active queue raises RuntimeError (a host bug: the transports ignore the
guest's writes then, see :mod:`vdm.transport.common`). Values are stored as given and checked when
the queue is activated (:meth:`vdm.virtqueue.Virtqueue.activate`). Assigning the properties (plugin
API 1: ``q.size = n``) still works through the setter and warns (DeprecationWarning naming it).
"""

from __future__ import annotations

import warnings
from operator import attrgetter
from typing import Protocol, Sequence

__all__ = ["MAX_QUEUE_SIZE", "QueueConfig", "QueueTracker"]

#: the largest split ring (virtio 1.2, 2.7: Queue Size is at most 32768)
MAX_QUEUE_SIZE = 32768


class QueueTracker(Protocol):
    """Told what happens to a queue's heads (see the module doc); set with :meth:`Virtqueue.set_tracker`.

    The calls come from the threads that pop and push; ``completing`` and ``completed`` are made
    under the queue's lock, in used-ring order, and must not call back into the queue.
    """

    def taken(self, head: int) -> None:
        """``head`` was taken from the available ring (not for :meth:`Virtqueue.chain_at`)."""

    def completing(self, heads: list[int]) -> None:
        """``heads`` are in the used ring, and the used index is about to move over them."""

    def completed(self, heads: list[int], used_idx: int) -> None:
        """The used index moved to ``used_idx`` over ``heads``."""

    def reset(self) -> None:
        """The queue was reset: every head it held is forgotten."""


def _deprecated_setter(name: str, replacement: str, apply: str) -> property:
    """A read-only property ``name`` (the attribute ``_name``) whose assignment still works as in
    plugin API 1 but warns, naming the method to call instead."""

    def set_value(self: QueueConfig, value: object) -> None:
        warnings.warn(
            f"assigning Virtqueue.{name} is deprecated (vdm plugin API 2): call {replacement}",
            DeprecationWarning,
            stacklevel=2,
        )
        getattr(self, apply)(value)

    return property(attrgetter("_" + name), set_value)


class QueueConfig:
    """The configuration of one virtqueue (module doc). Subclassed by :class:`~vdm.virtqueue.Virtqueue`."""

    index: int
    _desc: memoryview | None
    _tracker: QueueTracker | None

    def reset(self) -> None:
        """Back to the state after a device reset (the subclass resets its rings too)."""
        self._reset_config()

    def _reset_config(self) -> None:
        self._size = self._max_size
        self._ready = False
        self._desc_addr = 0
        self._avail_addr = 0
        self._used_addr = 0
        self._event_idx = False
        self._indirect = False
        self._last_avail_idx = 0
        self._used_idx = 0
        #: heads to serve again before the available ring's (:meth:`restore`)
        self._resubmit: list[int] = []

    # ---- what the transport reads back ---------------------------------------------------------

    @property
    def max_size(self) -> int:
        """The largest ring the queue accepts (QueueNumMax / queue_size as first read)."""
        return self._max_size

    size = _deprecated_setter("size", "Virtqueue.set_size(n)", "set_size")
    ready = _deprecated_setter("ready", "Virtqueue.set_ready(flag)", "set_ready")
    desc_addr = _deprecated_setter("desc_addr", "Virtqueue.set_desc_addr(addr)", "set_desc_addr")
    avail_addr = _deprecated_setter("avail_addr", "Virtqueue.set_avail_addr(addr)", "set_avail_addr")
    used_addr = _deprecated_setter("used_addr", "Virtqueue.set_used_addr(addr)", "set_used_addr")
    #: the next available-ring index the device takes ("last_avail_idx" in QEMU and Linux)
    last_avail_idx = _deprecated_setter(
        "last_avail_idx", "Virtqueue.restore(next_avail, next_used)", "_restore_avail"
    )
    #: the used index as the device last published it
    used_idx = _deprecated_setter("used_idx", "Virtqueue.restore(next_avail, next_used)", "_restore_used")
    #: VIRTIO_F_EVENT_IDX / INDIRECT_DESC as negotiated (set by :meth:`activate`)
    event_idx = property(attrgetter("_event_idx"))
    indirect = property(attrgetter("_indirect"))

    @property
    def tracker(self) -> QueueTracker | None:
        """The :class:`QueueTracker` given with :meth:`set_tracker`, or None."""
        return self._tracker

    @property
    def active(self) -> bool:
        """The rings are mapped: the queue serves the driver (and its configuration is fixed)."""
        return self._desc is not None

    # ---- configuration (module doc) ------------------------------------------------------------

    def _configurable(self, what: str) -> None:
        if self._desc is not None:
            raise RuntimeError(f"queue {self.index}: {what} set while the queue is active")

    def set_max_size(self, max_size: int) -> None:
        """Change the largest ring accepted (vhost-user: the frontend picks any split-ring size).

        Resets the queue. Raises ValueError unless a power of two up to 32768.
        """
        if not 0 < max_size <= MAX_QUEUE_SIZE or max_size & (max_size - 1):
            raise ValueError("queue size must be a power of two up to 32768")
        self._configurable("max size")
        self._max_size = max_size
        self.reset()

    def set_size(self, size: int) -> None:
        """The driver's ring size (checked at activation: a power of two up to ``max_size``)."""
        self._configurable("size")
        self._size = size

    def set_desc_addr(self, addr: int) -> None:
        """Guest-physical address of the descriptor table."""
        self._configurable("descriptor address")
        self._desc_addr = addr

    def set_avail_addr(self, addr: int) -> None:
        """Guest-physical address of the available ("driver") ring."""
        self._configurable("available ring address")
        self._avail_addr = addr

    def set_used_addr(self, addr: int) -> None:
        """Guest-physical address of the used ("device") ring."""
        self._configurable("used ring address")
        self._used_addr = addr

    def set_addresses(self, desc: int, avail: int, used: int) -> None:
        """All three ring addresses at once."""
        self._configurable("ring addresses")
        self._desc_addr, self._avail_addr, self._used_addr = desc, avail, used

    def set_ready(self, ready: bool) -> None:
        """Record QueueReady / queue_enable. Does not map or unmap the rings: the device base
        (:meth:`~vdm.device.VirtioDevice.start_queue`) and :meth:`deactivate` do."""
        self._ready = bool(ready)

    def restore(self, next_avail: int, next_used: int, resubmit: Sequence[int] = ()) -> None:
        """Resume a ring another backend served: the next available index to take, the used
        index as the driver sees it, and the heads that were taken but never completed
        (served again first, oldest first, walked as :meth:`chain_at` does)."""
        self._configurable("ring indexes")
        self._last_avail_idx = next_avail & 0xFFFF
        self._used_idx = next_used & 0xFFFF
        self._resubmit = list(resubmit)

    def _restore_avail(self, next_avail: int) -> None:
        self._configurable("available index")
        self._last_avail_idx = next_avail & 0xFFFF

    def _restore_used(self, next_used: int) -> None:
        self._configurable("used index")
        self._used_idx = next_used & 0xFFFF

    def set_tracker(self, tracker: QueueTracker | None) -> None:
        """Report taken and completed heads to ``tracker`` (None: to nobody). Kept across resets."""
        self._configurable("tracker")
        self._tracker = tracker
