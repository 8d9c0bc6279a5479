"""Discard and write-zeroes for qcow2 images: a part of :class:`.qcow2.Qcow2Disk`.

:class:`Zeroing` is mixed into ``Qcow2Disk`` and uses its tables, locks and allocation
(``_l2_for``, ``_classify``, ``_write_one``, ``_meta``, ``_io``, ``_pending_free``); it only
moves the zeroing paths out of that module. The rules: v3 images use the zero flag for whole
clusters (keeping a preallocated cluster unless unmapping), v2 images deallocate or write zeros;
partial clusters are written with zeros; clusters an entry no longer references are given back
only after the next flush (see the ordering in :mod:`.qcow2`).
"""

from __future__ import annotations

from .base import SECTOR
from .qcow2_header import COMPRESSED_KIND, COPIED, DATA, OFFSET_MASK, UNALLOC, ZERO, ZERO_FLAG

__all__ = ["Zeroing"]


class Zeroing:
    """discard and write_zeroes (mixed into Qcow2Disk; see the module documentation)."""

    def discard(self, offset: int, length: int) -> None:
        """Free the range. It reads as zeros afterwards, except in a version 2 image with a
        backing file, where whole clusters fall back to the backing file's data and partial
        clusters are left as they are."""
        self._live()
        self.check_range(offset, length, write=True)
        self._zero_range(offset, length, unmap=True, discard=True)

    def write_zeroes(self, offset: int, length: int, unmap: bool) -> None:
        """Make the range read zeros: v3 zero flags for whole clusters (freeing them with
        ``unmap``), written zeros for partial clusters and in v2 images where needed."""
        self._live()
        self.check_range(offset, length, write=True)
        self._zero_range(offset, length, unmap=unmap, discard=False)

    def _zero_range(self, offset: int, length: int, unmap: bool, discard: bool) -> None:
        cs = self.cs
        self._io.acquire_exclusive()
        try:
            with self._meta:
                end = offset + length
                pos = offset
                while pos < end:
                    within = pos & (cs - 1)
                    n = min(end - pos, cs - within)
                    if n < cs:
                        if not (discard and self.version == 2 and self.backing is not None):
                            self._zero_partial(pos, n)
                        pos += n
                        continue
                    gc = pos >> self.cbits
                    table = self._l2_for(gc, False)
                    if table is None and (self.backing is None or (discard and self.version == 2)):
                        # a whole unallocated L2 range already reads zeros (or must read backing)
                        pos = min(((gc | self.l2_mask) + 1) << self.cbits, end)
                        continue
                    self._zero_cluster(gc, unmap, discard)
                    pos += cs
        finally:
            self._io.release_exclusive()

    def _zero_partial(self, pos: int, n: int) -> None:
        gc = pos >> self.cbits
        table = self._l2_for(gc, False)
        entry = table.entries[gc & self.l2_mask] if table is not None else 0
        kind, _ = self._classify(entry)
        if kind == ZERO or (kind == UNALLOC and self.backing is None):
            return
        zeros = memoryview(bytearray(n))
        self._write_one(pos, [zeros])

    def _zero_cluster(self, gc: int, unmap: bool, discard: bool) -> None:
        table = self._l2_for(gc, False)
        entry = table.entries[gc & self.l2_mask] if table is not None else 0
        kind, host = self._classify(entry)
        if self.version == 2:
            if kind == UNALLOC and (discard or self.backing is None):
                return
            if discard or (self.backing is None and (unmap or not entry & COPIED or kind != DATA)):
                self._set_entry(gc, 0, entry)  # deallocate: reads zeros (or the backing file on discard)
            elif kind == DATA and entry & COPIED:
                self._zero_host(host)
            else:
                self._write_one(gc << self.cbits, [memoryview(bytearray(self.cs))])
            return
        # version 3: the zero flag
        if kind == UNALLOC and self.backing is None:
            return
        if kind == ZERO and (not host or not unmap):
            return
        if not (unmap or discard) and kind in (DATA, ZERO) and host and entry & COPIED:
            new = host | COPIED | ZERO_FLAG  # keep the preallocation
        else:
            new = ZERO_FLAG
        self._set_entry(gc, new, entry)

    def _zero_host(self, host: int) -> None:
        """Write a cluster of zeros over an allocated host cluster (v2 images keep allocations)."""
        self.f.pwritev([memoryview(bytearray(self.cs))], host)

    def _set_entry(self, gc: int, new: int, old: int) -> None:
        """Replace an L2 entry; clusters the old one referenced are given back after the next flush."""
        table = self._l2_for(gc, True)
        assert table is not None
        table.entries[gc & self.l2_mask] = new
        table.touch(gc & self.l2_mask)
        kind, host = self._classify(old)
        if kind == COMPRESSED_KIND:
            coff = old & self.coffset_mask
            nsect = ((old >> self.csize_shift) & self.csize_mask) + 1
            self._pending_free.append((coff & ~(SECTOR - 1), nsect * SECTOR))
        elif host and (new & OFFSET_MASK) != host:
            self._pending_free.append((host, self.cs))
