"""An I/O bus: guest address ranges (ports or MMIO addresses) to :class:`vdm.iorange.IoHandler`.

vCPU threads dispatch every PIO or MMIO exit through a bus. Accesses nobody registered behave as an
empty bus on real hardware does: reads return all ones, writes are dropped; each such address is
logged once (a guest probing legacy hardware would otherwise flood the log). A handler that raises
is a bug in vdm, not in the guest: the exception is logged and the access is treated as unclaimed,
so one broken device cannot kill the vCPU thread.
"""

from __future__ import annotations

import bisect
import logging
import threading
from typing import TYPE_CHECKING, NamedTuple

if TYPE_CHECKING:
    from vdm.iorange import IoHandler

__all__ = ["IoBus", "IoRange"]

log = logging.getLogger(__name__)

_MAX_LOGGED = 4096  # cap on remembered unclaimed addresses, so a scanning guest cannot grow memory
_MAX_CACHED = 65536  # cap on the address -> range lookup cache
_MISS = object()


class IoRange(NamedTuple):
    base: int
    size: int
    handler: IoHandler
    owner: str


class IoBus:
    """Non-overlapping address ranges, each served by one handler."""

    def __init__(self, name: str, limit: int) -> None:
        """``limit``: one past the highest address of the space (0x10000 for ports, 2**64 for MMIO)."""
        self.name = name
        self.limit = limit
        self._lock = threading.Lock()
        self._starts: list[int] = []
        self._ranges: list[IoRange] = []
        self._cache: dict[int, IoRange | None] = {}
        self._unclaimed_logged: set[tuple[int, bool]] = set()
        self.unclaimed_reads = 0
        self.unclaimed_writes = 0

    def register(self, base: int, size: int, handler: IoHandler, owner: str = "?") -> None:
        """Route ``[base, base + size)`` to ``handler``; ``ValueError`` if it overlaps a range."""
        if size <= 0 or base < 0 or base + size > self.limit:
            raise ValueError(f"{self.name}: bad range 0x{base:x}+0x{size:x}")
        with self._lock:
            i = bisect.bisect_right(self._starts, base)
            if i > 0:
                prev = self._ranges[i - 1]
                if prev.base + prev.size > base:
                    raise ValueError(f"{self.name}: 0x{base:x}+0x{size:x} ({owner}) overlaps {prev.owner}")
            if i < len(self._ranges) and base + size > self._ranges[i].base:
                raise ValueError(
                    f"{self.name}: 0x{base:x}+0x{size:x} ({owner}) overlaps {self._ranges[i].owner}"
                )
            # copy-on-write, so lookups on vCPU threads never need the lock
            starts = list(self._starts)
            ranges = list(self._ranges)
            starts.insert(i, base)
            ranges.insert(i, IoRange(base, size, handler, owner))
            self._starts, self._ranges = starts, ranges
            self._cache = {}

    def unregister(self, base: int) -> IoRange:
        """Remove the range starting at ``base``; ``KeyError`` if there is none."""
        with self._lock:
            try:
                i = self._starts.index(base)
            except ValueError:
                raise KeyError(base)
            starts = list(self._starts)
            ranges = list(self._ranges)
            del starts[i]
            r = ranges.pop(i)
            self._starts, self._ranges = starts, ranges
            self._cache = {}
            return r

    @property
    def ranges(self) -> tuple[IoRange, ...]:
        return tuple(self._ranges)

    def find(self, addr: int) -> IoRange | None:
        cache = self._cache
        hit = cache.get(addr, _MISS)
        if hit is not _MISS:
            return hit  # type: ignore[return-value]
        starts, ranges = self._starts, self._ranges
        found = None
        i = bisect.bisect_right(starts, addr) - 1
        if i >= 0:
            r = ranges[i]
            if addr < r.base + r.size:
                found = r
        if len(cache) < _MAX_CACHED and cache is self._cache and ranges is self._ranges:
            cache[addr] = found
        return found

    def read(self, addr: int, size: int) -> int:
        """A guest read of ``size`` bytes at ``addr``; all ones if nobody claims it."""
        r = self.find(addr)
        if r is not None:
            try:
                return int(r.handler.read(addr - r.base, size)) & ((1 << (8 * size)) - 1)
            except Exception:
                log.exception("%s: %s read at 0x%x size %d failed", self.name, r.owner, addr, size)
        else:
            self.unclaimed_reads += 1
            self._log_unclaimed(addr, False, size, None)
        return (1 << (8 * size)) - 1

    def write(self, addr: int, size: int, value: int) -> None:
        """A guest write of ``size`` bytes at ``addr``; dropped if nobody claims it."""
        r = self.find(addr)
        if r is not None:
            try:
                r.handler.write(addr - r.base, size, value)
            except Exception:
                log.exception("%s: %s write at 0x%x size %d failed", self.name, r.owner, addr, size)
            return
        self.unclaimed_writes += 1
        self._log_unclaimed(addr, True, size, value)

    def _log_unclaimed(self, addr: int, write: bool, size: int, value: int | None) -> None:
        key = (addr, write)
        if key in self._unclaimed_logged or len(self._unclaimed_logged) >= _MAX_LOGGED:
            return
        self._unclaimed_logged.add(key)
        if write:
            log.debug("%s: unclaimed write 0x%x size %d value 0x%x", self.name, addr, size, value)
        else:
            log.debug("%s: unclaimed read 0x%x size %d", self.name, addr, size)
