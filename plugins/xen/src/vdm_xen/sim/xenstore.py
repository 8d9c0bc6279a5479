"""libxenstore, simulated: reads, writes, directories and watches on the in-memory store."""

from __future__ import annotations

import errno
import os
from typing import Any

from ..abi import ffi
from .calls import LibCalls
from .state import SimXsConn


class XenstoreCalls(LibCalls):
    """The ``xs_*`` calls of :class:`~vdm_xen.sim.lib.SimLib`."""

    # ---- libxenstore ------------------------------------------------------------------------------

    def _xs_open(self, flags: int) -> int:
        if not self.xen.xenstore:
            return self._fail(errno.ENOENT, 0)
        conn = SimXsConn(self.domid)
        return self._handle("xs", conn)

    def _xs_close(self, h: Any) -> None:
        if h != ffi.NULL:
            self._close("xs", h)

    def _path(self, p: bytes) -> str:
        s = p.decode()
        return s if s.startswith("/") or s.startswith("@") else f"/local/domain/{self.domid}/{s}"

    def _xs_read(self, h: Any, t: int, path: bytes, length: Any) -> int:
        if self._get("xs", h) is None:
            return self._fail(errno.EBADF, 0)
        v = self.xen.store.get(self._path(path))
        if v is None:
            return self._fail(errno.ENOENT, 0)
        if length != ffi.NULL:
            length[0] = len(v)
        return self.xen.malloc(v.encode() + b"\0")

    def _xs_write(self, h: Any, t: int, path: bytes, data: bytes, length: int) -> bool:
        if self._get("xs", h) is None:
            return self._fail(errno.EBADF, False)
        self.xen.xs_write(self._path(path), bytes(data[:length]).decode())
        return True

    def _xs_rm(self, h: Any, t: int, path: bytes) -> bool:
        if self._get("xs", h) is None:
            return self._fail(errno.EBADF, False)
        if not self.xen.xs_rm(self._path(path)):
            return self._fail(errno.ENOENT, False)
        return True

    def _xs_directory(self, h: Any, t: int, path: bytes, num: Any) -> int:
        if self._get("xs", h) is None:
            return self._fail(errno.EBADF, 0)
        p = self._path(path)
        kids = self.xen.xs_children(p)
        if kids is None:
            return self._fail(errno.ENOENT, 0)
        num[0] = len(kids)
        return self.xen.malloc_vector(kids)

    def _xs_watch(self, h: Any, path: bytes, token: bytes) -> bool:
        c = self._get("xs", h)
        if c is None:
            return self._fail(errno.EBADF, False)
        w = (self._path(path), token.decode())
        with self.xen.lock:
            c.watches.append(w)
        self.xen.fire_watch(c, w[0], w[1])  # xenstored fires every new watch once
        return True

    def _xs_unwatch(self, h: Any, path: bytes, token: bytes) -> bool:
        c = self._get("xs", h)
        if c is None:
            return self._fail(errno.EBADF, False)
        w = (self._path(path), token.decode())
        with self.xen.lock:
            if w not in c.watches:
                return self._fail(errno.ENOENT, False)
            c.watches.remove(w)
        return True

    def _xs_fileno(self, h: Any) -> int:
        c = self._get("xs", h)
        return c.r if c is not None else self._fail(errno.EBADF)

    def _xs_check_watch(self, h: Any) -> int:
        c = self._get("xs", h)
        if c is None:
            return self._fail(errno.EBADF, 0)
        with self.xen.lock:
            if not c.queue:
                return self._fail(errno.EAGAIN, 0)
            path, token = c.queue.pop(0)
            try:
                os.read(c.r, 1)
            except BlockingIOError:
                pass
        return self.xen.malloc_vector([path, token])
