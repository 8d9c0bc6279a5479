"""In-flight request tracking (vhost-user.rst, "Inflight I/O tracking", split virtqueues).

The backend keeps, in a memory file it shares with the frontend, which descriptor heads it has
taken from the available ring and not yet returned. The frontend holds on to that file across a
backend crash and hands it to the next backend (SET_INFLIGHT_FD), which then knows exactly which
requests to serve again -- and which not, because they were completed already.

Per queue the region holds a 16-byte header (features u64, version u16, desc_num u16,
last_batch_head u16, used_idx u16) followed by one 16-byte entry per descriptor (inflight u8,
5 bytes padding, next u16, counter u64).

Geometry. The frontend asks for the region with a queue size (GET_INFLIGHT_FD): QEMU sends its
device's ``queue-size`` property (vhost-user-blk: 128), but the ring it starts later has the size
the *guest* chose (QEMU 10: SeaBIOS 256, Linux up to 1024), which may be larger; the spec leaves
the ring's size to SET_VRING_NUM. libvhost-user sizes each queue's part by the queue size and does
not check the ring against it. vdm instead gives every queue a slot with room for the largest split
ring (:data:`~.protocol.MAX_RING_SIZE`, 512 KiB; the memfd's pages are only allocated where heads
are written) and echoes the frontend's queue size. A region handed over (SET_INFLIGHT_FD) is laid
out with the frontend's total size divided evenly by the number of queues (64-byte aligned):
that is vdm's slot for a region vdm made and the queue size's part for a libvhost-user one. A
ring larger than its slot has room for is refused before it starts. ``desc_num`` records the
ring's size when tracking starts; a region handed back must match the ring.

:class:`InflightTracker` keeps that bookkeeping for one queue: the core's
:class:`~vdm.virtqueue.Virtqueue` tells it what it takes and returns (a
:class:`~vdm.virtqueue.QueueTracker`); devices use their queues without knowing. After a
reconnect the tracker finds the requests that were in flight and the queue's :meth:`pop` returns
them first, oldest first (:meth:`~vdm.virtqueue.Virtqueue.restore`), then new ones.
"""

from __future__ import annotations

import fcntl
import mmap
import os
import struct
import threading

from vdm.ring_layout import used_ring_size
from vdm.virtqueue import Virtqueue

from .faultguard import FaultWatch, map_frontend_file
from .protocol import MAX_RING_SIZE, ProtocolError

__all__ = ["InflightRegion", "InflightTracker", "queue_region_size"]

_HEAD = struct.Struct("<QHHHH")  # features, version, desc_num, last_batch_head, used_idx
_DESC = struct.Struct("<B5xHQ")  # inflight, padding, next, counter
_U16 = struct.Struct("<H")  # (reads only: writes go through the typed views)
_U64 = struct.Struct("<Q")
#: descriptor counters found in a region handed over must be below this (checked before a ring starts)
MAX_COUNTER = 1 << 63
VERSION = 1
_ALIGN = 64
_OFF_VERSION = 8
_OFF_DESC_NUM = 10
_OFF_LAST_BATCH = 12
_OFF_USED_IDX = 14


def queue_region_size(queue_size: int) -> int:
    """Bytes of one queue's region: the header and one entry per descriptor, 64-byte aligned."""
    raw = _HEAD.size + _DESC.size * queue_size
    return (raw + _ALIGN - 1) // _ALIGN * _ALIGN


class InflightRegion:
    """The shared in-flight file, mapped: one region per queue."""

    def __init__(
        self, mapping: mmap.mmap, offset: int, size: int, num_queues: int, queue_size: int, stride: int
    ) -> None:
        self.mapping = mapping
        self.view = memoryview(mapping)[offset : offset + size]
        self.size = size
        self.num_queues = num_queues
        #: the queue size the frontend named (echoed back; not a limit on the ring)
        self.queue_size = queue_size
        #: bytes from one queue's part to the next (>= queue_region_size(queue_size))
        self.stride = stride
        #: the largest ring one queue's part can track
        self.capacity = min(MAX_RING_SIZE, (stride - _HEAD.size) // _DESC.size)

    @staticmethod
    def check_geometry(num_queues: int, queue_size: int, max_queues: int) -> None:
        if not 1 <= num_queues <= max_queues:
            raise ProtocolError(f"inflight: {num_queues} queues, the device has {max_queues}")
        if not 1 <= queue_size <= MAX_RING_SIZE:
            raise ProtocolError(f"inflight: queue size {queue_size} (split rings: {MAX_RING_SIZE} at most)")

    @classmethod
    def create(cls, num_queues: int, queue_size: int) -> tuple[InflightRegion, int]:
        """A new zeroed region in a memfd; returns it and the fd to send (the caller closes it).

        Each queue's slot has room for the largest ring, whatever ``queue_size`` says (module doc).
        """
        stride = queue_region_size(max(queue_size, MAX_RING_SIZE))
        size = num_queues * stride
        fd = os.memfd_create("vdm-vhost-user-inflight", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            os.ftruncate(fd, size)
            # the frontend gets this fd: it must not be able to shrink it under our mapping
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_SEAL)
            m = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except BaseException:
            os.close(fd)
            raise
        return cls(m, 0, size, num_queues, queue_size, stride), fd

    @classmethod
    def open(
        cls,
        fd: int,
        size: int,
        offset: int,
        num_queues: int,
        queue_size: int,
        watch: FaultWatch | None = None,
    ) -> InflightRegion:
        """Map a region the frontend kept (SET_INFLIGHT_FD); the caller still owns ``fd``.

        Like guest memory, the file is sealed against shrinking or its mapping guarded (faults
        counted on ``watch``; :mod:`.faultguard`).
        """
        need = num_queues * queue_region_size(queue_size)
        if size < need:
            raise ProtocolError(
                f"inflight: {size} bytes for {num_queues} queues of {queue_size} (need {need})"
            )
        m, _ = map_frontend_file(fd, offset, size, watch, "inflight region")
        # the frontend's size split evenly: vdm's slots, or libvhost-user's queue_region_size parts
        stride = size // num_queues // _ALIGN * _ALIGN
        return cls(m, offset, size, num_queues, queue_size, stride)

    def queue(self, index: int) -> memoryview | None:
        """The region of queue ``index``, or None if the frontend did not provide one for it."""
        if not 0 <= index < self.num_queues:
            return None
        return self.view[index * self.stride : (index + 1) * self.stride]

    def check_queue(self, index: int, ring_size: int) -> None:
        """Refuse a ring that does not fit its region (before the queue starts)."""
        region = self.queue(index)
        if region is None:
            return
        if ring_size > self.capacity:
            raise ProtocolError(
                f"queue {index}: ring of {ring_size} larger than the inflight region has room for "
                f"({self.capacity} descriptors; it was made for queue size {self.queue_size})"
            )
        version = _U16.unpack_from(region, _OFF_VERSION)[0]
        desc_num = _U16.unpack_from(region, _OFF_DESC_NUM)[0]
        if version not in (0, VERSION):
            raise ProtocolError(f"queue {index}: inflight region version {version} is unknown")
        if version and desc_num != ring_size:
            raise ProtocolError(
                f"queue {index}: inflight region is for {desc_num} descriptors, the ring has {ring_size}"
            )
        if version:
            # New heads are numbered after the largest counter found; that and every later one
            # must fit the u64 field. No backend counts to 2**63 (a century at 10**9 requests/s).
            top = max(_U64.unpack_from(region, _HEAD.size + _DESC.size * i + 8)[0] for i in range(ring_size))
            if top >= MAX_COUNTER:
                raise ProtocolError(
                    f"queue {index}: inflight descriptor counter 0x{top:x} is past any backend's count "
                    "(the region is corrupt)"
                )


class InflightTracker:
    """Records one queue's taken and returned heads in its part of the inflight region.

    A :class:`~vdm.virtqueue.QueueTracker`: the handler gives one to each of the device's queues
    (:meth:`~vdm.virtqueue.Virtqueue.set_tracker`); the queue calls :meth:`taken`,
    :meth:`completing`, :meth:`completed` and :meth:`reset`. Before a ring starts the handler
    hands it the queue's region (:meth:`set_region`, None for no tracking) and asks :meth:`start`
    where the ring resumes; the device's queue class and its code do not change.

    The frontend keeps the region when this process dies, at any instruction: every field is
    written with one store of its final value (typed views, never ``struct.pack_into``, which
    zeroes its target first), and the order is the one recovery relies on -- a head is marked in
    flight after it is taken; on completion the batch list (``next``, ``last_batch_head``) is
    written before the used index moves, then the flags are cleared and ``used_idx`` recorded.
    Every used-ring update is also marked in the migration's dirty log when one is on.
    """

    def __init__(self, queue: Virtqueue) -> None:
        self.queue = queue
        self._region: memoryview | None = None
        self._r16: memoryview | None = None
        self._r64: memoryview | None = None
        self._size = 0
        self._counter = 0
        self._lock = threading.Lock()
        #: heads served again after reconnects (for logs and tests)
        self.resubmitted = 0

    @property
    def region(self) -> memoryview | None:
        """This queue's inflight region, or None for no tracking."""
        return self._region

    @property
    def idle(self) -> bool:
        """True while taking and completing heads changes nothing here (no inflight region, no
        dirty log on): the queue may then serve chains without telling this tracker
        (:meth:`vdm.virtqueue.Virtqueue.serve_compiled`)."""
        if self._region is not None:
            return False
        memory = self.queue.memory
        return not (memory is not None and getattr(memory, "logging", False))

    def set_region(self, region: memoryview | None) -> None:
        with self._lock:
            self._region = region
            # u16 view: [_OFF_X // 2] for header fields, desc i's next at (_HEAD.size + 16 * i + 6) // 2;
            # u64 view: desc i's counter at (_HEAD.size + 16 * i + 8) // 8
            self._r16 = region.cast("H") if region is not None else None
            self._r64 = region.cast("Q") if region is not None else None

    def start(self, size: int, used_idx: int, next_avail: int) -> tuple[int, list[int]]:
        """The ring of ``size`` starts with the driver's ``used_idx`` and the frontend's base
        ``next_avail``: initialise a fresh region, or find the requests a previous backend left in
        flight. Returns the available index to resume at and those heads, oldest first."""
        with self._lock:
            self._size = size
            self._counter = 0
            region, r16 = self._region, self._r16
            if region is None or r16 is None:
                return next_avail, []
            if r16[_OFF_VERSION // 2] == 0:
                region[: _HEAD.size + _DESC.size * size] = bytes(_HEAD.size + _DESC.size * size)
                _HEAD.pack_into(region, 0, 0, VERSION, size, 0, used_idx)  # nothing in flight yet
                return next_avail, []
            done = (used_idx - r16[_OFF_USED_IDX // 2]) & 0xFFFF
            if done:
                # The previous backend died between publishing used entries and clearing their
                # inflight flags: that last batch (a list from last_batch_head through next) was
                # completed after all.
                head = r16[_OFF_LAST_BATCH // 2]
                for _ in range(min(done, size)):
                    if head >= size:
                        break
                    region[_HEAD.size + _DESC.size * head] = 0
                    head = r16[(_HEAD.size + _DESC.size * head + 6) // 2]
                r16[_OFF_USED_IDX // 2] = used_idx
            pending = []
            top = 0
            for i in range(size):
                flag, _, counter = _DESC.unpack_from(region, _HEAD.size + _DESC.size * i)
                if flag == 1:
                    pending.append((counter, i))
                top = max(top, counter)
            pending.sort()
            self._counter = top + 1
            self.resubmitted += len(pending)
            # Everything taken from the available ring was either completed (used_idx) or is in flight.
            return (used_idx + len(pending)) & 0xFFFF, [i for _, i in pending]

    # ---- QueueTracker ----------------------------------------------------------------------------

    def taken(self, head: int) -> None:
        with self._lock:
            region, r64 = self._region, self._r64
            if region is None or r64 is None or not 0 <= head < self._size:
                return
            off = _HEAD.size + _DESC.size * head
            r64[(off + 8) // 8] = self._counter
            self._counter += 1
            region[off] = 1

    def completing(self, heads: list[int]) -> None:
        r16 = self._r16
        if r16 is None:
            return
        last = r16[_OFF_LAST_BATCH // 2]
        for head in heads:
            if head < self._size:
                r16[(_HEAD.size + _DESC.size * head + 6) // 2] = last
                last = head
        r16[_OFF_LAST_BATCH // 2] = last

    def completed(self, heads: list[int], used_idx: int) -> None:
        region, r16 = self._region, self._r16
        if region is not None and r16 is not None:
            for head in heads:
                if head < self._size:
                    region[_HEAD.size + _DESC.size * head] = 0
            r16[_OFF_USED_IDX // 2] = used_idx
        self.log_used_ring()

    def reset(self) -> None:
        self.set_region(None)
        self._counter = 0

    # ---------------------------------------------------------------------------------------------

    def log_used_ring(self) -> None:
        """Mark the used ring in the migration's dirty log, if the memory keeps one and it is on.

        After every used-ring update (and when logging starts, for the flags and avail_event the
        device writes between completions). The whole ring is marked: a few pages.
        """
        q = self.queue
        memory = q.memory
        if memory is not None and getattr(memory, "logging", False) and q.size:
            memory.log_write(q.used_addr, used_ring_size(q.size))  # type: ignore[attr-defined]

    def inflight_heads(self) -> list[int]:
        """Heads currently marked in flight (for tests and diagnostics)."""
        region = self._region
        if region is None:
            return []
        return [i for i in range(self._size) if region[_HEAD.size + _DESC.size * i] == 1]
