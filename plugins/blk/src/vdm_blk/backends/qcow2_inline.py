"""The inline data path of a qcow2 image: requests served on the caller's thread (issue 18).

:class:`InlinePath` is mixed into :class:`.qcow2.Qcow2Disk`. A device calls ``readv_nowait`` and
``writev_inline`` on its queue thread before handing a request to a worker; they serve only what
needs no waiting and return None for anything else, having changed nothing the guest can see:
reads of allocated clusters from the page cache (one call for a run of contiguous clusters,
found in one step by :meth:`ClusterMap._mapped`; else one per extent) and of clusters that read
as zeros; writes (small, buffered) inside one run of contiguous, allocated, unshared clusters.
The range checks are those of ``check_range``; the shared side of the I/O lock is held across
the system calls, as in ``readv``/``writev``; a write is refused on metadata clusters as
everywhere (``_check_data_host``); a corrupt entry is left to the general path to report.
"""

from __future__ import annotations

from typing import Sequence

from vdm.sg import fill_zero, split_views, total_length

from .base import SECTOR, DiskError
from .qcow2_header import COMPRESSED_KIND, DATA, UNALLOC

__all__ = ["InlinePath"]


class InlinePath:
    """readv_nowait / writev_inline (mixed into Qcow2Disk; see the module documentation)."""

    def readv_nowait(self, offset: int, buffers: Sequence[memoryview]) -> int | None:
        """A read that needs no waiting, served on the caller's thread: one run of contiguous
        allocated clusters (a 1 MiB read of a converted image is one) from the page cache in one
        call; else, extent by extent, allocated clusters from the page cache and clusters that
        read as zeros (zero flag, or unallocated without a backing file) filled here. None for
        anything else (compressed clusters, a backing file, a page not cached, an entry the
        general path must report as corrupt): the device then uses a worker."""
        if self._closed or self._inactive:
            return None
        total = total_length(buffers)
        if offset < 0 or offset % SECTOR or total % SECTOR or offset + total > self.size:
            self.check_range(offset, total)  # (raises, saying why)
        io = self._io
        extents = None
        with self._meta:  # (ClusterMap._enter_io, inlined: the hottest path)
            if io.writer or io.waiting:
                return None
            host = self._mapped(offset, total)
            if host and self._step is not None:
                self._remember(offset, total, host)
            if not host:
                try:
                    extents = self._extents(offset, total)
                except DiskError:  # (the worker's readv reports it)
                    return None
                for ext in extents:  # (kinds: DATA, ZERO, UNALLOC, COMPRESSED_KIND)
                    if ext.kind == COMPRESSED_KIND or (ext.kind == UNALLOC and self.backing is not None):
                        return None
            io.active.append(True)
        try:
            if extents is None:
                return self.f.read_nowait(buffers, host, total)
            groups = [buffers] if len(extents) == 1 else split_views(buffers, [e.length for e in extents])
            for ext, views in zip(extents, groups):
                if ext.kind != DATA:
                    fill_zero(views)
                elif self.f.read_nowait(views, ext.host, ext.length) is None:
                    return None  # (what was read meanwhile is read again by the worker)
            return total
        finally:
            io.release_shared()

    def writev_inline(self, offset: int, buffers: Sequence[memoryview]) -> int | None:
        """A small write inside one run of contiguous allocated, unshared clusters, made on the
        caller's thread (:meth:`HostFile.write_inline`); None for anything that allocates or
        would block."""
        if self._closed or self._inactive:
            return None
        total = total_length(buffers)
        if self.read_only or offset < 0 or offset % SECTOR or total % SECTOR or offset + total > self.size:
            self.check_range(offset, total, write=True)  # (raises, saying why)
        io = self._io
        with self._meta:  # (ClusterMap._enter_io, inlined)
            if io.writer or io.waiting:
                return None
            host = self._mapped(offset, total)
            if not host:
                return None
            if self._step is not None:
                self._remember(offset, total, host)
            io.active.append(True)
        try:
            self._check_data_host(host, total)
            return self.f.write_inline(buffers, host)
        finally:
            io.release_shared()
