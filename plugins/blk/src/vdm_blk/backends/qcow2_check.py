"""The metadata check run before an image opened read-write is first written (like ``qemu-img check``).

:func:`check_metadata` walks every structure the image has -- the header cluster, the L1 table,
the refcount table and its blocks, the snapshot table and each snapshot's L1 table, every L2
table any of them reaches, and every data (and compressed) cluster those reach -- and counts the
references to each host cluster, the way QEMU's ``qemu-img check`` does (block/qcow2-refcount.c).
It raises :class:`DiskError` on the first problem, naming it and ``qemu-img check -r all``:

* a reference to a cluster at or past the end of the file;
* two different structures in one cluster (metadata on metadata, data on metadata), or one
  cluster used twice by a structure that is never shared (only L2 tables and data clusters
  are shared, by internal snapshots);
* a cluster whose refcount is lower than its references (a refcount of 0 for something in use
  is how guest data came to be allocated on top of a refcount block or an L2 table);
* a COPIED flag that disagrees with the refcount (COPIED means "refcount 1, write in place");
* misaligned or reserved-bit entries, a compressed entry with COPIED, a bad snapshot table.

Refcounts higher than the references (leaks, left by a crash) are fine: they waste space only.
The check only reads. Its cost is proportional to the metadata: each table is read once (an L2
table shared by several snapshots too) and every referenced cluster costs one dictionary entry;
unreferenced clusters cost nothing. It returns the host clusters holding metadata, so the
allocation guard can refuse any data write onto one of them later.
"""

from __future__ import annotations

import struct
from collections import Counter
from typing import Sequence

from .base import DiskError
from .protocol import Protocol
from .qcow2_header import COMPRESSED, COPIED, L1_RESERVED, L2_RESERVED, MAX_L1_BYTES, OFFSET_MASK, Qcow2Header
from .qcow2_refcounts import Refcounts
from .qcow2_tables import decode_u64

__all__ = ["MAX_SNAPSHOTS", "MAX_SNAPSHOT_TABLE_BYTES", "check_metadata"]

MAX_SNAPSHOTS = 65536  # QEMU's limits
MAX_SNAPSHOT_TABLE_BYTES = 1024 * MAX_SNAPSHOTS
_SNAP = struct.Struct(">QIHHIIQII")  # one snapshot table entry's fixed part (40 bytes)

HEADER, L1, REFTABLE, REFBLOCK, SNAPTABLE, SNAPL1, L2, DATA = range(8)
_NAMES = (
    "header",
    "L1 table",
    "refcount table",
    "refcount block",
    "snapshot table",
    "L1 table of a snapshot",
    "L2 table",
    "data cluster",
)
_SHARED = (L2, DATA)
FIX = "repair it with qemu-img check -r all (or open it read-only)"


class _Corrupt(Exception):
    pass


class _Walk:
    """References counted so far: host cluster -> count, and which kind of structure it is."""

    def __init__(self, cs: int, file_size: int) -> None:
        self.cs = cs
        self.file_size = file_size
        self.count: dict[int, int] = {}
        self.kind: dict[int, int] = {}
        self.copied: dict[int, bool] = {}  # active L2 tables and data: the COPIED flag seen

    def add(self, off: int, length: int, kind: int, what: str, times: int = 1) -> None:
        cs = self.cs
        first, last = off // cs, (off + length - 1) // cs
        if first * cs >= self.file_size or (off + length - self.file_size) >= cs:
            raise _Corrupt(f"{what} at 0x{off:x} is past the end of the file ({self.file_size} bytes)")
        for c in range(first, last + 1):
            k = self.kind.get(c)
            if k is None:
                self.kind[c] = kind
                self.count[c] = times
            elif k != kind or kind not in _SHARED:
                raise _Corrupt(f"{what} at 0x{off:x} overlaps the {_NAMES[k]} in cluster 0x{c * cs:x}")
            else:
                self.count[c] += times


def check_metadata(
    f: Protocol, h: Qcow2Header, l1: Sequence[int], refs: Refcounts, file_size: int
) -> set[int]:
    """Check the image's metadata (see the module documentation); return its metadata clusters.

    ``l1`` is the decoded active L1 table, ``refs`` the image's refcounts (as on disk: nothing
    allocated yet). Raises DiskError on the first problem.
    """
    try:
        return _check(f, h, l1, refs, file_size)
    except _Corrupt as e:
        raise DiskError(f"{f.path}: the image is corrupt: {e}; {FIX}") from None


def _check(f: Protocol, h: Qcow2Header, l1: Sequence[int], refs: Refcounts, file_size: int) -> set[int]:
    reftable = refs.rt
    cs = h.cluster_size
    w = _Walk(cs, file_size)
    w.add(0, cs, HEADER, "the header")
    w.add(h.refcount_table_offset, h.refcount_table_clusters * cs, REFTABLE, "the refcount table")
    for i, e in enumerate(reftable):
        if e:
            w.add(e, cs, REFBLOCK, f"refcount block {i} (refcount table entry {i})")
    if h.l1_size:
        w.add(h.l1_table_offset, h.l1_size * 8, L1, "the L1 table")
    # every L1 table: the active one, then each snapshot's
    l2_uses: Counter[int] = Counter()
    active_l2: dict[int, bool] = {}
    for i, e in enumerate(l1):
        off = e & OFFSET_MASK
        if e & L1_RESERVED or off % cs:
            raise _Corrupt(f"L1 entry {i} (0x{e:x}) has reserved bits set or is misaligned")
        if off:
            l2_uses[off] += 1
            active_l2[off] = bool(e & COPIED)
    for snap_l1 in _snapshot_l1s(f, h, w):
        for i, e in enumerate(snap_l1):
            off = e & OFFSET_MASK
            if off % cs:
                raise _Corrupt(f"snapshot L1 entry {i} (0x{e:x}) is misaligned")
            if off:
                l2_uses[off] += 1
    for off, times in l2_uses.items():
        w.add(off, cs, L2, f"the L2 table at 0x{off:x}", times)
        if off in active_l2:
            w.copied[off // cs] = active_l2[off]
    metadata = set(w.kind)  # everything so far is metadata; data comes next
    for off, times in l2_uses.items():
        _count_l2(f, h, w, off, times, off in active_l2)
    _compare(w, refs)
    return metadata


def _snapshot_l1s(f: Protocol, h: Qcow2Header, w: _Walk):
    """Count the snapshot table and each snapshot's L1 table; yield each decoded L1 table."""
    n = h.nb_snapshots
    if not n:
        return
    cs = h.cluster_size
    if n > MAX_SNAPSHOTS:
        raise _Corrupt(f"{n} snapshots, more than QEMU's limit of {MAX_SNAPSHOTS}")
    pos = h.snapshots_offset
    entries = []
    for i in range(n):
        raw = f.pread(_SNAP.size, pos)
        if len(raw) < _SNAP.size:
            raise _Corrupt(f"snapshot {i} is past the end of the file")
        l1_off, l1_size, id_len, name_len, _, _, _, _, extra = _SNAP.unpack(raw)
        pos += -(-(_SNAP.size + extra + id_len + name_len) // 8) * 8
        if pos - h.snapshots_offset > MAX_SNAPSHOT_TABLE_BYTES:
            raise _Corrupt(f"the snapshot table is larger than {MAX_SNAPSHOT_TABLE_BYTES} bytes")
        if l1_off % cs or l1_size * 8 > MAX_L1_BYTES:
            raise _Corrupt(f"snapshot {i}'s L1 table (0x{l1_off:x}, {l1_size} entries) is invalid")
        entries.append((l1_off, l1_size))
    w.add(h.snapshots_offset, pos - h.snapshots_offset, SNAPTABLE, "the snapshot table")
    for i, (l1_off, l1_size) in enumerate(entries):
        if not l1_size:
            continue
        w.add(l1_off, l1_size * 8, SNAPL1, f"snapshot {i}'s L1 table")
        yield decode_u64(f.pread(l1_size * 8, l1_off))


def _count_l2(f: Protocol, h: Qcow2Header, w: _Walk, off: int, times: int, active: bool) -> None:
    """Count what one L2 table references, ``times`` over (once per L1 table that reaches it)."""
    cs = h.cluster_size
    raw = f.pread(cs, off)
    if len(raw) < cs:
        raise _Corrupt(f"the L2 table at 0x{off:x} is past the end of the file")
    csize_shift = 62 - (h.cluster_bits - 8)
    csize_mask = (1 << (h.cluster_bits - 8)) - 1
    coffset_mask = (1 << csize_shift) - 1
    add = w.add
    kinds, counts, copied = w.kind, w.count, w.copied
    cbits, file_size = h.cluster_bits, w.file_size
    odd = COMPRESSED | L2_RESERVED | (cs - 1)  # anything but a plain aligned entry
    for i, e in enumerate(decode_u64(raw)):
        if not e:
            continue
        host = e & OFFSET_MASK
        if not e & odd and host < file_size:  # the common case, inline: one data cluster
            if not host:
                continue
            c = host >> cbits
            k = kinds.get(c)
            if k is None:
                kinds[c] = DATA
                counts[c] = times
            elif k == DATA:
                counts[c] += times
            else:
                add(host, cs, DATA, f"data cluster (L2 table 0x{off:x} entry {i})", times)  # raises
            if active:
                copied[c] = bool(e & COPIED)
            continue
        where = f"data cluster (L2 table 0x{off:x} entry {i})"
        if e & COMPRESSED:
            if e & COPIED:
                raise _Corrupt(f"compressed {where} has the COPIED flag")
            coff = e & coffset_mask
            nsect = ((e >> csize_shift) & csize_mask) + 1
            add(coff, (coff & ~511) + nsect * 512 - coff, DATA, f"compressed {where}", times)
            continue
        if e & L2_RESERVED:
            raise _Corrupt(f"{where} (0x{e:x}) has reserved bits set")
        if not host:
            continue
        if host % cs:
            raise _Corrupt(f"{where} at 0x{host:x} is not cluster aligned")
        add(host, cs, DATA, where, times)  # past the end of the file: raises
        if active:
            copied[host // cs] = bool(e & COPIED)


def _compare(w: _Walk, refs: Refcounts) -> None:
    cs = w.cs
    copied = w.copied
    per_block = refs.per_block
    block_i, block = -1, None
    for c, n in w.count.items():
        rti, j = divmod(c, per_block)
        if rti != block_i:  # clusters come mostly in order: one block lookup per run
            block_i, block = rti, refs.block_entries(rti)
        rc = 0 if block is None else block[j]
        name = _NAMES[w.kind[c]]
        if rc < n:
            raise _Corrupt(f"the {name} in cluster 0x{c * cs:x} has refcount {rc} but {n} references")
        flag = copied.get(c)
        if flag is not None and flag != (rc == 1):
            which = "the COPIED flag (refcount 1 only)" if flag else "no COPIED flag (needed at refcount 1)"
            raise _Corrupt(f"the {name} in cluster 0x{c * cs:x} has refcount {rc} and {which}")
