"""qcow2 refcounts: the refcount table, cached refcount blocks of any width, cluster allocation.

Refcount blocks are written back (``write_dirty``), never before the caller asks or a block
leaves the cache. The two changes that need their own ordering happen here and sync on the way:
a new refcount block is written and synced before the table entry that points to it, and a grown
refcount table (with the blocks that count it) is written and synced before the header points to
it. Freeing only lowers counts in the cache; callers free a cluster only once no table on disk
references it any more (see :mod:`.qcow2`).
"""

from __future__ import annotations

import logging
import struct
import sys
from array import array
from typing import Callable

from .base import DiskError
from .protocol import Protocol
from .qcow2_header import Qcow2Header
from .qcow2_tables import CHUNK, PackedCounts, Table, TableCache, decode_u64, encode_u64, find_zero

__all__ = ["Refcounts"]

log = logging.getLogger(__name__)

_BIG_ENDIAN = sys.byteorder == "big"
_ARRAY_CODES = {1: "B", 2: "H", 4: "I", 8: "Q"}
MAX_REFTABLE_BYTES = 8 << 20  # QEMU's limit


class Refcounts:
    """The refcounts of one image: ``get``, ``alloc``, ``free``, ``write_dirty``.

    ``guard(offset, length)`` is called on every cluster handed out and must raise if it
    overlaps metadata (refcounts that say otherwise are wrong). ``corrupt(what)`` builds the
    error for a damaged image. Callers hold the image's metadata lock.
    """

    def __init__(
        self,
        f: Protocol,
        h: Qcow2Header,
        cache_tables: int,
        guard: Callable[[int, int], None],
        corrupt: Callable[[str], DiskError],
    ) -> None:
        self.f, self.h = f, h
        self.cs = h.cluster_size
        self.bits = 1 << h.refcount_order
        self.per_block = self.cs * 8 // self.bits
        self.chunk_bytes = min(CHUNK, self.cs)
        # entries per piece written back = chunk_bytes * 8 / bits
        self.shift = self.chunk_bytes.bit_length() - 1 + 3 - h.refcount_order
        self.guard = guard
        self.corrupt = corrupt
        file_size = f.size()
        self.rt = decode_u64(f.pread(h.refcount_table_clusters * self.cs, h.refcount_table_offset))
        for i, e in enumerate(self.rt):
            if e & 0x1FF or e % self.cs or (e and e + self.cs > file_size):
                raise DiskError(
                    f"{f.path}: not a usable qcow2 image: refcount table entry {i} (0x{e:x}) is invalid "
                    "or points past the end of the file; check it with qemu-img check"
                )
        self.cache = TableCache(cache_tables, self._write)
        self.free_hint = 0  # no free cluster below this one
        #: host clusters holding metadata (filled by the image's check): new refcount blocks and
        #: tables join it, clusters whose refcount drops to 0 leave it
        self.metadata: set[int] = set()

    # ---- blocks ----------------------------------------------------------------------------------

    def _decode(self, raw: bytes) -> array:
        width = self.bits
        if width >= 8:
            a = array(_ARRAY_CODES[width // 8])
            if a.itemsize != width // 8:  # a platform without a fitting type code
                step = width // 8
                return array(
                    "Q", [int.from_bytes(raw[i : i + step], "big") for i in range(0, len(raw), step)]
                )
            a.frombytes(raw)
            if not _BIG_ENDIAN and width > 8:
                a.byteswap()
            return a
        # sub-byte widths stay packed (entry 0 in the least significant bits of byte 0)
        return PackedCounts(bytearray(raw), width)

    def _encode(self, a, start: int = 0, end: int | None = None) -> bytes:
        """The on-disk bytes of entries ``start`` to ``end`` (whole bytes for sub-byte widths)."""
        width = self.bits
        if end is None:
            end = len(a)
        if isinstance(a, PackedCounts):
            return bytes(a.raw[start * width // 8 : end * width // 8])
        a = a[start:end]
        if width >= 8:
            if a.itemsize != width // 8:
                return b"".join(v.to_bytes(width // 8, "big") for v in a)
            if _BIG_ENDIAN or width == 8:
                return a.tobytes()
            a.byteswap()  # a is a copy (the slice above)
            return a.tobytes()
        raise AssertionError("sub-byte refcounts are PackedCounts")

    def _empty(self):
        if self.bits < 8:
            return PackedCounts(bytearray(self.cs), self.bits)
        code = _ARRAY_CODES[self.bits // 8] if self.bits >= 8 else "B"
        if array(code).itemsize * 8 != max(self.bits, 8):
            code = "Q"
        return array(code, bytes(array(code).itemsize * self.per_block))

    def _load(self, off: int) -> Table:
        t = self.cache.get(off)
        if t is not None:
            return t
        raw = self.f.pread(self.cs, off)
        if len(raw) < self.cs:
            raise self.corrupt(f"refcount block at 0x{off:x} is past the end of the file")
        t = Table(self._decode(raw), self.shift)
        self.cache.insert(off, t)
        return t

    def _write(self, off: int, t: Table) -> None:
        """Write the stale pieces of a refcount block (only those: a flush costs what changed)."""
        per = 1 << self.shift
        for first, count in t.dirty_runs():
            self.f.pwrite(
                self._encode(t.entries, first * per, (first + count) * per), off + first * self.chunk_bytes
            )
        t.chunks.clear()

    def write_dirty(self) -> bool:
        """Write every dirty refcount block (no sync); True if there were any."""
        wrote = False
        for off, t in self.cache.items():
            if t.dirty:
                self._write(off, t)
                wrote = True
        return wrote

    def _block_for(self, cluster: int) -> tuple[Table | None, int]:
        rti, j = divmod(cluster, self.per_block)
        if rti >= len(self.rt) or not self.rt[rti]:
            return None, j
        return self._load(self.rt[rti]), j

    def block_entries(self, rti: int):
        """The entries of refcount block ``rti`` (refcounts of clusters ``rti * per_block`` on),
        or None where the table has no block (all 0). For reading many refcounts at once."""
        t, _ = self._block_for(rti * self.per_block)
        return None if t is None else t.entries

    # ---- counts ----------------------------------------------------------------------------------

    def get(self, cluster: int) -> int:
        t, j = self._block_for(cluster)
        return 0 if t is None else t.entries[j]

    def alloc(self) -> int:
        """Find a free host cluster, set its refcount to 1 (in the cache) and return its offset."""
        epb = self.per_block
        idx = self.free_hint
        while True:
            rti = idx // epb
            if rti >= len(self.rt):
                self._grow_table(rti)
                continue
            if not self.rt[rti]:
                self._new_block(rti)
                continue
            t = self._load(self.rt[rti])
            j = find_zero(t.entries, idx - rti * epb)
            if j < 0:
                idx = (rti + 1) * epb
                continue
            t.entries[j] = 1
            t.touch(j)
            cluster = rti * epb + j
            self.free_hint = cluster + 1
            # a free cluster on top of metadata means the refcounts are wrong: stop before damage
            self.guard(cluster * self.cs, self.cs)
            return cluster * self.cs

    def free(self, offset: int, length: int) -> None:
        """Decrement the refcounts of the clusters overlapping a host range (in the cache)."""
        cs = self.cs
        for c in range(offset // cs, -(-(offset + length) // cs)):
            t, j = self._block_for(c)
            if t is None or t.entries[j] == 0:
                log.warning("%s: freeing host cluster %d whose refcount is already 0", self.f.path, c)
                continue
            t.entries[j] -= 1
            t.touch(j)
            if t.entries[j] == 0:
                self.metadata.discard(c)
                if c < self.free_hint:
                    self.free_hint = c

    # ---- growth ----------------------------------------------------------------------------------

    def _new_block(self, rti: int) -> None:
        """Create the missing refcount block for range ``rti``, placed at the range's first cluster.

        With no block, every cluster of the range has refcount 0, so the first one is free; the
        block counts itself. It is written and synced before the table entry that points to it.
        """
        off = rti * self.per_block * self.cs
        if off == 0:  # the header's range always has a block; writing one there would destroy it
            raise self.corrupt("the refcount table has no block for the header's clusters")
        self.guard(off, self.cs)  # never over the L1 or refcount table either
        entries = self._empty()
        entries[0] = 1
        self.f.pwrite(self._encode(entries), off)
        self.f.sync()
        self.f.pwrite(struct.pack(">Q", off), self.h.refcount_table_offset + rti * 8)
        self.rt[rti] = off
        self.cache.insert(off, Table(entries, self.shift))
        self.metadata.add(off // self.cs)

    def _grow_table(self, needed: int) -> None:
        """Make the refcount table cover range ``needed``: a new, larger table in free space.

        The new table and the refcount blocks that count it go to a region past everything
        counted (whole refcount ranges that no block covers, so all of it is free); the blocks count
        themselves and the table. They are written and synced, then the header is switched and
        synced, then the old table's clusters are given back.
        """
        cs, epb = self.cs, self.per_block
        # Every cluster in use is counted, so ranges past the table hold nothing in use (at most
        # leftovers of an interrupted growth): the region starts at the first uncovered range.
        # (Not at the end of the file: a qcow2 image on a block device has no useful end.)
        k = max(len(self.rt), needed)
        per_cluster = cs // 8
        m = 1  # refcount blocks in the new region
        while True:
            entries = max(2 * len(self.rt), k + m + 1, needed + 1)
            entries = -(-entries // per_cluster) * per_cluster
            tclusters = entries // per_cluster
            need_m = -(-(m + tclusters) // epb)
            if need_m <= m:
                break
            m = need_m
        if entries * 8 > MAX_REFTABLE_BYTES:
            raise DiskError(f"{self.f.path}: the refcount table would exceed 8 MiB; the image is too large")
        area = k * epb  # first cluster of the new region
        total = m + tclusters
        self.guard(area * cs, total * cs)
        new_rt = array("Q", self.rt)
        new_rt.extend([0] * (entries - len(self.rt)))
        blocks = []
        for i in range(m):
            rb = self._empty()
            first = (k + i) * epb
            for c in range(max(area, first), min(area + total, first + epb)):
                rb[c - first] = 1
            blocks.append(rb)
            new_rt[k + i] = (area + i) * cs
        for i, rb in enumerate(blocks):
            self.f.pwrite(self._encode(rb), (area + i) * cs)
        table_off = (area + m) * cs
        self.f.pwrite(encode_u64(new_rt), table_off)
        self.f.sync()
        old_off, old_clusters = self.h.refcount_table_offset, self.h.refcount_table_clusters
        self.f.pwrite(struct.pack(">QI", table_off, tclusters), 48)  # refcount_table_offset, _clusters
        self.f.sync()
        self.h.refcount_table_offset, self.h.refcount_table_clusters = table_off, tclusters
        self.rt = new_rt
        for i, rb in enumerate(blocks):
            self.cache.insert((area + i) * cs, Table(rb, self.shift))
        self.metadata.update(range(area, area + total))
        self.free(old_off, old_clusters * cs)
