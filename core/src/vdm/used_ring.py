"""The device side of a split virtqueue's used ring: publishing completions, notifying, re-arming.

:class:`UsedRing` is the half of :class:`vdm.virtqueue.Virtqueue` that writes to the driver:
:meth:`~UsedRing.push` / :meth:`~UsedRing.push_many` publish completed chains,
:meth:`~UsedRing.should_notify` decides whether the driver wants an interrupt for them (EVENT_IDX
``used_event``, or the available ring's NO_INTERRUPT flag), :meth:`~UsedRing.set_notification`
asks the driver to kick again (or not), and :meth:`~UsedRing.complete_batch` does all three for
the end of a batch under one lock and one fence (issue 18: the three calls took the queue lock
twice and the fence lock twice per kick).

Invariants (shared with :mod:`vdm.virtqueue`, whose module doc states the rules in full):

- Only heads the device holds are published; each is published once (then no longer held). A
  completion of a head not held is dropped, logged and counted in ``duplicate_completions``; one
  of a chain popped before a reset (another ``epoch``) is dropped silently.
- Every used element of a batch is written before ``used.idx`` moves, and ``used.idx`` moves once
  per batch with one store of its final value (a driver never sees part of a batch, nor the index
  step back); the tracker (vhost-user in-flight region) hears of the batch just before and just
  after that store.
- ``used.idx`` (and the re-armed ``avail_event`` / ``used.flags``) are stored before the device
  reads ``used_event`` / the available ring's flags and index to decide: a full fence (``mb``)
  sits between those stores and loads, so a driver that moved ``used_event`` or added buffers
  concurrently is either seen or sees the device's stores (no lost interrupt, no lost kick).
- ``signalled_used`` / ``signalled_valid`` / ``_pushed`` change only under ``lock``.
"""

from __future__ import annotations

import logging
import threading
from array import array
from time import perf_counter_ns as _now
from typing import TYPE_CHECKING, Iterable, Sequence

from .barrier import mb, wmb
from .chain import DescriptorChain
from .fastpath import C_TOOK as _C_TOOK
from .fastpath import C_WBYTES as _C_WBYTES
from .ring_layout import VIRTQ_AVAIL_F_NO_INTERRUPT, VIRTQ_USED_F_NO_NOTIFY

if TYPE_CHECKING:
    from .memory import GuestMemory
    from .queue_config import QueueTracker

__all__ = ["UsedRing"]

log = logging.getLogger("vdm.virtqueue")


def _need_event(event: int, new: int, old: int) -> bool:
    """vring_need_event: did the used index pass ``event`` when moving from ``old`` to ``new``?"""
    return ((new - event - 1) & 0xFFFF) < ((new - old) & 0xFFFF)


class UsedRing:
    """The used-ring methods of :class:`vdm.virtqueue.Virtqueue` (a mixin: the state is the queue's)."""

    # the queue's state these methods use (set by Virtqueue and QueueConfig)
    index: int
    lock: threading.Lock
    epoch: int
    memory: GuestMemory | None
    latency: memoryview
    _counts: array
    duplicate_completions: int
    signalled_used: int
    signalled_valid: bool
    _pushed: bool
    _size: int
    _used_idx: int
    _last_avail_idx: int
    _event_idx: bool
    _held: bytearray
    _taken_at: list[int]
    _tracker: QueueTracker | None
    _avail16: memoryview | None
    _used16: memoryview | None
    _used_elems: memoryview | None
    _avail_event16: int
    _used_event16: int

    def has_available(self) -> bool:  # (Virtqueue's)
        raise NotImplementedError

    def push(self, chain: DescriptorChain, written: int) -> None:
        """Return ``chain`` to the driver with ``written`` bytes filled in; release its buffers.

        Safe to call from several threads (completions of a thread pool). A chain popped before a
        reset of the queue is released but not returned (the driver forgot it); one whose head is
        not held is dropped and counted (see the module doc). Raises ValueError if ``written``
        does not fit the used element's 32-bit length.
        """
        items = ((chain, written),)
        self._check_release(items)
        with self.lock:
            self._write_used(items)

    def push_many(self, items: Iterable[tuple[DescriptorChain, int]]) -> None:
        """Return several ``(chain, written)`` pairs and publish them with one used-index update.

        Every element is written first, then ``used.idx`` moves once over all of them, so a driver
        never sees part of the batch (the buffers of one merged virtio-net receive packet must
        appear together). Each pair gets exactly the checks of :meth:`push`; the batch counts as
        one push for :meth:`should_notify`.
        """
        items = tuple(items)
        self._check_release(items)
        with self.lock:
            self._write_used(items)

    def complete_batch(self, items: Sequence[tuple[DescriptorChain, int]]) -> tuple[bool, bool]:
        """End a batch: :meth:`push_many` ``items`` (may be empty), then :meth:`should_notify`,
        then :meth:`set_notification` ``(True)``, under one lock and one fence.

        Returns ``(notify, more)``: whether the driver wants an interrupt now (for these items and
        anything pushed since the last decision), and whether buffers are available to take (the
        caller processes the queue again then). Same checks, stores and answers as the three calls
        in that order; ValueError (nothing published) if a length does not fit 32 bits.
        """
        if items:
            self._check_release(items)
        with self.lock:
            used16, avail16 = self._used16, self._avail16
            if used16 is None or avail16 is None:
                return False, False
            if items:
                self._write_used(items)
            self._arm(used16, True)  # a kick for anything past what was taken
            mb()  # the stores above before the loads below (module doc)
            notify = self._decide(avail16) if self._pushed else False
        return notify, self.has_available()

    def _arm(self, used16: memoryview, enabled: bool) -> None:
        """Store the kick request: avail_event with EVENT_IDX (only when enabling), else used.flags."""
        if self._event_idx:
            if enabled:
                used16[self._avail_event16] = self._last_avail_idx
        else:
            used16[0] = 0 if enabled else VIRTQ_USED_F_NO_NOTIFY

    def _decide(self, avail16: memoryview) -> bool:
        """Whether the driver wants an interrupt for what was pushed; records the new "last
        signalled" index. Called under ``lock``, after the fence, with something pushed."""
        self._pushed = False
        new = self._used_idx
        if self._event_idx:
            old, valid = self.signalled_used, self.signalled_valid
            self.signalled_used = new
            self.signalled_valid = True
            return not valid or _need_event(avail16[self._used_event16], new, old)
        return not avail16[0] & VIRTQ_AVAIL_F_NO_INTERRUPT

    def _check_release(self, items: Sequence[tuple[DescriptorChain, int]]) -> None:
        """Check every length fits 32 bits (ValueError, nothing released), then release the buffers."""
        for _, written in items:
            if not isinstance(written, int) or not 0 <= written <= 0xFFFFFFFF:
                raise ValueError(f"queue {self.index}: written length {written} does not fit 32 bits")
        for chain, _ in items:
            self._release(chain)

    def _write_used(self, items: Sequence[tuple[DescriptorChain, int]]) -> None:
        """Publish ``items`` (checked, released) with one used-index store. Called under ``lock``."""
        used16, elems = self._used16, self._used_elems
        if used16 is None or elems is None:
            return  # reset (or never activated) while these were in flight: drop them
        held, size, epoch = self._held, self._size, self.epoch
        limit, mask = min(size, len(held)), size - 1  # (size is a power of two)
        idx = start = self._used_idx
        tracker = self._tracker
        taken_at, latency, now = self._taken_at, self.latency, _now()
        heads: list[int] = []
        took_sum = written_sum = 0
        for chain, written in items:
            if chain.epoch != epoch:
                continue  # popped before a reset: the driver forgot it
            head = chain.head
            if not 0 <= head < limit or not held[head]:
                self.duplicate_completions += 1
                log.error(
                    "queue %d: completion of head %d dropped: the device does not hold it (completed twice?)",
                    self.index,
                    head,
                )
                continue
            held[head] = 0
            took = now - taken_at[head]
            latency[took.bit_length()] += 1
            took_sum += took
            written_sum += written
            slot = (idx & mask) << 1
            elems[slot] = head
            elems[slot + 1] = written
            idx = (idx + 1) & 0xFFFF
            heads.append(head)
        counts = self._counts
        counts[_C_TOOK] += took_sum
        counts[_C_WBYTES] += written_sum
        if idx == start:
            return
        if tracker is not None:
            tracker.completing(heads)
        wmb()
        used16[1] = idx
        self._used_idx = idx
        self._pushed = True
        if tracker is not None:
            tracker.completed(heads, idx)

    def _release(self, chain: DescriptorChain) -> None:
        memory = chain.memory if chain.memory is not None else self.memory
        if memory is not None and getattr(memory, "unmap_needed", True):
            for v in chain.readable:
                memory.unmap(v)
            for v in chain.writable:
                memory.unmap(v)

    def discard(self, chain: DescriptorChain) -> None:
        """Release a chain's buffers without completing it (device reset or failure).

        The device no longer holds the head (a later push of the chain is dropped as a
        duplicate), and the driver does not get it back either, until it resets the queue.
        """
        self._release(chain)
        with self.lock:
            if chain.epoch == self.epoch and 0 <= chain.head < len(self._held):
                self._held[chain.head] = 0

    def should_notify(self) -> bool:
        """Whether the driver wants an interrupt for what was pushed since the last one.

        Call once after a batch of :meth:`push`; it records the new "last signalled" index.
        Nothing pushed since the last call: no interrupt.
        """
        with self.lock:
            avail16 = self._avail16
            if avail16 is None or not self._pushed:
                return False
            mb()
            return self._decide(avail16)

    def set_notification(self, enabled: bool) -> bool:
        """Ask the driver to kick (or not) on new buffers. Returns True if buffers are already there.

        With EVENT_IDX the request is the avail_event field; without it, used.flags NO_NOTIFY.
        After enabling, the caller must process the queue again if this returns True (the driver
        may have added buffers before it saw the request).
        """
        used16 = self._used16
        if used16 is None:
            return False
        self._arm(used16, enabled)
        if not enabled:
            return False
        mb()
        return self.has_available()
