"""The inline data path of a qcow2 image: requests served on the caller's thread (issue 18).

:class:`InlinePath` is mixed into :class:`.qcow2.Qcow2Disk`. A device calls ``readv_nowait`` and
``writev_inline`` on its queue thread before handing a request to a worker; they serve only a
request inside one run of contiguous, allocated, unshared clusters (:meth:`ClusterMap._mapped`)
whose bytes need no waiting (page-cache reads, small buffered writes) and return None for
anything else, having changed nothing. The range checks are those of ``check_range``; the shared
side of the I/O lock is held across the system call, as in ``readv``/``writev``; a write is
refused on metadata clusters as everywhere (``_check_data_host``).
"""

from __future__ import annotations

from typing import Sequence

from .base import SECTOR

__all__ = ["InlinePath"]


class InlinePath:
    """readv_nowait / writev_inline (mixed into Qcow2Disk; see the module documentation)."""

    def readv_nowait(self, offset: int, buffers: Sequence[memoryview]) -> int | None:
        """A read of one run of contiguous allocated clusters (a 1 MiB read of a converted image
        is one), served from the page cache on the caller's thread; None for anything else or
        when it would block (the device then uses a worker)."""
        if self._closed or self._inactive:
            return None
        total = sum(map(len, buffers))
        if offset < 0 or offset % SECTOR or total % SECTOR or offset + total > self.size:
            self.check_range(offset, total)  # (raises, saying why)
        io = self._io
        with self._meta:  # (ClusterMap._enter_io, inlined: the hottest path)
            if io.writer or io.waiting:
                return None
            host = self._mapped(offset, total)
            if not host:
                return None
            io.active.append(True)
        try:
            return self.f.read_nowait(buffers, host, total)
        finally:
            io.active.pop()  # (IOLock.release_shared, inlined)
            if io.waiting:
                io.wake()

    def writev_inline(self, offset: int, buffers: Sequence[memoryview]) -> int | None:
        """A small write inside one run of contiguous allocated, unshared clusters, made on the
        caller's thread (:meth:`HostFile.write_inline`); None for anything that allocates or
        would block."""
        if self._closed or self._inactive:
            return None
        total = sum(map(len, buffers))
        if self.read_only or offset < 0 or offset % SECTOR or total % SECTOR or offset + total > self.size:
            self.check_range(offset, total, write=True)  # (raises, saying why)
        host = self._enter_io(offset, total, False)
        if not host:
            return None
        try:
            self._check_data_host(host, total)
            return self.f.write_inline(buffers, host)
        finally:
            self._io.release_shared()
