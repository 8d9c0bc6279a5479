"""qcow2 images, read-write, versions 2 and 3 (QEMU's docs/interop/qcow2.txt).

What is supported
    L1/L2 mapping with a bounded L2 cache; refcounts of every width (refcount_order 0..6);
    allocation of data clusters, L2 tables and refcount blocks, growing the refcount table;
    backing files (read through, whole-cluster copy-on-write on partial writes); zero clusters
    (v3) and preallocated zero clusters; reading compressed (zlib) clusters, and overwriting or
    discarding them; discard and write-zeroes; images with internal snapshots (the snapshots
    are kept: shared L2 tables and data clusters are copied on write, by refcount and the
    COPIED flags; vdm does not create, apply or delete snapshots).

What is refused at open (DiskError, nothing written)
    bad magic, versions other than 2 and 3, encryption, external data files, non-zlib
    compression, extended L2 entries (subclusters), unknown incompatible features, the corrupt
    bit, the dirty bit (lazy refcounts not written back: run ``qemu-img check -r all``; vdm does
    not rebuild refcounts), truncated or misaligned tables, an L1 table too small for the virtual
    size, cluster sizes outside 512 B..2 MiB, and opening read-write an image with
    persistent dirty bitmaps (vdm would invalidate them; other autoclear bits are cleared, as
    the specification asks of a writer that does not maintain them).
    An image with the lazy-refcounts compatible bit is fine: vdm always keeps refcounts exact.
    Opened read-write, the image's metadata is checked first, as ``qemu-img check`` does
    (:mod:`.qcow2_check`): references past the end of the file, overlapping structures,
    refcounts lower than the references and wrong COPIED flags are refused, naming the problem
    and ``qemu-img check -r all``. Later, no data cluster is written onto any metadata cluster.

Protocols
    The image is read and written through a :class:`~.protocol.Protocol` (``f``): a local file,
    an NBD export, ... Clusters are allocated inside the protocol's size where refcounts say they
    are free; a protocol of a fixed size (an NBD export) cannot grow, so an allocation past its end
    fails that request with a DiskError naming the fix (give the export room: ``qemu-img resize``
    or ``truncate -s`` its file). A backing file is opened only for a local image.

Data path
    A request inside one run of contiguous, allocated, unshared host clusters (every request of
    an image ``qemu-img convert`` wrote) is mapped in one step (:meth:`ClusterMap._mapped`) and is
    one ``preadv``/``pwritev``. Anything else: the request is mapped to extents under the
    metadata lock, and allocated extents are read with one ``preadv`` per run. Reads that need
    no waiting (page-cached data, clusters that read as zeros) are served on the caller's thread
    (``readv_nowait``, :mod:`.qcow2_inline`), as raw serves them; the rest go to a worker.
    With the compiled serve step (vdm_blk.fastserve's :class:`Qcow2Step`, a local buffered file),
    every run found mapped (and not on metadata) is remembered in the step's map, and later reads
    and small write-back writes inside remembered, host-contiguous clusters are served in C on the
    queue thread; the exclusive side of the I/O lock (discard, write zeroes, giving clusters back,
    reloading), a hand-over and close first stop the step and clear its map (``_gate_step``).
    ``writev`` to clusters that are already allocated (and not shared) is one ``pwritev`` per run.
    Other writes allocate under the metadata lock: a whole-cluster write goes straight from the
    caller's buffers; a partial one builds the cluster (old data, backing data, zeros or the
    decompressed cluster, then the new bytes) and writes it whole -- except a cluster that reads
    as zeros placed past the end of the file, where only the new bytes are written and the file
    is extended over the rest.

Metadata and crash safety
    L2 tables and refcount blocks are cached (bounded, LRU) and written back, as QEMU does, but
    only the pieces (pages) that changed: a flush costs what changed, not the table sizes (2 MiB
    each with 2 MiB clusters). Refcounts narrower than a byte stay packed in memory. A new L2
    table past the end of the file extends the file (zeros) instead of being written whole. The
    ordering invariant is "a reference is never on disk before the refcount that covers it":

    1. refcount increments (new clusters) are written first, and ``fdatasync``-ed,
    2. then the L2 tables and L1 entries that reference the new clusters, then ``fdatasync``,
    3. only after that are clusters that those L2 writes unreferenced given back (refcount
       decrements); before then they keep refcount 1 and are never reused.

    ``flush`` does 1-3 (and the data written before it is durable too). A dirty L2 table pushed
    out of the cache does 1 first (data included), then writes back every dirty L2 table, so one
    sync serves many evictions. A new refcount block is written and synced before the
    refcount table entry that points to it; a grown refcount table is written and synced before
    the header points to it. After a crash (the process killed; the ordering is meant to hold
    for power loss too, given a disk that honours fdatasync), ``qemu-img check`` finds no
    corruption; it may find *leaked* clusters (refcount 1, unreferenced): clusters
    allocated for writes since the last flush, and clusters freed since the last flush.
    ``qemu-img check -r leaks`` reclaims them. Every write acknowledged before the last completed
    ``flush`` reads back.

Handover (``lock=start``: live migration between two backends on one image)
    Metadata is read again at device start and all written back at stop (:mod:`.qcow2_handover`).

Concurrency
    A metadata lock guards the tables and caches. Data I/O to clusters found allocated runs
    outside it, under the shared side of an I/O lock (:mod:`.qcow2_iolock`, whose state the
    metadata lock guards, so mapping and entering it is one critical section); discard,
    write-zeroes and giving clusters back take the exclusive side, so no request in flight can
    still be using a cluster that is freed and reused.
"""

from __future__ import annotations

import logging
import struct
import threading
import zlib
from typing import Callable, Optional, Sequence

from vdm.sg import fill_zero, gather_into, scatter, split_views, total_length

from .base import SECTOR, DiskBackend, DiskError
from .hostfile import HostFile
from .locking import deferred_locks
from .protocol import Protocol
from .qcow2_check import check_metadata
from .qcow2_clusters import ClusterMap, _Extent
from .qcow2_handover import Handover
from .qcow2_header import (
    COMPAT_LAZY_REFCOUNTS,
    COMPRESSED_KIND,
    COPIED,
    DATA,
    L1_RESERVED,
    NOT_PLAIN,
    OFFSET_MASK,
    UNALLOC,
    ZERO,
    read_header,
)
from .qcow2_inline import InlinePath
from .qcow2_iolock import IOLock
from .qcow2_refcounts import Refcounts
from .qcow2_step import StepMap
from .qcow2_tables import CHUNK, TableCache, decode_u64
from .qcow2_zero import Zeroing

__all__ = ["Qcow2Disk"]

log = logging.getLogger(__name__)

L2_CACHE_BYTES = 32 << 20
REFBLOCK_CACHE_BYTES = 8 << 20
MIN_CACHE_TABLES = 16


BackingOpener = Callable[[str, Optional[str]], DiskBackend]


class Qcow2Disk(InlinePath, ClusterMap, Zeroing, Handover, StepMap, DiskBackend):
    """A qcow2 image (see the module documentation for what is supported and guaranteed)."""

    supports_discard = True
    supports_write_zeroes = True

    def __init__(
        self,
        path: str,
        *,
        read_only: bool = False,
        direct: bool = False,
        writethrough: bool = False,
        open_backing: BackingOpener | None = None,
        file: Protocol | None = None,
    ) -> None:
        self.path = path
        self.read_only = read_only
        #: the protocol the image is read through (a local path: the file protocol)
        self.f = (
            file
            if file is not None
            else HostFile(path, read_only=read_only, direct=direct, writethrough=writethrough)
        )
        self.backing: DiskBackend | None = None
        self._closed = False
        try:
            self._open(open_backing)
        except BaseException:
            if self.backing is not None:
                self.backing.close()
            self.f.close()
            raise

    def __str__(self) -> str:
        return self.path

    # ---- open ------------------------------------------------------------------------------------

    def _open(self, open_backing: BackingOpener | None) -> None:
        self._meta = threading.RLock()
        self._io = IOLock(self._meta)
        #: the compiled serve step (vdm_blk.fastserve.Qcow2Step), made by serve_step(); its map is
        #: blocked and cleared by the exclusive side of the I/O lock (IOLock.on_exclusive)
        self._step = None
        self._io.on_exclusive = self._gate_step
        self._flush_lock = threading.Lock()
        deferred = deferred_locks()
        #: lock=start and the device not started: the metadata may be stale, nothing is served
        self._inactive = deferred is not None
        self._load(check=not self.read_only and not self._inactive)
        # backing file: opened as the header says, never probed
        h = self.h
        if h.backing_file is not None:
            if open_backing is None:
                raise DiskError(
                    f"{self.path}: has a backing file ({h.backing_file}) but none may be opened here"
                )
            self.backing = open_backing(h.backing_file, h.backing_format)
        self._check_bitmaps()
        if not self._inactive:
            self._clear_autoclear()
        if h.compatible_features & COMPAT_LAZY_REFCOUNTS:
            log.debug("%s: lazy refcounts are allowed by the image; vdm keeps refcounts exact", self.path)
        if deferred is not None:
            deferred.on_start_stop(self.invalidate, self.inactivate)

    def _load(self, check: bool) -> None:
        """Read (again) the header, L1 table and refcount table; empty caches; ``check``: the
        metadata check of a read-write open. Callers hold the locks or are the constructor."""
        file_size = self.f.size()
        h = self.h = read_header(self.f, file_size)
        self.version = h.version
        self.size = h.size
        self.cbits = h.cluster_bits
        self.cs = cs = h.cluster_size
        self.l2_bits = h.cluster_bits - 3
        self.l2_mask = (1 << self.l2_bits) - 1
        #: an L2 entry ANDed with this is COPIED exactly for a plain, unshared, aligned data cluster
        self._plain_mask = COPIED | NOT_PLAIN | ((cs - 1) & OFFSET_MASK)
        self.physical_block_size = min(cs, 4096)
        self.optimal_io_size = cs
        self.logical_block_size = SECTOR
        self.supports_discard = self.supports_write_zeroes = not self.read_only
        # compressed cluster descriptors
        self.csize_shift = 62 - (h.cluster_bits - 8)
        self.csize_mask = (1 << (h.cluster_bits - 8)) - 1
        self.coffset_mask = (1 << self.csize_shift) - 1
        # L1 table
        raw = self.f.pread(h.l1_size * 8, h.l1_table_offset)
        self.l1 = decode_u64(raw)
        for i, e in enumerate(self.l1):
            off = e & OFFSET_MASK
            if e & L1_RESERVED or off % cs or (off and off + cs > file_size):
                raise DiskError(
                    f"{self.path}: not a usable qcow2 image: L1 entry {i} (0x{e:x}) is invalid or points "
                    "past the end of the file; check it with qemu-img check"
                )
        self._l1_dirty: dict[int, int] = {}
        self._l2_chunk = min(CHUNK, cs)
        self._l2_shift = self._l2_chunk.bit_length() - 1 - 3  # L2 entries per piece written back
        # caches
        self._l2 = TableCache(max(MIN_CACHE_TABLES, L2_CACHE_BYTES // cs), self._write_l2_evicted)
        self._l2_tables = self._l2.tables  # (read by the data path's lookup)
        self.refs = Refcounts(
            self.f, h, max(MIN_CACHE_TABLES, REFBLOCK_CACHE_BYTES // cs), self._check_data_host, self._corrupt
        )
        # host clusters holding metadata (known after the check); no data is ever written there
        self._meta_clusters: set[int] = set()
        if check:  # before anything is written, the autoclear bits included
            self._meta_clusters = check_metadata(self.f, h, self.l1, self.refs, file_size)
            self.refs.metadata = self._meta_clusters
        self._pending_free: list[tuple[int, int]] = []
        self._zcache: tuple[int, bytes] | None = None  # last decompressed cluster

    # ---- reading ---------------------------------------------------------------------------------

    def _live(self) -> None:
        if self._closed or self._inactive:
            what = "closed" if self._closed else "handed over (lock=start: its device is not started)"
            raise DiskError(f"{self.path}: the disk is {what}")

    def readv(self, offset: int, buffers: Sequence[memoryview]) -> int:
        self._live()
        total = total_length(buffers)
        self.check_range(offset, total)
        host = self._enter_io(offset, total)
        try:
            if host:  # the common case: one run of contiguous allocated clusters
                self.f.preadv(buffers, host)
                return total
            with self._meta:
                extents = self._extents(offset, total)
            if len(extents) == 1:
                self._read_extent(extents[0], offset, buffers)
            else:
                pos = offset
                for ext, views in zip(extents, split_views(buffers, [e.length for e in extents])):
                    self._read_extent(ext, pos, views)
                    pos += ext.length
        finally:
            self._io.release_shared()
        return total

    def _read_extent(self, ext: _Extent, pos: int, views: Sequence[memoryview]) -> None:
        if ext.kind == DATA:
            self.f.preadv(views, ext.host)
        elif ext.kind == ZERO:
            fill_zero(views)
        elif ext.kind == UNALLOC:
            self._read_backing(pos, views)
        else:
            scatter(memoryview(self._decompress(ext.entry))[pos & (self.cs - 1) :], views)

    def _read_backing(self, pos: int, views: Sequence[memoryview]) -> None:
        b = self.backing
        n = total_length(views)
        if b is None or pos >= b.size:
            fill_zero(views)
        elif pos + n <= b.size - b.size % SECTOR:
            b.readv(pos, views)
        else:
            tmp = bytearray(n)
            b.read_clipped(pos, memoryview(tmp))
            scatter(tmp, views)

    def _decompress(self, entry: int) -> bytes:
        z = self._zcache
        if z is not None and z[0] == entry:
            return z[1]
        off = entry & self.coffset_mask
        nsect = ((entry >> self.csize_shift) & self.csize_mask) + 1
        end = (off & ~(SECTOR - 1)) + nsect * SECTOR
        raw = self.f.pread(end - off, off)
        try:
            d = zlib.decompressobj(-12)
            data = d.decompress(raw, self.cs)
        except zlib.error as e:
            raise self._corrupt(f"compressed cluster at 0x{off:x} does not decompress ({e})")
        if len(data) < self.cs:
            raise self._corrupt(f"compressed cluster at 0x{off:x} decompresses to {len(data)} bytes")
        self._zcache = (entry, data)
        return data

    def _cluster_content(self, gc: int, entry: int) -> bytearray:
        """The current content of guest cluster ``gc`` (for copy-on-write)."""
        kind, host = self._classify(entry)
        buf = bytearray(self.cs)
        view = memoryview(buf)
        if kind == DATA:
            self.f.preadv([view], host)
        elif kind == UNALLOC:
            self._read_backing(gc << self.cbits, [view])
        elif kind == COMPRESSED_KIND:
            buf[:] = self._decompress(entry)
        return buf

    # ---- writing ---------------------------------------------------------------------------------

    def writev(self, offset: int, buffers: Sequence[memoryview]) -> int:
        self._live()
        total = total_length(buffers)
        self.check_range(offset, total, write=True)
        host = self._enter_io(offset, total)
        try:
            if host:
                self._check_data_host(host, total)
                self.f.pwritev(buffers, host)
                return total
            with self._meta:
                extents = self._extents(offset, total)
            pos = offset
            groups = [buffers] if len(extents) == 1 else split_views(buffers, [e.length for e in extents])
            for ext, views in zip(extents, groups):
                if ext.kind == DATA and ext.entry & COPIED:
                    self._check_data_host(ext.host, ext.length)
                    self.f.pwritev(views, ext.host)
                else:
                    self._write_clusters(pos, views)
                pos += ext.length
        finally:
            self._io.release_shared()
        return total

    def _write_clusters(self, pos: int, views: Sequence[memoryview]) -> None:
        """Write a range that needs allocation, one guest cluster at a time."""
        cs = self.cs
        lengths = []
        p, end = pos, pos + total_length(views)
        while p < end:
            n = min(end - p, cs - (p & (cs - 1)))
            lengths.append(n)
            p += n
        for n, group in zip(lengths, split_views(views, lengths)):
            with self._meta:
                self._write_one(pos, group)
            pos += n

    def _write_one(self, pos: int, views: Sequence[memoryview]) -> None:
        """Write within one guest cluster, allocating it if needed (metadata lock held)."""
        cs = self.cs
        gc = pos >> self.cbits
        within = pos & (cs - 1)
        n = total_length(views)
        table = self._l2_for(gc, True)
        assert table is not None
        idx = gc & self.l2_mask
        entry = table.entries[idx]
        kind, host = self._classify(entry)
        if kind == DATA and entry & COPIED:  # allocated meanwhile by another request
            self._check_data_host(host + within, n)
            self.f.pwritev(views, host + within)
            return
        free_old: tuple[int, int] | None = None
        if kind == ZERO and host and entry & COPIED:
            new = host  # preallocated zero cluster: reuse it
        else:
            new = self.refs.alloc()
            if kind == COMPRESSED_KIND:
                coff = entry & self.coffset_mask
                nsect = ((entry >> self.csize_shift) & self.csize_mask) + 1
                free_old = (coff & ~(SECTOR - 1), nsect * SECTOR)
            elif host:
                free_old = (host, cs)
        reads_zero = kind == ZERO or (
            kind == UNALLOC and (self.backing is None or (gc << self.cbits) >= self.backing.size)
        )
        if within == 0 and n == cs:
            self.f.pwritev(views, new)
        elif reads_zero and new >= self.f.size():
            # a fresh cluster past the end of the file reads zeros already: write only the new
            # bytes, then extend the file over the whole cluster (metadata lock held: nothing
            # else writes past the end meanwhile)
            self.f.pwritev(views, new + within)
            if self.f.size() < new + cs:
                self.f.truncate(new + cs)
        else:
            buf = self._cluster_content(gc, entry) if not reads_zero else bytearray(cs)
            gather_into(buf, views, within)
            self.f.pwritev([memoryview(buf)], new)
        table.entries[idx] = new | COPIED
        table.touch(idx)
        if free_old is not None:
            self._pending_free.append(free_old)

    # ---- flush and close -------------------------------------------------------------------------

    def flush(self) -> None:
        """Make every completed write durable (the ordering is in the module documentation)."""
        self._live()
        if self.read_only:
            return
        with self._flush_lock:
            with self._meta:
                self.refs.write_dirty()
                snap = [
                    (off, t, t.writes, dict(t.chunks), self._l2_pieces(off, t))
                    for off, t in self._l2.items()
                    if t.dirty
                ]
                l1 = dict(self._l1_dirty)
                frees = self._pending_free
                self._pending_free = []
            try:
                self._flush_tables(snap, l1)
            except BaseException:
                with self._meta:  # not known to be unreferenced on disk yet: keep them for later
                    self._pending_free[:0] = frees
                raise
            if frees:
                self._io.acquire_exclusive()
                try:
                    with self._meta:
                        for off, length in frees:
                            self.refs.free(off, length)
                        self.refs.write_dirty()
                finally:
                    self._io.release_exclusive()

    def _flush_tables(self, snap: list, l1: dict[int, int]) -> None:
        """The rest of step 1, and step 2, of a flush: sync, write the L2/L1 snapshot, sync."""
        self.f.sync()  # data and refcounts
        if snap or l1:
            with self._meta:
                for off, t, writes, chunks, pieces in snap:
                    if self._l2.peek(off) is not t or t.writes != writes:
                        continue  # written meanwhile (evictions), with newer content
                    for pos, raw in pieces:
                        self.f.pwrite(raw, pos)
                    for c, gen in chunks.items():
                        if t.chunks.get(c) == gen:  # not changed again since the snapshot
                            del t.chunks[c]
                for i, e in l1.items():
                    self.f.pwrite(struct.pack(">Q", e), self.h.l1_table_offset + i * 8)
                    if self._l1_dirty.get(i) == e:
                        del self._l1_dirty[i]
            self.f.sync()

    def close(self) -> None:
        if self._closed:
            return
        try:
            if not self.read_only and not self._inactive:  # inactive: written back at stop already
                self.flush()
                with self._meta:
                    if self.refs.write_dirty():
                        self.f.sync()
        finally:
            self._closed = True
            if self._step is not None:
                self._step.close()
            if self.backing is not None:
                self.backing.close()
            self.f.close()
