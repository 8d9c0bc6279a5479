"""The split virtqueue (virtio 1.2, section 2.7), device side.

A :class:`Virtqueue` holds what the transport configured and, once activated with a
:class:`~vdm.memory.GuestMemory`, pops descriptor chains (:class:`~vdm.chain.DescriptorChain`)
from the available ring and pushes them to the used ring.

Configuration (plugin API 2): every transport -- virtio-mmio, virtio-pci, a vhost-user frontend --
sets a queue through the same methods: :meth:`Virtqueue.set_size`, :meth:`Virtqueue.set_addresses`
(or one ring at a time: :meth:`~Virtqueue.set_desc_addr`, :meth:`~Virtqueue.set_avail_addr`,
:meth:`~Virtqueue.set_used_addr`), :meth:`Virtqueue.set_ready` and, to resume a ring another
backend ran (vhost-user SET_VRING_BASE, inflight recovery), :meth:`Virtqueue.restore`. What they
set reads back through read-only properties (``size``, ``desc_addr``, ``ready``,
``last_avail_idx``, ``used_idx``...). The configuration changes only while the rings are not mapped
(:attr:`Virtqueue.active` False): a setter called on an active queue is a host bug
(``RuntimeError``); the transports' rules (:mod:`vdm.transport.common`) ignore the guest's writes
then. Values are checked when the queue is activated (size a power of two up to ``max_size``, ring
alignment, rings inside guest RAM), not when they are set.

Tracking: a :class:`QueueTracker` given with :meth:`Virtqueue.set_tracker` (vhost-user's shared
in-flight region) is told of each head taken from the available ring, of each batch of completions
just before and just after the used index moves, and of resets. Without one nothing is called.

Everything the guest wrote is checked when it is read: descriptor indexes against the queue size,
buffer addresses and lengths against guest RAM, chain length against the queue size (which also
catches loops), indirect tables (negotiated, not nested, a multiple of 16 bytes), device-writable
buffers only after device-readable ones, and the available index never more than ``size`` ahead.
A violation raises :class:`VirtqueueError`; the device base turns that into DEVICE_NEEDS_RESET.
The walk of one chain and its rules are :mod:`vdm.chain_walk`'s; the used ring's side (push,
push_many, complete_batch, should_notify, set_notification, discard) is :mod:`vdm.used_ring`'s.

Compiled batches (:mod:`vdm.fastpath`, when built): :meth:`Virtqueue.serve_compiled` takes, serves
and completes plain chains with a device's C step; :meth:`Virtqueue.fill_compiled` spreads a byte
string over as many plain device-writable chains as it needs and completes them. Both check every
chain as :meth:`Virtqueue.pop` does before they touch it, count what they take as pop and push
would, and leave anything else untaken for pop (whose checks and errors stay the one reference).

The driver gets back only what it gave: a head is *held* by the device from the moment it is taken
(:meth:`Virtqueue.pop`, :meth:`Virtqueue.chain_at`) until it is completed
(:meth:`Virtqueue.push`, :meth:`Virtqueue.push_many`) or given up (:meth:`Virtqueue.discard`),
or the queue is reset. A driver making a head available that the device still holds breaks the
rules (:class:`VirtqueueError`); a device completing a head it does not hold (twice, or one
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

Counters (``vdm ctl stats``), plain integers kept for the queue's life (not cleared by resets):
:attr:`~Virtqueue.requests` chains taken, :attr:`~Virtqueue.bytes_read` their device-readable
bytes, :attr:`~Virtqueue.bytes_written` the lengths completed, :attr:`~Virtqueue.errors` guest
errors raised plus what the device reports with :meth:`~Virtqueue.count_error`, and
:attr:`~Virtqueue.latency` completions by take-to-complete time (bucket ``i``: times of ``i``
bits in ns, below ``2**i`` ns; :attr:`~Virtqueue.latency_sum_ns` their sum). Updated by the taker
(pop) and under ``lock`` (push), one clock read per chain taken and per batch completed. All but
``errors`` live in one unsigned 64-bit array (``_counts``: read-only properties, ``latency`` a live
view of it) that the compiled serve step (:meth:`Virtqueue.serve_compiled`) adds to directly.

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

import sys
import threading
from array import array
from time import perf_counter_ns as _now

from . import fastpath as _fp
from .barrier import STRONGLY_ORDERED, rmb
from .chain import DescriptorChain
from .chain_walk import MAX_CHAIN, MAX_CHAIN_BYTES, MAX_INDIRECT, VirtqueueError, walk_chain
from .compiled_steps import CompiledSteps
from .fastpath import FastRing
from .memory import GuestMemory, GuestMemoryError
from .queue_config import MAX_QUEUE_SIZE, QueueConfig, QueueTracker
from .ring_layout import (
    AVAIL_FLAGS,
    AVAIL_IDX,
    AVAIL_RING,
    USED_FLAGS,
    USED_IDX,
    USED_RING,
    VIRTQ_AVAIL_F_NO_INTERRUPT,
    VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
    VIRTQ_USED_F_NO_NOTIFY,
    avail_event_offset,
    avail_ring_size,
    desc_table_size,
    used_event_offset,
    used_ring_size,
)
from .sg import slice_views
from .used_ring import UsedRing

__all__ = [  # (flags, DescriptorChain and slice_views stay importable from here, as in plugin API 1)
    "MAX_CHAIN",
    "MAX_CHAIN_BYTES",
    "MAX_INDIRECT",
    "MAX_QUEUE_SIZE",
    "VIRTQ_AVAIL_F_NO_INTERRUPT",
    "VIRTQ_DESC_F_INDIRECT",
    "VIRTQ_DESC_F_NEXT",
    "VIRTQ_DESC_F_WRITE",
    "VIRTQ_USED_F_NO_NOTIFY",
    "DescriptorChain",
    "QueueTracker",
    "Virtqueue",
    "VirtqueueError",
    "slice_views",
]

#: the walk limit of a queue that is not inside a budgeted kick (never reached)
UNLIMITED = 1 << 62

#: the available ring's entries in its u16 view (the flags and idx fields are [0] and [1] there,
#: written as literals on the hot paths; checked against vdm.ring_layout below)
_AVAIL_RING16 = AVAIL_RING // 2
assert AVAIL_FLAGS // 2 == USED_FLAGS // 2 == 0 and AVAIL_IDX // 2 == USED_IDX // 2 == 1

#: the compiled path's codes and state fields pop uses (vdm.fastpath)
_EMPTY, _E_AHEAD, _E_HELD, _ST_HEAD, _ST_LAST = _fp.EMPTY, _fp.E_AHEAD, _fp.E_HELD, _fp.ST_HEAD, _fp.ST_LAST
#: the counters' words in Virtqueue._counts (the compiled serve step adds to them too)
_C_REQUESTS, _C_RBYTES, _C_WBYTES = _fp.C_REQUESTS, _fp.C_RBYTES, _fp.C_WBYTES
_C_TOOK, _C_LATENCY = _fp.C_TOOK, _fp.C_LATENCY
#: rmb where it is not a no-op (weakly ordered hosts); None spares pop the call on x86
_RMB = None if STRONGLY_ORDERED else rmb

if sys.byteorder != "little":  # the typed ring views are native-endian; virtio 1.x rings are LE
    raise ImportError("vdm.virtqueue needs a little-endian host")


class Virtqueue(QueueConfig, UsedRing, CompiledSteps):
    """One split virtqueue of a device.

    Invariants: ``size``, the ring addresses and the restored indexes change only through the
    setters, and only while the queue is not :attr:`active`; ``_held`` has one byte per head
    below ``max_size`` (1 while the device holds the head, module doc); ``epoch`` only grows.
    """

    def __init__(self, index: int, max_size: int, *, tracker: QueueTracker | None = None) -> None:
        self.index = index
        self.lock = threading.Lock()
        #: bumped by every reset: a chain popped before it is never pushed into the new rings
        self.epoch = 0
        #: descriptor reads (chain and indirect-table entries) of every walk since the queue was made
        self.descriptors_walked = 0
        #: the value of descriptors_walked at which the current kick's budget is spent (module doc)
        self._walk_limit = UNLIMITED
        #: counters (module doc): errors here, the others in one array the compiled serve step
        #: adds to as well (requests, bytes_read, bytes_written, latency_sum_ns: properties)
        self.errors = 0
        self._counts = array("Q", bytes(8 * _fp.C_WORDS))
        #: completions per latency bucket (65 of them), a live view of the counters
        self.latency = memoryview(self._counts)[_C_LATENCY:]
        self._desc: memoryview | None = None
        self._tracker: QueueTracker | None = None
        self.set_max_size(max_size)
        self._tracker = tracker

    @property
    def requests(self) -> int:
        """Chains taken (module doc)."""
        return self._counts[_C_REQUESTS]

    @property
    def bytes_read(self) -> int:
        """Device-readable bytes of the chains taken."""
        return self._counts[_C_RBYTES]

    @property
    def bytes_written(self) -> int:
        """The lengths completed."""
        return self._counts[_C_WBYTES]

    @property
    def latency_sum_ns(self) -> int:
        """The take-to-complete times of every completion, summed (ns)."""
        return self._counts[_C_TOOK]

    def reset(self) -> None:
        """Back to the state after device reset (transport-visible fields included)."""
        self.epoch += 1
        self._reset_config()
        self.signalled_used = 0
        self.signalled_valid = False
        #: completions dropped because their head was not held (a device bug; see the module doc)
        self.duplicate_completions = 0
        self._pushed = False
        self.memory: GuestMemory | None = None
        self._desc = None
        self._avail: memoryview | None = None
        self._used: memoryview | None = None
        self._drop_typed_views()
        #: one byte per head: 1 while the device holds it. Like the indexes, kept while the rings are
        #: unmapped and mapped again (a vhost-user ring stopped and restarted); cleared only here.
        self._held = bytearray(self._max_size)
        self._taken_at = [0] * self._max_size
        if self._tracker is not None:
            self._tracker.reset()

    def _drop_typed_views(self) -> None:
        # u16 views: avail ring [flags, idx, ring..., used_event]; used ring [flags, idx, ..., avail_event]
        self._avail16: memoryview | None = None
        self._used16: memoryview | None = None
        #: u32 view of the used elements: element i is [2 * i] (id), [2 * i + 1] (len)
        self._used_elems: memoryview | None = None
        #: u16 index of avail_event in the used ring, of used_event in the available ring
        self._avail_event16 = self._used_event16 = 0
        #: the compiled path's view of the rings (vdm.fastpath), while they are mapped and it is on
        self._fast: FastRing | None = None

    # ---- setup -------------------------------------------------------------------------------

    def activate(self, memory: GuestMemory, *, event_idx: bool, indirect: bool) -> None:
        """Map the rings (kept mapped for the queue's life) after checking the transport's values."""
        size = self._size
        if not 0 < size <= self._max_size or size & (size - 1):
            raise VirtqueueError(f"queue {self.index}: bad size {size} (max {self._max_size})")
        if self._desc_addr % 16 or self._avail_addr % 2 or self._used_addr % 4:
            raise VirtqueueError(f"queue {self.index}: misaligned ring address")
        try:
            self._desc = memory.map(self._desc_addr, desc_table_size(size))
            self._avail = memory.map(self._avail_addr, avail_ring_size(size), writable=True)
            self._used = memory.map(self._used_addr, used_ring_size(size), writable=True)
        except GuestMemoryError as e:
            self.deactivate()
            raise VirtqueueError(f"queue {self.index}: ring outside guest RAM ({e})") from e
        self._avail16 = self._avail.cast("H")
        self._used16 = self._used.cast("H")
        self._used_elems = self._used[USED_RING : avail_event_offset(size)].cast("I")
        self._avail_event16 = avail_event_offset(size) // 2
        self._used_event16 = used_event_offset(size) // 2
        if _fp.ACTIVE:
            self._fast = FastRing(self._desc, self._avail, self._used, self._held, size, self._avail_event16,
                                  memory, event_idx=event_idx, indirect=indirect,
                                  used_event16=self._used_event16, counts=self._counts)  # fmt: skip
        self.memory = memory
        self._event_idx = event_idx
        self._indirect = indirect

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
            and (avail16[1] != self._last_avail_idx or bool(self._resubmit))
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

        Heads given to :meth:`restore` to serve again come first. Raises :class:`VirtqueueError`
        on a guest error.
        """
        avail16, used16 = self._avail16, self._used16
        if avail16 is None or used16 is None or self.descriptors_walked >= self._walk_limit:
            return None
        if self._resubmit:
            return self._walk(self._resubmit.pop(0))
        last = self._last_avail_idx
        fast = self._fast
        if fast is not None:  # the same steps in C (vdm.fastpath), the same checks and errors
            code = fast.pop(fast.ring, last, fast.stc)
            if code == _EMPTY:
                return None
            st = fast.st
            if code == _E_AHEAD:
                idx, pending = st[_fp.ST_VALUE], st[_fp.ST_PENDING]
                raise self._guest_error(f"available index {idx} is {pending} ahead of {last}")
            self._last_avail_idx, head = st[_ST_LAST], st[_ST_HEAD]
        else:
            code = None
            idx = avail16[1]
            pending = (idx - last) & 0xFFFF
            if pending == 0:
                return None
            size = self._size
            if pending > size:
                raise self._guest_error(f"available index {idx} is {pending} ahead of {last}")
            if _RMB is not None:
                _RMB()
            head = avail16[_AVAIL_RING16 + (last & (size - 1))]  # (size is a power of two)
            self._last_avail_idx = last = (last + 1) & 0xFFFF
            if self._event_idx:
                # avail_event: ask for a kick when the driver adds anything past what we have taken.
                used16[self._avail_event16] = last
            held = self._held
            if head < len(held) and held[head]:
                code = _E_HELD
        if code == _E_HELD:
            raise self._guest_error(f"head {head} offered again while the device holds it")
        chain = self._walk(head, code)  # (checks head < size)
        if self._tracker is not None:
            self._tracker.taken(head)
        return chain

    def _guest_error(self, text: str) -> VirtqueueError:
        """Count a guest error; return the exception to raise."""
        self.errors += 1
        return VirtqueueError(f"queue {self.index}: {text}")

    def chain_at(self, head: int) -> DescriptorChain:
        """The chain starting at descriptor ``head``, walked and checked exactly as :meth:`pop` does.

        For a backend that serves again the requests a previous instance left in flight (vhost-user
        inflight tracking): the head comes from the backend's records, not from the available ring,
        and the available index is left alone. The head becomes held like a popped one; if this
        queue already holds it (the ring was stopped and started again while a request was being
        served), it stays held once: whichever of the two chains completes first returns it, the
        other completion is dropped as a duplicate.
        Raises :class:`VirtqueueError` if the queue is not active, ``head`` is not below the queue
        size, or the chain breaks a rule (loop, out of guest RAM, bad indirect table...).
        """
        if self._desc is None:
            raise VirtqueueError(f"queue {self.index}: not active")
        return self._walk(head)

    def _walk(self, head: int, code: int | None = None) -> DescriptorChain:
        """Walk one chain (:func:`~vdm.chain_walk.walk_chain`); the device holds its head after.

        With the compiled path, ``code`` is its answer for the ring part when pop already walked it.
        """
        size = self._size
        held = self._held
        if not 0 <= head < size or head >= len(held):
            raise self._guest_error(f"head index {head} >= size {size}")
        memory = self.memory
        assert memory is not None and self._desc is not None
        fast = self._fast
        try:
            if fast is None:
                readable, writable, steps, rbytes = walk_chain(
                    self._desc, size, head, memory, self._indirect, self.index
                )
            else:
                if code is None:
                    code = fast.walk(fast.ring, head, fast.stc)
                readable, writable, steps, rbytes = fast.take(code, memory, self.index)
        except VirtqueueError:
            self.errors += 1
            raise
        self.descriptors_walked += steps
        counts = self._counts
        counts[_C_REQUESTS] += 1
        counts[_C_RBYTES] += rbytes
        held[head] = 1  # (one byte store; push clears it under the lock, never concurrently)
        self._taken_at[head] = _now()
        return DescriptorChain(head, readable, writable, self.epoch, memory)

    # ---- the used ring: push, push_many, complete_batch, should_notify... (vdm.used_ring) ------

    def count_error(self) -> None:
        """The device completed (or gave up) a request with an error status: count it."""
        self.errors += 1

    @property
    def in_flight(self) -> int:
        """Heads the device holds now (taken, not yet completed or discarded)."""
        return sum(self._held)

    def __repr__(self) -> str:
        return f"Virtqueue({self.index}, size={self._size}, ready={self._ready})"
