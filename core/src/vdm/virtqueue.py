"""The split virtqueue (virtio 1.2, section 2.7), device side.

A :class:`Virtqueue` holds what the transport configured (size, ring addresses, ready) and, once
activated with a :class:`~vdm.memory.GuestMemory`, pops descriptor chains from the available ring
and pushes them to the used ring.

Everything the guest wrote is checked when it is read: descriptor indexes against the queue size,
buffer addresses and lengths against guest RAM, chain length against the queue size (which also
catches loops), indirect tables (negotiated, not nested, a multiple of 16 bytes), device-writable
buffers only after device-readable ones, and the available index never more than ``size`` ahead.
A violation raises :class:`VirtqueueError`; the device base turns that into DEVICE_NEEDS_RESET.

Memory ordering: the used element is written before the used index, and the available index is
read before the ring entries it covers. Each of these is a separate store/load from Python, in
program order; on x86 (TSO) that is the order other CPUs see. See :mod:`vdm.barrier`.
"""

from __future__ import annotations

import struct
import threading
from typing import Sequence

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
#: Upper bound on the bytes one chain may describe (virtio lengths are 32-bit).
MAX_CHAIN_BYTES = 1 << 32

_DESC = struct.Struct("<QIHH")
_U16 = struct.Struct("<H")
_USED_ELEM = struct.Struct("<II")


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
        self._pushed = False
        self.memory: GuestMemory | None = None
        self._desc: memoryview | None = None
        self._avail: memoryview | None = None
        self._used: memoryview | None = None

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
        self.memory = memory
        self.event_idx = event_idx
        self.indirect = indirect

    def deactivate(self) -> None:
        """Release the ring mappings (device reset or teardown)."""
        memory = self.memory
        for view in (self._desc, self._avail, self._used):
            if view is not None and memory is not None:
                memory.unmap(view)
        self._desc = self._avail = self._used = None

    # ---- the available ring --------------------------------------------------------------------

    def avail_idx(self) -> int:
        assert self._avail is not None
        return _U16.unpack_from(self._avail, 2)[0]

    def has_available(self) -> bool:
        return self._avail is not None and self.avail_idx() != self.last_avail_idx

    def pop(self) -> DescriptorChain | None:
        """Take the next available chain, or None. Raises :class:`VirtqueueError` on a guest error."""
        avail = self._avail
        if avail is None:
            return None
        idx = _U16.unpack_from(avail, 2)[0]
        pending = (idx - self.last_avail_idx) & 0xFFFF
        if pending == 0:
            return None
        if pending > self.size:
            raise VirtqueueError(
                f"queue {self.index}: available index {idx} is {pending} ahead of {self.last_avail_idx}"
            )
        rmb()
        head = _U16.unpack_from(avail, 4 + 2 * (self.last_avail_idx % self.size))[0]
        self.last_avail_idx = (self.last_avail_idx + 1) & 0xFFFF
        if self.event_idx:
            # avail_event: ask for a kick when the driver adds anything past what we have taken.
            _U16.pack_into(self._used, 4 + 8 * self.size, self.last_avail_idx)  # type: ignore[arg-type]
        return self._walk(head)

    def _walk(self, head: int) -> DescriptorChain:
        size = self.size
        if head >= size:
            raise VirtqueueError(f"queue {self.index}: head index {head} >= size {size}")
        memory = self.memory
        assert memory is not None and self._desc is not None
        table = self._desc
        table_len = size
        readable: list[memoryview] = []
        writable: list[memoryview] = []
        i = head
        steps = 0
        limit = size
        total = 0
        in_indirect = False
        try:
            while True:
                addr, length, flags, nxt = _DESC.unpack_from(table, 16 * i)
                steps += 1
                if steps > limit:
                    raise VirtqueueError(f"queue {self.index}: chain longer than {limit} (loop?)")
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

        Safe to call from several threads (completions of a thread pool).
        """
        memory = chain.memory if chain.memory is not None else self.memory
        if memory is not None:
            for v in chain.readable:
                memory.unmap(v)
            for v in chain.writable:
                memory.unmap(v)
        with self.lock:
            used = self._used
            if used is None or chain.epoch != self.epoch:  # reset while in flight: drop it
                return
            _USED_ELEM.pack_into(used, 4 + 8 * (self.used_idx % self.size), chain.head, written)
            wmb()
            self.used_idx = (self.used_idx + 1) & 0xFFFF
            _U16.pack_into(used, 2, self.used_idx)
            self._pushed = True

    def discard(self, chain: DescriptorChain) -> None:
        """Release a chain's buffers without completing it (device reset or failure)."""
        memory = chain.memory if chain.memory is not None else self.memory
        if memory is not None:
            for v in chain.readable + chain.writable:
                memory.unmap(v)

    def should_notify(self) -> bool:
        """Whether the driver wants an interrupt for what was pushed since the last one.

        Call once after a batch of :meth:`push`; it records the new "last signalled" index.
        Nothing pushed since the last call: no interrupt.
        """
        with self.lock:
            if self._avail is None or not self._pushed:
                return False
            self._pushed = False
            mb()
            new = self.used_idx
            if self.event_idx:
                old = self.signalled_used
                valid = self.signalled_valid
                self.signalled_used = new
                self.signalled_valid = True
                used_event = _U16.unpack_from(self._avail, 4 + 2 * self.size)[0]
                return not valid or _need_event(used_event, new, old)
            flags = _U16.unpack_from(self._avail, 0)[0]
            return not flags & VIRTQ_AVAIL_F_NO_INTERRUPT

    def set_notification(self, enabled: bool) -> bool:
        """Ask the driver to kick (or not) on new buffers. Returns True if buffers are already there.

        With EVENT_IDX the request is the avail_event field; without it, used.flags NO_NOTIFY.
        After enabling, the caller must process the queue again if this returns True (the driver
        may have added buffers before it saw the request).
        """
        used = self._used
        if used is None:
            return False
        if self.event_idx:
            if enabled:
                _U16.pack_into(used, 4 + 8 * self.size, self.last_avail_idx)
        else:
            _U16.pack_into(used, 0, 0 if enabled else VIRTQ_USED_F_NO_NOTIFY)
        if not enabled:
            return False
        mb()
        return self.has_available()

    def __repr__(self) -> str:
        return f"Virtqueue({self.index}, size={self.size}, ready={self.ready})"
