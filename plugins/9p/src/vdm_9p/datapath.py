"""Tread and Twrite between the file and the guest's buffers, without a copy through ``bytes``.

A mixin of :class:`vdm_9p.server.Server` (split out to keep modules short). :meth:`DataPath.serve`
takes one request as views (the readable buffers of a chain, ``size`` bytes of which are the
message) and writes its reply into the writable views: a Tread is ``preadv`` from the fid's fd
straight into the reply's views after the 11-byte Rread header, the header written last with the
count actually read (a short read at the end of the file says so); a Twrite is ``pwritev`` straight
from the request's views after its 23-byte header. Every other message is gathered and served by
:meth:`~vdm_9p.server.Server.handle`.

Invariants: the same checks and answers as the copying handlers (unknown or unopened fid EBADF,
a count past the message EINVAL, a read never larger than the negotiated msize nor the reply room,
an offset past ``off_t`` EINVAL, a read-only export EROFS); nothing is written outside the views
given nor past the reply's length; the request's fields are unpacked once, from one copy.
"""

from __future__ import annotations

import errno
import os
import struct
from typing import TYPE_CHECKING, Sequence

from vdm.sg import gather, scatter, total_length

from .protocol import Msg, rlerror

if TYPE_CHECKING:
    from .server import Server as _Base
else:
    _Base = object

__all__ = ["DataPath"]

#: size[4] type[1] tag[2] fid[4] offset[8] count[4]: the header of a Tread and of a Twrite
_IO_REQ = struct.Struct("<IBHIQI")
#: size[4] type[1] tag[2] count[4]: Rread's header (the data follows) and the whole Rwrite
_IO_REPLY = struct.Struct("<IBHI")
_IO_TYPES = (Msg.TREAD, Msg.TWRITE)
try:
    _IOV_MAX = os.sysconf("SC_IOV_MAX")
except (ValueError, OSError):  # pragma: no cover - every Linux has it
    _IOV_MAX = 1024


def _window(views: Sequence[memoryview], skip: int, count: int) -> list[memoryview]:
    """The views covering ``count`` bytes after the first ``skip`` (fewer if they end first):
    what :func:`vdm.sg.slice_views` returns, but the whole buffers inside the window are the
    views given, not new slices of them (a guest's pages are whole buffers)."""
    i, n = 0, len(views)
    while i < n and skip >= len(views[i]):
        skip -= len(views[i])
        i += 1
    out = list(views[i:])
    if not out or count <= 0:
        return []
    if skip:
        out[0] = out[0][skip:]
    excess = total_length(out) - count
    while excess > 0:
        last = out[-1]
        if len(last) <= excess:
            out.pop()
            excess -= len(last)
        else:
            out[-1] = last[: len(last) - excess]
            excess = 0
    return out


class DataPath(_Base):
    """Serving a request from and into guest buffers (Tread and Twrite without copies)."""

    def serve(self, req: Sequence[memoryview], size: int, reply: Sequence[memoryview], room: int) -> int:
        """Serve the T-message in the first ``size`` bytes of ``req``; write the R-message into
        ``reply`` (``room`` bytes, at least 11) and return its length."""
        first = req[0]
        if size >= _IO_REQ.size:
            n = _IO_REQ.size
            head = bytes(first[:n]) if len(first) >= n else gather(req, 0, n)
            if head[4] in _IO_TYPES:
                _size, mtype, tag, fid, offset, count = _IO_REQ.unpack(head)
                try:
                    with self._lock:
                        if mtype == Msg.TREAD:
                            return self._read_into(fid, offset, count, tag, reply, room)
                        return self._write_from(fid, offset, count, size, tag, req, reply)
                except OSError as e:
                    out = rlerror(tag, e.errno or errno.EIO)
                except (ValueError, OverflowError):  # an offset past off_t
                    out = rlerror(tag, errno.EINVAL)
                return scatter(out, reply)
        msg = bytes(first[:size]) if len(first) >= size else gather(req, 0, size)
        out = self.handle(msg, room)
        if len(reply[0]) >= len(out):
            reply[0][: len(out)] = out
            return len(out)
        return scatter(out, reply)

    def _open_fd(self, fid: int) -> int:
        f = self.fids.get(fid)
        if f is None or f.fd is None:
            raise OSError(errno.EBADF, "unknown fid" if f is None else "fid not open")
        return f.fd

    def _read_into(
        self, fid: int, offset: int, count: int, tag: int, reply: Sequence[memoryview], room: int
    ) -> int:
        fd = self._open_fd(fid)
        count = max(0, min(count, self.msize - 11, room - 11))
        n = 0
        if count:
            views = _window(reply, _IO_REPLY.size, count)
            if len(views) <= _IOV_MAX:
                n = os.preadv(fd, views, offset)
            else:  # more buffers than one system call takes: through one bytes object
                n = scatter(os.pread(fd, count, offset), views)
        scatter(_IO_REPLY.pack(_IO_REPLY.size + n, Msg.TREAD + 1, tag, n), reply)
        return _IO_REPLY.size + n

    def _write_from(
        self,
        fid: int,
        offset: int,
        count: int,
        size: int,
        tag: int,
        req: Sequence[memoryview],
        reply: Sequence[memoryview],
    ) -> int:
        f = self.fids.get(fid)
        if f is None:
            raise OSError(errno.EBADF, "unknown fid")
        if _IO_REQ.size + count > size:
            raise OSError(errno.EINVAL, "count past the end of the message")
        fd = self._open_fd(fid)
        self.export.check_writable()
        views = _window(req, _IO_REQ.size, count)
        if views and len(views) <= _IOV_MAX:
            n = os.pwritev(fd, views, offset)
        else:
            n = os.pwrite(fd, b"".join(bytes(v) for v in views), offset)
        return scatter(_IO_REPLY.pack(_IO_REPLY.size, Msg.TWRITE + 1, tag, n), reply)
