"""The cluster map of a qcow2 image: L1/L2 lookup, L2 tables created and copied on write,
extents of a guest range, and the guard that keeps data off metadata.

:class:`ClusterMap` is mixed into :class:`.qcow2.Qcow2Disk` (refcounts are in
:mod:`.qcow2_refcounts`, zeroing in :mod:`.qcow2_zero`); it uses the image's attributes set at
open (``f`` the protocol, ``h`` the header, ``l1``, ``cs``, ``cbits``, ``l2_bits``, ``refs``,
``_l2`` the L2 cache, ``_meta`` the metadata lock, ``_meta_clusters``, ``_pending_free``).
Every method here that reads or changes a table runs with the metadata lock held by its caller,
except :meth:`ClusterMap._enter_io` and :meth:`ClusterMap.refcount`, which take it.
"""

from __future__ import annotations

from array import array

from .base import DiskError
from .qcow2_header import (
    COMPRESSED,
    COMPRESSED_KIND,
    COPIED,
    DATA,
    L2_RESERVED,
    NOT_PLAIN,
    OFFSET_MASK,
    UNALLOC,
    ZERO,
    ZERO_FLAG,
)
from .qcow2_tables import Table, decode_u64, encode_u64

__all__ = ["ClusterMap"]


class _Extent:
    """A run of guest bytes with one kind of mapping (contiguous on the host for DATA)."""

    __slots__ = ("entry", "host", "kind", "length")

    def __init__(self, kind: int, length: int, host: int, entry: int) -> None:
        self.kind = kind
        self.length = length
        self.host = host
        self.entry = entry


class ClusterMap:
    """L1/L2 mapping of guest clusters (mixed into Qcow2Disk; see the module documentation)."""

    # ---- tables ----------------------------------------------------------------------------------

    def _corrupt(self, what: str) -> DiskError:
        return DiskError(f"{self.path}: the image is corrupt: {what}; check it with qemu-img check")

    def _load_l2(self, off: int) -> Table:
        t = self._l2.get(off)
        if t is not None:
            return t
        raw = self.f.pread(self.cs, off)
        if len(raw) < self.cs:
            raise self._corrupt(f"L2 table at 0x{off:x} is past the end of the file")
        t = Table(decode_u64(raw), self._l2_shift)
        self._l2.insert(off, t)
        return t

    def _write_l2_evicted(self, off: int, t: Table) -> None:
        """A dirty L2 table leaves the cache: write back every dirty L2 table at once.

        The refcounts and the data of what they reference reach the disk first (written and
        synced); writing all of them makes that sync pay for many evictions instead of one.
        """
        self.refs.write_dirty()
        self.f.sync()
        for o, other in self._l2.items():
            if other.dirty:
                for pos, raw in self._l2_pieces(o, other):
                    self.f.pwrite(raw, pos)
                other.chunks.clear()
                other.writes += 1

    def _l2_pieces(self, off: int, t: Table) -> list[tuple[int, bytes]]:
        """(file offset, bytes) of the stale pieces of an L2 table, contiguous ones merged."""
        per = 1 << self._l2_shift
        return [
            (off + first * self._l2_chunk, encode_u64(t.entries[first * per : (first + count) * per]))
            for first, count in t.dirty_runs()
        ]

    def _l2_for(self, gc: int, create: bool) -> Table | None:
        """The L2 table mapping guest cluster ``gc``; with ``create``, allocate a missing one."""
        l1i = gc >> self.l2_bits
        if l1i >= len(self.l1):
            raise self._corrupt(f"guest cluster {gc} is beyond the L1 table")
        e = self.l1[l1i]
        off = e & OFFSET_MASK
        if off:
            if create and not e & COPIED:
                return self._copy_l2(l1i, off)
            return self._load_l2(off)
        if not create:
            return None
        new = self.refs.alloc()
        self._meta_clusters.add(new >> self.cbits)
        # a new table past the end of the file: extend the file over it (it reads zeros), and
        # only the pieces that get entries are written; one inside the file is written whole
        past_end = new >= self.f.size()
        if past_end:
            self.f.truncate(new + self.cs)
        t = Table(array("Q", bytes(self.cs)), self._l2_shift, dirty=not past_end)
        self._l2.insert(new, t)
        self.l1[l1i] = new | COPIED
        self._l1_dirty[l1i] = new | COPIED
        return t

    def _copy_l2(self, l1i: int, off: int) -> Table:
        """Copy-on-write of an L2 table shared with internal snapshots (its L1 entry lacks COPIED).

        The copy references the same data clusters, whose refcounts already count every L1 table
        that reaches them; COPIED stays only on entries whose cluster has refcount 1, so writes
        to shared clusters copy them first. The old table loses one reference after the flush
        that makes the new one durable.
        """
        old = self._load_l2(off)
        entries = array("Q", old.entries)
        for i, e in enumerate(entries):
            if e & COPIED and (e & COMPRESSED or self.refs.get((e & OFFSET_MASK) // self.cs) != 1):
                entries[i] = e & ~COPIED
        new = self.refs.alloc()
        self._meta_clusters.add(new >> self.cbits)
        t = Table(entries, self._l2_shift, dirty=True)
        self._l2.insert(new, t)
        self.l1[l1i] = new | COPIED
        self._l1_dirty[l1i] = new | COPIED
        self._pending_free.append((off, self.cs))
        return t

    def _classify(self, entry: int) -> tuple[int, int]:
        """(kind, host offset) of an L2 entry."""
        if entry & COMPRESSED:
            return COMPRESSED_KIND, 0
        if entry & L2_RESERVED:
            raise self._corrupt(f"L2 entry 0x{entry:x} has reserved bits set")
        host = entry & OFFSET_MASK
        if host % self.cs:
            raise self._corrupt(f"L2 entry 0x{entry:x} is not cluster aligned")
        if entry & ZERO_FLAG:
            if self.version < 3:
                raise self._corrupt(f"L2 entry 0x{entry:x} has the zero flag in a version 2 image")
            return ZERO, host
        if host == 0:
            return UNALLOC, 0
        return DATA, host

    def _extents(self, offset: int, length: int) -> list[_Extent]:
        """Map a guest range to extents; adjacent ones of the same kind (and contiguous) merge."""
        out: list[_Extent] = []
        cs = self.cs
        table: Table | None = None
        table_l1i = -1
        while length:
            gc = offset >> self.cbits
            within = offset & (cs - 1)
            n = min(length, cs - within)
            l1i = gc >> self.l2_bits
            if l1i != table_l1i:
                table = self._l2_for(gc, False)
                table_l1i = l1i
                shared = not self.l1[l1i] & COPIED  # a snapshot's table: nothing in it is ours alone
            entry = table.entries[gc & self.l2_mask] if table is not None else 0
            if shared:
                entry &= ~COPIED
            kind, host = self._classify(entry)
            last = out[-1] if out else None
            if kind == DATA:
                host += within
                if (
                    last is not None
                    and last.kind == DATA
                    and last.host + last.length == host
                    and (last.entry & COPIED) == (entry & COPIED)
                ):
                    last.length += n
                else:
                    out.append(_Extent(DATA, n, host, entry))
            elif kind in (ZERO, UNALLOC) and last is not None and last.kind == kind:
                last.length += n
            else:
                out.append(_Extent(kind, n, host, entry))
            offset += n
            length -= n
        return out

    def refcount(self, host_offset: int) -> int:
        """The refcount of the host cluster containing ``host_offset`` (for tests and tools)."""
        with self._meta:
            return self.refs.get(host_offset // self.cs)

    def _enter_io(self, offset: int, length: int) -> int:
        """Wait for and enter the shared side of the I/O lock and map the range, in one critical
        section: the host offset of a range that lies in one contiguous run of allocated,
        unshared data clusters (:meth:`_mapped`), or 0 for anything else (the caller maps it
        under the metadata lock); the shared side is held either way, except after a DiskError
        (a table that cannot be read). The inline path (:mod:`.qcow2_inline`) does the same
        without waiting."""
        io = self._io
        with self._meta:
            io.wait_shared()
            host = self._mapped(offset, length)
            io.active.append(True)
            if host and self._step is not None:
                self._remember(offset, length, host)
        return host

    def _mapped(self, offset: int, length: int) -> int:
        """The host offset of a range that lies in one contiguous run of allocated, unshared
        data clusters mapped by one L2 table (metadata lock held); else 0.

        A run is found without a step per cluster: its first and last entries must be usable
        and ``n`` clusters apart on the host, and (more than two clusters) the entries between
        them equal to that progression (compared in C). Any entry with reserved, zero or
        compressed bits, without COPIED, or misaligned makes it 0: the general path, which
        classifies every entry and reports corruption, serves it."""
        cbits = self.cbits
        gc = offset >> cbits
        l1i = gc >> self.l2_bits
        n = ((offset + length - 1) >> cbits) - gc if length else 0
        l1 = self.l1
        if l1i >= len(l1) or (gc + n) >> self.l2_bits != l1i:
            return 0
        e = l1[l1i]
        off = e & OFFSET_MASK
        if not e & COPIED or not off:
            return 0
        tables = self._l2_tables
        t = tables.get(off)
        if t is None:
            t = self._load_l2(off)
        else:
            tables.move_to_end(off)  # (TableCache.get, without two calls)
        entries = t.entries
        i = gc & self.l2_mask
        entry = entries[i]
        host = entry & OFFSET_MASK
        # one test: COPIED, no compressed/zero/reserved bit, cluster aligned (then host != 0)
        if entry & self._plain_mask != COPIED or not host:
            return 0  # everything else (and anything odd) takes the general path, which checks it
        if n:
            last = entries[i + n]
            if last & NOT_PLAIN or last != entry + (n << cbits):
                return 0
            if n > 1 and entries[i : i + n + 1] != array("Q", range(entry, last + 1, 1 << cbits)):
                return 0
        return host + (offset & ((1 << cbits) - 1))

    def _check_data_host(self, host: int, length: int) -> None:
        """Refuse a data write that would land on metadata: the header, the L1 table, the
        refcount table, and (in an image opened read-write) every other metadata cluster -- L2
        tables, refcount blocks, the snapshot table and snapshots' L1 tables.

        In an image opened read-write the metadata clusters found by the check (and kept up to
        date as tables are allocated, moved and freed) include the header, L1 table and refcount
        table clusters: one set test covers them all. Without that set (nothing checked) the
        three are tested from the header."""
        cbits = self.cbits
        meta = self._meta_clusters
        if meta:
            if not meta.isdisjoint(range(host >> cbits, ((host + length - 1) >> cbits) + 1)):
                raise self._corrupt(f"guest data maps onto metadata at 0x{host:x}")
            return
        h = self.h
        for start, size in (
            (0, self.cs),
            (h.l1_table_offset, len(self.l1) * 8),
            (h.refcount_table_offset, h.refcount_table_clusters * self.cs),
        ):
            if host < start + size and start < host + length:
                raise self._corrupt(f"guest data maps onto metadata at 0x{host:x}")
