"""virtio-balloon (virtio 1.2, section 5.5): the host asks the guest for memory back.

Queues, by the driver's numbering: 0 ``inflateq``, 1 ``deflateq``, then ``statsq`` if
VIRTIO_BALLOON_F_STATS_VQ was negotiated, then ``reporting_vq`` if VIRTIO_BALLOON_F_REPORTING was
(free page hinting is not offered, so its queue never takes a number). Configuration space:
``num_pages`` (the target, written by the host through :meth:`BalloonDevice.set_target_pages`) and
``actual`` (written by the driver: what it has given).

* inflate: arrays of 32-bit page frame numbers (4 KiB pages); each page inside guest RAM is
  released on the host (:mod:`vdm_balloon.release`) and counted in :attr:`inflated`; a PFN outside
  guest RAM is skipped (one log line per request), a trailing partial number ignored;
* deflate: the pages leave :attr:`inflated` (the guest uses them again; no host work needed);
* stats: the driver's buffer of (le16 tag, le64 value) pairs is parsed into :attr:`stats` and kept
  until the host asks again (:meth:`BalloonDevice.request_stats` returns it, the driver refills it);
* free page reporting: each request's device-writable buffers are free guest pages, released and
  returned; DEFLATE_ON_OOM is a promise the device keeps by never relying on inflated pages.

The control socket's ``balloon`` command (``vdm ctl balloon balloon0 [SIZE]``) comes through
:meth:`BalloonDevice.control_commands` (:class:`vdm.control.Controllable`): with ``size`` it calls
:meth:`set_target_bytes` (SIZE is the balloon's size, what the guest gives back, as ``target_mib``;
not QEMU's ``balloon N``, which names the guest's memory), and either way it answers the target,
``actual``, the pages released and the last statistics, asking the guest for fresh ones. These and
:meth:`request_stats` are safe from any thread. Invariants: ``inflated`` holds only PFNs whose
pages lie in guest RAM; ``0 <= target_pages < 2**32``.
"""

from __future__ import annotations

import logging
import struct
import threading
from typing import Any, Callable, Optional

from vdm.chain import DescriptorChain
from vdm.device import VirtioDevice, bit
from vdm.virtqueue import Virtqueue

from .config import BalloonConfig
from .release import PAGE, release_range, release_view

__all__ = ["F_DEFLATE_ON_OOM", "F_REPORTING", "F_STATS_VQ", "STAT_TAGS", "VIRTIO_ID_BALLOON", "BalloonDevice"]

log = logging.getLogger(__name__)

VIRTIO_ID_BALLOON = 5
F_MUST_TELL_HOST, F_STATS_VQ, F_DEFLATE_ON_OOM, F_FREE_PAGE_HINT, F_PAGE_POISON, F_REPORTING = range(6)

#: the statistics tags of virtio 1.2, 5.5.6.3, by number
STAT_TAGS = {
    0: "swap_in", 1: "swap_out", 2: "major_faults", 3: "minor_faults", 4: "free_memory",
    5: "total_memory", 6: "available_memory", 7: "disk_caches", 8: "hugetlb_allocations",
    9: "hugetlb_failures",
}
_STAT = struct.Struct("<HQ")
_MAX_PFNS = 1 << 16  # one inflate request: at most 256 MiB of pages (Linux sends 256 at a time)


class BalloonDevice(VirtioDevice):
    device_id = VIRTIO_ID_BALLOON
    name = "balloon"

    def __init__(self, config: Optional[BalloonConfig] = None) -> None:
        self.config = config if config is not None else BalloonConfig()
        self.queue_max_sizes = (self.config.queue_size,) * 4
        super().__init__()
        self._lock = threading.Lock()
        self._target = self.config.target_mib * (1 << 20) // PAGE
        #: what the driver wrote to ``actual``: the pages it says it has given
        self.actual = 0
        #: PFNs the guest gave and has not taken back
        self.inflated: set[int] = set()
        #: the guest's last statistics, by name (tags vdm does not know: ``tag_<n>``)
        self.stats: dict[str, int] = {}
        #: how many times the guest sent statistics
        self.stats_updates = 0
        #: pages released on the host (inflate and free page reporting); those the host refused
        self.released_pages = 0
        self.unreleased_pages = 0
        self._stats_chain: Optional[DescriptorChain] = None

    # ---- features and configuration ------------------------------------------------------------

    def device_features(self) -> int:
        c = self.config
        return (
            (bit(F_STATS_VQ) if c.stats else 0)
            | (bit(F_DEFLATE_ON_OOM) if c.deflate_on_oom else 0)
            | (bit(F_REPORTING) if c.reporting else 0)
        )

    def config_space(self) -> bytes:
        with self._lock:
            return struct.pack("<II", self._target, self.actual)

    def write_config(self, offset: int, data: bytes) -> None:
        if offset == 4 and len(data) == 4:
            with self._lock:
                self.actual = struct.unpack("<I", data)[0]

    @property
    def target_pages(self) -> int:
        with self._lock:
            return self._target

    def set_target_pages(self, pages: int) -> None:
        """Ask the guest to hold ``pages`` 4 KiB pages in the balloon (0: give everything back)."""
        if not 0 <= pages < 1 << 32:
            raise ValueError(f"a balloon target is 0 to {(1 << 32) - 1} pages, not {pages}")
        with self._lock:
            self._target = pages
        self.signal_config()

    def set_target_bytes(self, size: int) -> None:
        """The control socket's hook: a target in bytes (rounded up to whole pages)."""
        self.set_target_pages(-(-size // PAGE))

    def control_commands(self) -> dict[str, Callable[[dict[str, Any]], Any]]:
        """``balloon``: ``{"size": bytes}`` sets the target (0: give everything back); no size: show."""
        return {"balloon": self._ctl_balloon}

    def _ctl_balloon(self, args: dict[str, Any]) -> dict[str, Any]:
        size = args.get("size")
        if size is not None:
            if not isinstance(size, int) or isinstance(size, bool) or not 0 <= size < (1 << 32) * PAGE:
                raise ValueError(f"size {size!r}: the balloon's size in bytes, 0 to {(1 << 32) * PAGE - 1}")
            self.set_target_bytes(size)
        fresh = self.request_stats()  # the answer has the last ones; the next, these
        with self._lock:
            return {
                "target_bytes": self._target * PAGE,
                "actual_bytes": self.actual * PAGE,
                "inflated_bytes": len(self.inflated) * PAGE,
                "released_pages": self.released_pages,
                "unreleased_pages": self.unreleased_pages,
                "running": bool(self.activated),
                "stats_updates": self.stats_updates,
                "stats_requested": fresh,
                "stats": dict(self.stats),
            }

    # ---- queues --------------------------------------------------------------------------------

    def _queue_role(self, index: int) -> str:
        if index == 0:
            return "inflate"
        if index == 1:
            return "deflate"
        stats = self.has_feature(F_STATS_VQ)
        if index == 2 and stats:
            return "stats"
        if index == 2 + stats and self.has_feature(F_REPORTING):
            return "reporting"
        return "none"

    def process_queue(self, queue: Virtqueue) -> None:
        role = self._queue_role(queue.index)
        while True:
            chain = queue.pop()
            if chain is None:
                break
            if role == "stats":
                self._take_stats(queue, chain)
                continue
            if role in ("inflate", "deflate"):
                self._pages(chain, inflate=role == "inflate")
            elif role == "reporting":
                self._report(chain)
            queue.push(chain, 0)
        self.signal_used(queue)

    def _pages(self, chain: DescriptorChain, *, inflate: bool) -> None:
        data = chain.read(0, _MAX_PFNS * 4)
        n = len(data) // 4
        pfns = struct.unpack_from(f"<{n}I", data) if n else ()
        outside = 0
        memory = self.memory
        for pfn in pfns:
            if inflate:
                assert memory is not None
                if not memory.contains(pfn * PAGE, PAGE):
                    outside += 1
                    continue
                released = release_range(memory, pfn * PAGE, PAGE)
                with self._lock:
                    self.inflated.add(pfn)
                    if released:
                        self.released_pages += 1
                    else:
                        self.unreleased_pages += 1
            else:
                with self._lock:
                    self.inflated.discard(pfn)
        if outside:
            log.warning("%s: %d page numbers outside guest RAM ignored", self.name, outside)

    def _report(self, chain: DescriptorChain) -> None:
        for view in chain.writable:
            dropped = release_view(view) // PAGE
            with self._lock:
                self.released_pages += dropped
                self.unreleased_pages += len(view) // PAGE - dropped

    def _take_stats(self, queue: Virtqueue, chain: DescriptorChain) -> None:
        data = chain.read(0, _STAT.size * 64)
        stats = {}
        for off in range(0, len(data) - _STAT.size + 1, _STAT.size):
            tag, value = _STAT.unpack_from(data, off)
            stats[STAT_TAGS.get(tag, f"tag_{tag}")] = value
        with self._lock:
            old, self._stats_chain = self._stats_chain, chain
            if data:
                self.stats = stats
                self.stats_updates += 1
        if old is not None:  # the driver sent another buffer while we held one: give that back
            queue.push(old, 0)

    def request_stats(self) -> bool:
        """Ask the guest for fresh statistics (returns its buffer); False if none is held."""
        if not self.has_feature(F_STATS_VQ) or not self.activated:
            return False
        queue = self.queues[2]
        with self._lock:
            chain, self._stats_chain = self._stats_chain, None
        if chain is None or chain.epoch != queue.epoch:
            return False
        queue.push(chain, 0)
        self.signal_used(queue)
        return True

    def on_reset(self) -> None:
        with self._lock:
            chain, self._stats_chain = self._stats_chain, None
            self.inflated.clear()  # a reset driver starts with all its memory
            self.actual = 0
        if chain is not None:
            self.queues[2].discard(chain)
