"""The compiled batch steps of :class:`vdm.virtqueue.Virtqueue` (a mixin: the state is the queue's).

:meth:`CompiledSteps.serve_compiled` (and :meth:`~CompiledSteps.serve_compiled_end`) take, serve
and complete plain chains with a device's C step (vdm.fastpath's ``serve_batch``);
:meth:`CompiledSteps.fill_compiled` spreads a byte string over as many plain device-writable chains
as it needs and completes them (``fill``). Invariants: both run only where
:meth:`CompiledSteps._compiled_usable` says so, with the queue's lock held around each C call (a
reset takes it too); both check every chain as ``pop`` does before they touch it, count what they
take as pop and push would (the queue's ``_counts``, ``descriptors_walked``, the walk budget), and
leave anything else untaken for pop, whose checks and errors stay the one reference. A device's
step may run a request's I/O on its own threads (ring.c's deferred requests): the C call joins
them before it publishes, so nothing of a call's I/O outlives it (or the lock).
"""

from __future__ import annotations

import threading
from array import array
from typing import TYPE_CHECKING

from . import fastpath as _fp

if TYPE_CHECKING:
    from .fastpath import FastRing
    from .queue_config import QueueTracker

__all__ = ["CompiledSteps"]

#: serve_batch's io words, flags and results (vdm.fastpath), written as literals in
#: _serve_compiled (its hot path): IO_LAST 0, IO_USED 1, IO_BUDGET 2, IO_FLAGS 3, IO_SIGNALLED 4,
#: IO_SERVED 5, IO_STEPS 6, IO_RES 7, IO_KINDS 8..11; F_END 1, F_PUSHED 2, F_VALID 4; R_FULL 1,
#: R_ENDED 2, R_DECIDED 4, R_NOTIFY 8, R_MORE 16
assert (_fp.IO_LAST, _fp.IO_USED, _fp.IO_BUDGET, _fp.IO_FLAGS, _fp.IO_SIGNALLED, _fp.IO_SERVED,
        _fp.IO_STEPS, _fp.IO_RES, _fp.IO_KINDS) == tuple(range(9))  # fmt: skip
assert (_fp.F_END, _fp.F_PUSHED, _fp.F_VALID) == (1, 2, 4)
assert (_fp.R_FULL, _fp.R_ENDED, _fp.R_DECIDED, _fp.R_NOTIFY, _fp.R_MORE) == (1, 2, 4, 8, 16)
#: the counters' words in the queue's _counts, and the state fields fill reports in
_C_REQUESTS, _C_WBYTES, _C_TOOK, _C_LATENCY = _fp.C_REQUESTS, _fp.C_WBYTES, _fp.C_TOOK, _fp.C_LATENCY
_ST_STEPS, _ST_VALUE = _fp.ST_STEPS, _fp.ST_VALUE


class CompiledSteps:
    """The compiled batch steps of :class:`vdm.virtqueue.Virtqueue` (module doc)."""

    # the queue's state these methods use (set by Virtqueue, QueueConfig and UsedRing)
    index: int
    lock: threading.Lock
    descriptors_walked: int
    signalled_used: int
    signalled_valid: bool
    _counts: array
    _event_idx: bool
    _fast: FastRing | None
    _last_avail_idx: int
    _pushed: bool
    _resubmit: list[int]
    _tracker: QueueTracker | None
    _used16: memoryview | None
    _used_idx: int
    _walk_limit: int

    def serve_compiled(self, fn: object, ctx: object) -> list[int] | None:
        """Take, serve and complete chains in C with a device's compiled step (vdm.fastpath's
        ``serve_batch``; ``fn``/``ctx`` from :func:`vdm.fastpath.serve_function` / ``serve_context``).

        Only plain chains in one region of guest RAM that the step says it served; the first one
        that is anything else is left untaken for :meth:`pop` (and so for the device's Python
        path). Served chains count as popped and pushed would (requests, bytes, latency, walk
        budget) and are published; the caller's :meth:`complete_batch` decides the interrupt.
        Returns the served chains per class the step reported, or None when this queue cannot
        (Python path, a tracker to tell, heads to serve again, guest RAM not one region). A tracker
        whose ``idle`` attribute is True (vhost-user's without an inflight region or a dirty log)
        has nothing to record, so the chains are served without it.
        """
        got = self._serve_compiled(fn, ctx, False)
        return None if got is None else got[0]

    def serve_compiled_end(
        self, fn: object, ctx: object
    ) -> tuple[list[int], tuple[bool, bool] | None] | None:
        """:meth:`serve_compiled`, and when it leaves nothing for :meth:`pop` (the ring read empty,
        or the walk budget spent) also ``complete_batch([])``, in the same C call (issue 18: one
        call per kick serves, publishes, re-arms and decides the interrupt, by the rule of
        :mod:`vdm.used_ring`).

        Returns None when this queue cannot (as :meth:`serve_compiled`: the caller pops and serves
        everything as usual), else ``(kinds, end)``: ``kinds`` the served chains per class; ``end``
        None when a chain is left for :meth:`pop` (pop it, serve it, end the batch with
        :meth:`complete_batch` as usual), else what ``complete_batch([])`` answers, ``(notify,
        more)``: the batch is ended. Call it only with nothing of the batch left to push.
        """
        return self._serve_compiled(fn, ctx, True)

    def _compiled_usable(self) -> bool:
        """Whether the compiled batch steps may take chains here: the compiled path is active for
        this queue, no heads are waiting to be served again, and the tracker, if any, is idle
        (vhost-user's without an inflight region or a dirty log: nothing to record)."""
        tracker = self._tracker
        return (
            self._fast is not None
            and not self._resubmit
            and (tracker is None or getattr(tracker, "idle", False))
        )

    def _serve_compiled(
        self, fn: object, ctx: object, end: bool
    ) -> tuple[list[int], tuple[bool, bool] | None] | None:
        if not self._compiled_usable():
            return None
        kinds: list[int] | None = None
        lock = self.lock
        while (left := self._walk_limit - self.descriptors_walked) > 0:
            with lock:  # (a reset takes it too: the rings stay as they are meanwhile)
                fast = self._fast
                if fast is None or self._used16 is None:
                    break
                io = fast.io  # (the io words and flags as literals: see the top of the module)
                io[0] = self._last_avail_idx
                io[1] = self._used_idx
                io[2] = left
                if end:
                    io[3] = 1 | (2 if self._pushed else 0) | (4 if self.signalled_valid else 0)
                    io[4] = self.signalled_used
                else:
                    io[3] = 0
                if not fast.serve_batch(fn, ctx):  # (guest RAM changed: what was served counts)
                    if kinds is None:
                        return None
                    break
                if io[5]:  # served: taken and pushed
                    self._last_avail_idx = io[0]
                    self._used_idx = io[1]
                    self._pushed = True
                    self.descriptors_walked += io[6]
                res = io[7]
                if res & 4:  # decided (as _decide records it)
                    self._pushed = False
                    if self._event_idx:
                        self.signalled_used = self._used_idx
                        self.signalled_valid = True
            got = io[8:12].tolist()
            kinds = got if kinds is None else [a + b for a, b in zip(kinds, got)]
            if res & 2:  # ended: (notify, more)
                return kinds, (res & 8 != 0, res & 16 != 0)
            if not res & 1:  # (not full: a chain is left for pop)
                break
        return (kinds if kinds is not None else [0, 0, 0, 0]), None

    def fill_compiled(
        self, data: bytearray, length: int, *, max_chains: int, min_len: int = 1, count_at: int = -1
    ) -> int | None:
        """Scatter ``data[:length]`` over the next available chains and complete them, in C
        (vdm.fastpath's ``fill``): one call for what ``pop`` per chain, a copy into each chain's
        writable buffers and :meth:`push_many` do (a received frame into the driver's buffers).

        All or nothing, never split: the chains are taken, in ring order, until their writable
        bytes hold ``length`` bytes (at most ``max_chains``), every one checked first as pop checks
        it, then filled in order (each gets what fits, the last one the rest) and published with
        one used-index store; the counters, walk budget and avail_event move as pop and push would.
        When ``count_at`` >= 0 (and two bytes fit there), the number of chains is stored first at
        ``data[count_at:count_at + 2]`` (le16). Only plain chains: device-writable buffers only, no
        indirect table, each chain at least ``min_len`` writable bytes, in guest RAM as the compiled
        path slices it. Returns the chains used; 0 when it took nothing (too few chains available,
        the budget spent, or one chain not plain: the caller's Python path -- pop -- takes them and
        serves or rejects them); None when this queue cannot (the Python path, a tracker to tell,
        heads to serve again, guest RAM not writable regions). The caller publishes what it
        pushed before (used ring order), then decides the interrupt as after push_many.
        """
        if not self._compiled_usable():
            return None
        if not 0 < length <= len(data):
            raise ValueError(f"queue {self.index}: fill of {length} bytes from a {len(data)}-byte buffer")
        with self.lock:  # (a reset takes it too: the rings stay as they are meanwhile)
            fast = self._fast
            if fast is None or self._used16 is None:
                return None
            left = self._walk_limit - self.descriptors_walked
            if left <= 0:
                return 0
            last, used_idx = self._last_avail_idx, self._used_idx
            n = fast.fill(data, length, last, used_idx, left, max_chains, min_len, count_at)
            if n:
                st = fast.st
                took = st[_ST_VALUE]
                self._last_avail_idx = (last + n) & 0xFFFF
                self._used_idx = (used_idx + n) & 0xFFFF
                self._pushed = True
                self.descriptors_walked += st[_ST_STEPS]
                counts = self._counts
                counts[_C_REQUESTS] += n
                counts[_C_WBYTES] += length
                counts[_C_TOOK] += took * n
                counts[_C_LATENCY + took.bit_length()] += n
        return n
