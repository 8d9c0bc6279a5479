"""vdm-blk's optional compiled serve step for raw and qcow2 images (issue 18): serve.c, built at install.

The split (device-neutral core, device logic here): :meth:`vdm.virtqueue.Virtqueue.serve_compiled`
runs core's ``vdm_serve_batch`` (vdm/fastpath/ring.c), which takes chains with the compiled ring
walk's checks, calls a device's C serve function on each and publishes the served ones with one
used-index store; this package is vdm-blk's serve function: a T_IN or write-back T_OUT request
laid out as Linux and QEMU lay it out, on a raw image's buffered file, read with
``preadv2(RWF_NOWAIT)`` or written with ``pwritev2`` straight into / from guest memory. Whatever it
does not serve -- another type or shape, a read that would block, qcow2, O_DIRECT, a read-only
disk, write-through, an error -- is left to the Python path (vdm_blk.device), which stays complete.

Large requests (:data:`DEFER_MIN` bytes and more, reads and write-back writes) are checked the same
way, then copied by a small pool of C threads inside the module while the queue's thread takes the
next chains; core's ``vdm_serve_batch`` waits for them (the join) before it publishes anything, so
the used ring is written by one thread, under the queue's lock, by the one rule. A pooled request
that fails (short, would block, an error) is left, with the chains after it, to the Python path.

Selection at run time: the step is used when this module's ``_serve*.so`` imports and the core's
compiled path is active (``VDM_FASTPATH=0`` turns both off). :data:`STATUS` says which.

qcow2 images (:class:`Qcow2Step`): the same requests, when every cluster they touch is one the image
found allocated and unshared (and not metadata) and remembered in the step's map, contiguous on
the host. The image clears the map (waiting for the steps in flight) before anything that may
change such a cluster's entry -- the exclusive side of its I/O lock, a hand-over, close.

Invariant: a :class:`ServeStep` belongs to one open raw image (a :class:`Qcow2Step`, its subclass,
to one qcow2 image); :meth:`ServeStep.close` (called by the image before its file is closed) makes
the C step serve nothing from then on.
"""

from __future__ import annotations

from typing import Any

import vdm.fastpath as _core

__all__ = ["BUILT", "DEFER_MIN", "STATUS", "Qcow2Step", "ServeStep"]


_step = _core.device_step(__name__, "_serve", "vdm_blk.fastserve.build")
_ffi, _lib = _step.ffi, _step.lib
#: the compiled step imports (the tests compare it with the Python path even when it is not used)
BUILT = _step.built
#: "compiled", or "python (<reason>)" (the core's path off, or this module not built)
STATUS = _step.status
#: True when raw images opened from now on serve through the compiled step
ACTIVE = STATUS == "compiled"


class ServeStep:
    """The compiled step bound to one raw image's file: hand ``fn`` and ``ctx`` to
    :meth:`vdm.virtqueue.Virtqueue.serve_compiled`; set :attr:`capacity` / :attr:`writes` when
    the disk's size or write-back state change."""

    __slots__ = ("_blk", "_can_write", "_data", "_limits", "ctx", "fn")

    def __init__(
        self, fd: int, capacity: int, *, reads: bool, read_flags: int, writes: bool, write_flags: int,
        write_max: int,
    ) -> None:  # fmt: skip
        self._data = _ffi.new(
            "struct vdm_blk *",
            {"fd": fd, "reads": int(reads), "read_flags": read_flags, "writes": int(writes),
             "write_flags": write_flags, "capacity": capacity, "write_max": write_max,
             "defer_min": DEFER_MIN},
        )  # fmt: skip
        self._bind(self._data, writes, capacity, "vdm_blk_serve")

    def _bind(self, blk: Any, writes: bool, capacity: int, fn: str) -> None:
        """``blk``: the image's ``struct vdm_blk`` inside ``self._data``; ``fn``: serve.c's step."""
        self._blk = blk
        self._can_write = writes
        self._limits = (capacity, writes)
        self.fn, self.ctx = _step.bind(fn, self._data)

    def set_limits(self, capacity: int, writes: bool) -> None:
        """The disk's size in sectors, and whether write-back writes may be served here (called
        for every batch: only a change reaches the C record)."""
        if self._limits == (capacity, writes):
            return
        self._limits = (capacity, writes)
        blk = self._blk
        blk.capacity = capacity
        blk.writes = writes and self._can_write

    @property
    def deferred(self) -> int:
        """Requests (reads and writes) the step's thread pool served (serve.c's ``deferred``)."""
        return int(self._blk.deferred)

    def close(self) -> None:
        """Serve nothing from now on (the file is about to be closed)."""
        self._blk.fd = -1


#: reads and write-back writes of at least this many bytes are copied by the step's thread pool
#: while the queue's thread takes the next chains (serve.c's deferred requests); 0: none pooled
DEFER_MIN = 256 << 10

#: qcow2 map slots at most (8 bytes each): a disk with more clusters shares slots (tagged)
Q2_MAX_SLOTS = 1 << 18


class Qcow2Step(ServeStep):
    """The compiled step bound to one qcow2 image's file and its map of remembered clusters
    (serve.c's ``struct vdm_blk_q2``): ``fn``/``ctx`` and :meth:`set_limits` as :class:`ServeStep`;
    :meth:`remember` (the image, as it maps a run), :meth:`block` / :meth:`unblock` (around
    anything that may change a remembered cluster's entry), :meth:`close`."""

    __slots__ = ("_map", "cbits", "slot_bits")

    def __init__(
        self, fd: int, capacity: int, *, cbits: int, clusters: int, reads: bool, read_flags: int,
        writes: bool, write_flags: int, write_max: int,
    ) -> None:  # fmt: skip
        slot_bits = max(1, min(Q2_MAX_SLOTS.bit_length() - 1, (max(clusters, 2) - 1).bit_length()))
        if ((clusters - 1) >> slot_bits) + 1 >= 1 << cbits:
            raise ValueError("too many clusters for the map's tags")  # (the caller uses Python's path)
        self._map = _ffi.new("uint64_t[]", 1 << slot_bits)
        self._data = _ffi.new(
            "struct vdm_blk_q2 *",
            {"d": {"fd": fd, "reads": int(reads), "read_flags": read_flags, "writes": int(writes),
                   "write_flags": write_flags, "capacity": capacity, "write_max": write_max,
                   "defer_min": DEFER_MIN},
             "map": self._map, "slots": 1 << slot_bits, "slot_bits": slot_bits, "cbits": cbits,
             "enabled": 1, "busy": 0},
        )  # fmt: skip
        self.cbits = cbits
        self.slot_bits = slot_bits
        self._bind(self._data.d, writes, capacity, "vdm_blk_serve_qcow2")

    def remember(self, gc: int, count: int, host: int) -> None:
        """Guest clusters ``gc``..``gc + count - 1`` are at ``host`` on, contiguous, allocated,
        unshared and not metadata (the caller holds the metadata lock and no exclusive holder
        is in or waiting)."""
        _lib.vdm_blk_q2_remember(self._data, gc, count, host)

    def block(self) -> None:
        """Serve nothing from the map and forget it; returns when no step uses it any more."""
        _lib.vdm_blk_q2_block(self._data)

    def unblock(self) -> None:
        """Serve from the map again (empty after :meth:`block`)."""
        _lib.vdm_blk_q2_unblock(self._data)

    def close(self) -> None:
        """Serve nothing from now on (the file is about to be closed)."""
        self.block()
        super().close()
