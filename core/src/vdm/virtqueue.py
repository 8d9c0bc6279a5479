"""The split virtqueue (virtio 1.2, section 2.7), device side.

A :class:`Virtqueue` holds what the transport configured (size, ring addresses, ready) and, once
activated with a :class:`~vdm.memory.GuestMemory`, pops descriptor chains from the available ring
and pushes them to the used ring.

Everything the guest wrote is checked when it is read: descriptor indexes against the queue size,
buffer addresses and lengths against guest RAM, chain length against the queue size (which also
catches loops), indirect tables (negotiated, not nested, a multiple of 16 bytes), device-writable
buffers only after device-readable ones, and the available index never more than ``size`` ahead.
A violation raises :class:`VirtqueueError`; the device base turns that into DEVICE_NEEDS_RESET.

The driver gets back only what it gave: a head is *in flight* from the moment it is taken
(:meth:`Virtqueue.pop`, :meth:`Virtqueue.chain_at`) until it is completed
(:meth:`Virtqueue.push`, :meth:`Virtqueue.push_many`) or given up (:meth:`Virtqueue.discard`),
or the queue is reset. A driver making a head available that is still in flight breaks the
rules (:class:`VirtqueueError`); a device completing a head that is not in flight (twice, or one
it never took) is a host bug: the completion is dropped, logged and counted in
:attr:`Virtqueue.duplicate_completions`, so the driver never sees a used element it does not
expect.

Work per kick is bounded (see :mod:`vdm.device`): the device base gives the queue a budget of
descriptor reads (:meth:`Virtqueue.limit_walk`); each chain taken is charged its walk, indirect
entries included (one sum per chain, nothing extra per descriptor). Once the budget is spent the
queue *reads as empty* (:meth:`Virtqueue.pop` None, :meth:`Virtqueue.has_available` False) until
the base lifts it. A chain is never split: it may have at most ``MAX_CHAIN`` descriptors in the
ring (and the queue size; more is a loop or too long: a guest error) and ``MAX_INDIRECT`` in its
indirect table, so a slice costs at most the budget plus 8,192 reads, whatever the queue size.

Memory ordering: the used element is written before the used index, and the available index is
read before the ring entries it covers. Each of these is a separate store/load from Python, in
program order; on x86 (TSO) that is the order other CPUs see. See :mod:`vdm.barrier`.

Single stores: the driver reads the ring fields the device writes (``used.idx``, ``used.flags``,
``avail_event``, the used elements) at any moment from another CPU, so every such field is
written with one store of its final value, through typed views of the rings
(``memoryview.cast``). ``struct.pack_into`` must not be used on them: it zeroes its target before
it writes the value, and a driver that reads ``used.idx`` in between sees the index step back to 0
and walks into used slots the device never filled (Linux: ``id N is not a head!``).
"""

from __future__ import annotations

import logging
import struct
import sys
import threading
from typing import Iterable, Sequence

from .barrier import mb, rmb, wmb
from .memory import GuestMemory, GuestMemoryError

__all__ = ["DescriptorChain", "Virtqueue", "VirtqueueError"]

VIRTQ_DESC_F_NEXT = 1
VIRTQ_DESC_F_WRITE = 2
VIRTQ_DESC_F_INDIRECT = 4
VIRTQ_USED_F_NO_NOTIFY = 1
VIRTQ_AVAIL_F_NO_INTERRUPT = 1

MAX_QUEUE_SIZE = 32768
#: Upper bound on the entries of one indirect table (Linux uses at most the queue size).
MAX_INDIRECT = 4096
#: Upper bound on the descriptors of one chain in the descriptor table, whatever the queue size
#: (QEMU's is 1024): a chain's walk is at most MAX_CHAIN + MAX_INDIRECT reads, one kick's slice.
MAX_CHAIN = 4096
#: Upper bound on the bytes one chain may describe (virtio lengths are 32-bit).
MAX_CHAIN_BYTES = 1 << 32
#: the walk limit of a queue that is not inside a budgeted kick (never reached)
UNLIMITED = 1 << 62

_DESC = struct.Struct("<QIHH")

log = logging.getLogger(__name__)

if sys.byteorder != "little":  # the typed ring views are native-endian; virtio 1.x rings are LE
    raise ImportError("vdm.virtqueue needs a little-endian host")


class VirtqueueError(Exception):
    """The driver broke the virtqueue rules (a guest error: the device must be reset)."""


def _need_event(event: int, new: int, old: int) -> bool:
    """vring_need_event: did the used index pass ``event`` when moving from ``old`` to ``new``?"""
    return ((new - event - 1) & 0xFFFF) < ((new - old) & 0xFFFF)


class DescriptorChain:
    """One request: the buffers of a descriptor chain, split into device-readable and -writable."""

    __slots__ = ("epoch", "head", "memory", "readable", "writable")

    def __init__(
        self,
        head: int,
        readable: list[memoryview],
        writable: list[memoryview],
        epoch: int = 0,
        memory: GuestMemory | None = None,
    ) -> None:
        self.head = head
        self.readable = readable
        self.writable = writable
        #: the queue's :attr:`Virtqueue.epoch` when the chain was popped
        self.epoch = epoch
        #: the memory its buffers were mapped from (released there even after a queue reset)
        self.memory = memory

    @property
    def readable_len(self) -> int:
        return sum(len(v) for v in self.readable)

    @property
    def writable_len(self) -> int:
        return sum(len(v) for v in self.writable)

    def read(self, offset: int = 0, length: int | None = None) -> bytes:
        """Gather ``length`` bytes of the readable buffers starting at ``offset`` (short if fewer)."""
        return b"".join(bytes(v) for v in slice_views(self.readable, offset, length))

    def write(self, data: bytes, offset: int = 0) -> int:
        """Scatter ``data`` into the writable buffers at ``offset``; return how many bytes fit."""
        done = 0
        for v in slice_views(self.writable, offset, len(data)):
            n = len(v)
            v[:] = data[done : done + n]
            done += n
        return done


def slice_views(views: Sequence[memoryview], offset: int, length: int | None) -> list[memoryview]:
    """The sub-views covering ``length`` bytes from ``offset`` of the concatenated ``views``."""
    out: list[memoryview] = []
    remaining = length if length is not None else 1 << 62
    for v in views:
        n = len(v)
        if offset >= n:
            offset -= n
            continue
        take = min(n - offset, remaining)
        if take <= 0:
            break
        out.append(v[offset : offset + take])
        remaining -= take
        offset = 0
        if remaining == 0:
            break
    return out


class Virtqueue:
    """One split virtqueue of a device."""

    def __init__(self, index: int, max_size: int) -> None:
        if not 0 < max_size <= MAX_QUEUE_SIZE or max_size & (max_size - 1):
            raise ValueError("queue size must be a power of two up to 32768")
        self.index = index
        self.max_size = max_size
        self.lock = threading.Lock()
        #: bumped by every reset: a chain popped before it is never pushed into the new rings
        self.epoch = 0
        #: descriptor reads (chain and indirect-table entries) of every walk since the queue was made
        self.descriptors_walked = 0
        #: the value of descriptors_walked at which the current kick's budget is spent (module doc)
        self._walk_limit = UNLIMITED
        self.reset()

    def reset(self) -> None:
        """Back to the state after device reset (transport-visible fields included)."""
        self.epoch += 1
        self.size = self.max_size
        self.ready = False
        self.desc_addr = 0
        self.avail_addr = 0
        self.used_addr = 0
        self.event_idx = False
        self.indirect = False
        self.last_avail_idx = 0
        self.used_idx = 0
        self.signalled_used = 0
        self.signalled_valid = False
        #: completions dropped because their head was not in flight (a device bug; see the module doc)
        self.duplicate_completions = 0
        self._pushed = False
        self.memory: GuestMemory | None = None
        self._desc: memoryview | None = None
        self._avail: memoryview | None = None
        self._used: memoryview | None = None
        self._drop_typed_views()
        #: one byte per head: 1 while the device holds it. Like the indexes, kept while the rings are
        #: unmapped and mapped again (a vhost-user ring stopped and restarted); cleared only here.
        self._inflight = bytearray(self.max_size)

    def _drop_typed_views(self) -> None:
        # u16 views: avail ring [flags, idx, ring..., used_event]; used ring [flags, idx, ..., avail_event]
        self._avail16: memoryview | None = None
        self._used16: memoryview | None = None
        #: u32 view of the used elements: element i is [2 * i] (id), [2 * i + 1] (len)
        self._used_elems: memoryview | None = None

    @property
    def active(self) -> bool:
        return self._desc is not None

    # ---- setup -------------------------------------------------------------------------------

    def activate(self, memory: GuestMemory, *, event_idx: bool, indirect: bool) -> None:
        """Map the rings (kept mapped for the queue's life) after checking the transport's values."""
        size = self.size
        if not 0 < size <= self.max_size or size & (size - 1):
            raise VirtqueueError(f"queue {self.index}: bad size {size} (max {self.max_size})")
        if self.desc_addr % 16 or self.avail_addr % 2 or self.used_addr % 4:
            raise VirtqueueError(f"queue {self.index}: misaligned ring address")
        try:
            self._desc = memory.map(self.desc_addr, 16 * size)
            self._avail = memory.map(self.avail_addr, 6 + 2 * size, writable=True)
            self._used = memory.map(self.used_addr, 6 + 8 * size, writable=True)
        except GuestMemoryError as e:
            self.deactivate()
            raise VirtqueueError(f"queue {self.index}: ring outside guest RAM ({e})") from e
        self._avail16 = self._avail.cast("H")
        self._used16 = self._used.cast("H")
        self._used_elems = self._used[4 : 4 + 8 * size].cast("I")
        self.memory = memory
        self.event_idx = event_idx
        self.indirect = indirect

    def deactivate(self) -> None:
        """Release the ring mappings (device reset or teardown)."""
        memory = self.memory
        # (not released: a thread still inside pop() may hold them; they go with their last user)
        self._drop_typed_views()
        for view in (self._desc, self._avail, self._used):
            if view is not None and memory is not None:
                memory.unmap(view)
        self._desc = self._avail = self._used = None

    # ---- the available ring --------------------------------------------------------------------

    def avail_idx(self) -> int:
        assert self._avail16 is not None
        return self._avail16[1]

    def has_available(self) -> bool:
        """Whether :meth:`pop` would return a chain now (False once the walk budget is spent)."""
        avail16 = self._avail16
        return (
            avail16 is not None
            and avail16[1] != self.last_avail_idx
            and self.descriptors_walked < self._walk_limit
        )

    # ---- the walk budget (see the module doc) ----------------------------------------------------

    def limit_walk(self, budget: int) -> None:
        """Take chains only while fewer than ``budget`` descriptors were read since this call."""
        self._walk_limit = self.descriptors_walked + budget

    def walk_spent(self) -> bool:
        return self.descriptors_walked >= self._walk_limit

    def end_walk_limit(self) -> int:
        """Lift the limit; return what was left of it (0 or less: chains may be left to take)."""
        left = self._walk_limit - self.descriptors_walked
        self._walk_limit = UNLIMITED
        return left

    def charge(self, descriptors: int) -> None:
        """Count other work against the budget (the base charges 1 per ``process_queue`` call)."""
        self._walk_limit -= descriptors

    def pop(self) -> DescriptorChain | None:
        """Take the next available chain, or None (none there, or the walk budget is spent).

        Raises :class:`VirtqueueError` on a guest error.
        """
        avail16, used16 = self._avail16, self._used16
        if avail16 is None or used16 is None or self.descriptors_walked >= self._walk_limit:
            return None
        idx = avail16[1]
        pending = (idx - self.last_avail_idx) & 0xFFFF
        if pending == 0:
            return None
        if pending > self.size:
            raise VirtqueueError(
                f"queue {self.index}: available index {idx} is {pending} ahead of {self.last_avail_idx}"
            )
        rmb()
        head = avail16[2 + self.last_avail_idx % self.size]
        self.last_avail_idx = (self.last_avail_idx + 1) & 0xFFFF
        if self.event_idx:
            # avail_event: ask for a kick when the driver adds anything past what we have taken.
            used16[2 + 4 * self.size] = self.last_avail_idx
        if head < len(self._inflight) and self._inflight[head]:
            raise VirtqueueError(f"queue {self.index}: head {head} offered again while the device holds it")
        return self._walk(head)

    def chain_at(self, head: int) -> DescriptorChain:
        """The chain starting at descriptor ``head``, walked and checked exactly as :meth:`pop` does.

        For a backend that serves again the requests a previous instance left in flight (vhost-user
        inflight tracking): the head comes from the backend's records, not from the available ring,
        and the available index is left alone. The head becomes in flight like a popped one; if
        this queue already holds it (the ring was stopped and started again while a request was
        being served), it stays in flight once: whichever of the two chains completes first
        returns it, the other completion is dropped as a duplicate.
        Raises :class:`VirtqueueError` if the queue is not active, ``head`` is not below the queue
        size, or the chain breaks a rule (loop, out of guest RAM, bad indirect table...).
        """
        if self._desc is None:
            raise VirtqueueError(f"queue {self.index}: not active")
        return self._walk(head)

    def _walk(self, head: int) -> DescriptorChain:
        size = self.size
        inflight = self._inflight
        if not 0 <= head < size or head >= len(inflight):
            raise VirtqueueError(f"queue {self.index}: head index {head} >= size {size}")
        memory = self.memory
        assert memory is not None and self._desc is not None
        table = self._desc
        table_len = size
        readable: list[memoryview] = []
        writable: list[memoryview] = []
        i = head
        steps = 0
        limit = size if size <= MAX_CHAIN else MAX_CHAIN
        total = 0
        in_indirect = False
        try:
            while True:
                addr, length, flags, nxt = _DESC.unpack_from(table, 16 * i)
                steps += 1
                if steps > limit:
                    raise VirtqueueError(f"queue {self.index}: chain longer than {limit} descriptors (loop?)")
                if flags & VIRTQ_DESC_F_INDIRECT:
                    if in_indirect:
                        raise VirtqueueError(f"queue {self.index}: indirect descriptor inside indirect table")
                    if not self.indirect:
                        raise VirtqueueError(f"queue {self.index}: indirect descriptor not negotiated")
                    if flags & VIRTQ_DESC_F_NEXT:
                        raise VirtqueueError(f"queue {self.index}: indirect descriptor with NEXT")
                    if length == 0 or length % 16 or length // 16 > MAX_INDIRECT:
                        raise VirtqueueError(f"queue {self.index}: bad indirect table length {length}")
                    table = memory.map(addr, length)
                    readable_tables = [table]
                    try:
                        table_len = length // 16
                        in_indirect = True
                        limit = table_len
                        direct = steps
                        steps = 0
                        i = 0
                        # walk the indirect table, then stop: an indirect descriptor ends the chain
                        while True:
                            addr, length, flags, nxt = _DESC.unpack_from(table, 16 * i)
                            steps += 1
                            if steps > limit:
                                raise VirtqueueError(f"queue {self.index}: indirect chain loops")
                            if flags & VIRTQ_DESC_F_INDIRECT:
                                raise VirtqueueError(
                                    f"queue {self.index}: indirect descriptor inside indirect table"
                                )
                            total = self._add(memory, addr, length, flags, readable, writable, total)
                            if not flags & VIRTQ_DESC_F_NEXT:
                                break
                            if nxt >= table_len:
                                raise VirtqueueError(f"queue {self.index}: next {nxt} >= table {table_len}")
                            i = nxt
                    finally:
                        for t in readable_tables:
                            memory.unmap(t)
                    steps += direct
                    break
                total = self._add(memory, addr, length, flags, readable, writable, total)
                if not flags & VIRTQ_DESC_F_NEXT:
                    break
                if nxt >= table_len:
                    raise VirtqueueError(f"queue {self.index}: next index {nxt} >= size {table_len}")
                i = nxt
        except (VirtqueueError, GuestMemoryError) as e:
            for v in readable + writable:
                memory.unmap(v)
            if isinstance(e, GuestMemoryError):
                raise VirtqueueError(f"queue {self.index}: {e}") from e
            raise
        self.descriptors_walked += steps
        inflight[head] = 1  # (one byte store; push clears it under the lock, never concurrently)
        return DescriptorChain(head, readable, writable, self.epoch, memory)

    def _add(
        self,
        memory: GuestMemory,
        addr: int,
        length: int,
        flags: int,
        readable: list[memoryview],
        writable: list[memoryview],
        total: int,
    ) -> int:
        total += length
        if total > MAX_CHAIN_BYTES:
            raise VirtqueueError(f"queue {self.index}: chain describes more than 4 GiB")
        if flags & VIRTQ_DESC_F_WRITE:
            writable.append(memory.map(addr, length, writable=True))
        else:
            if writable:
                raise VirtqueueError(f"queue {self.index}: device-readable buffer after a writable one")
            readable.append(memory.map(addr, length))
        return total

    # ---- the used ring -------------------------------------------------------------------------

    def push(self, chain: DescriptorChain, written: int) -> None:
        """Return ``chain`` to the driver with ``written`` bytes filled in; release its buffers.

        Safe to call from several threads (completions of a thread pool). A chain popped before a
        reset of the queue is released but not returned (the driver forgot it); one whose head is
        not in flight is dropped and counted (see the module doc). Raises ValueError if
        ``written`` does not fit the used element's 32-bit length.
        """
        self._publish(((chain, written),))

    def push_many(self, items: Iterable[tuple[DescriptorChain, int]]) -> None:
        """Return several ``(chain, written)`` pairs and publish them with one used-index update.

        Every element is written first, then ``used.idx`` moves once over all of them, so a driver
        never sees part of the batch (the buffers of one merged virtio-net receive packet must
        appear together). Each pair gets exactly the checks of :meth:`push`; the batch counts as
        one push for :meth:`should_notify`.
        """
        self._publish(tuple(items))

    def _publish(self, items: Sequence[tuple[DescriptorChain, int]]) -> None:
        for _, written in items:
            if not isinstance(written, int) or not 0 <= written <= 0xFFFFFFFF:
                raise ValueError(f"queue {self.index}: written length {written} does not fit 32 bits")
        for chain, _ in items:
            self._release(chain)
        with self.lock:
            used16, elems = self._used16, self._used_elems
            if used16 is None or elems is None:
                return  # reset (or never activated) while these were in flight: drop them
            inflight = self._inflight
            size = self.size
            idx = self.used_idx
            for chain, written in items:
                if chain.epoch != self.epoch:
                    continue  # popped before a reset: the driver forgot it
                head = chain.head
                if not 0 <= head < min(size, len(inflight)) or not inflight[head]:
                    self.duplicate_completions += 1
                    log.error("queue %d: completion of head %d dropped: the device does not hold it "
                              "(completed twice?)", self.index, head)
                    continue
                inflight[head] = 0
                slot = 2 * (idx % size)
                elems[slot] = head
                elems[slot + 1] = written
                idx = (idx + 1) & 0xFFFF
            if idx == self.used_idx:
                return
            wmb()
            used16[1] = idx
            self.used_idx = idx
            self._pushed = True

    def _release(self, chain: DescriptorChain) -> None:
        memory = chain.memory if chain.memory is not None else self.memory
        if memory is not None:
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
            if chain.epoch == self.epoch and 0 <= chain.head < len(self._inflight):
                self._inflight[chain.head] = 0

    def should_notify(self) -> bool:
        """Whether the driver wants an interrupt for what was pushed since the last one.

        Call once after a batch of :meth:`push`; it records the new "last signalled" index.
        Nothing pushed since the last call: no interrupt.
        """
        with self.lock:
            if self._avail16 is None or not self._pushed:
                return False
            self._pushed = False
            mb()
            new = self.used_idx
            if self.event_idx:
                old = self.signalled_used
                valid = self.signalled_valid
                self.signalled_used = new
                self.signalled_valid = True
                used_event = self._avail16[2 + self.size]  # type: ignore[index]
                return not valid or _need_event(used_event, new, old)
            flags = self._avail16[0]  # type: ignore[index]
            return not flags & VIRTQ_AVAIL_F_NO_INTERRUPT

    def set_notification(self, enabled: bool) -> bool:
        """Ask the driver to kick (or not) on new buffers. Returns True if buffers are already there.

        With EVENT_IDX the request is the avail_event field; without it, used.flags NO_NOTIFY.
        After enabling, the caller must process the queue again if this returns True (the driver
        may have added buffers before it saw the request).
        """
        used16 = self._used16
        if used16 is None:
            return False
        if self.event_idx:
            if enabled:
                used16[2 + 4 * self.size] = self.last_avail_idx
        else:
            used16[0] = 0 if enabled else VIRTQ_USED_F_NO_NOTIFY
        if not enabled:
            return False
        mb()
        return self.has_available()

    def __repr__(self) -> str:
        return f"Virtqueue({self.index}, size={self.size}, ready={self.ready})"
