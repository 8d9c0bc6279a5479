"""The ``nbd`` protocol: an NBD export read and written through libnbd (:mod:`.libnbd`).

Disk names are the NBD URI standard: ``nbd://host[:port]/export``, ``nbd+unix:///export?socket=PATH``
(and the TLS forms ``nbds://``, ``nbds+unix://`` where libnbd has TLS). Any format works over it
(``format=auto`` reads the export's first bytes: a qcow2 image exported raw is opened as qcow2).

Commands map to what the server advertises (libnbd's ``can_*``): flush only if it takes flush,
trim only if it takes trim (otherwise a discard does nothing), write-zeroes as NBD_CMD_WRITE_ZEROES
if it takes it (else written zeros), writethrough as FUA writes (or a flush after each write).
Block-size constraints: requests are split at the server's maximum (32 MiB when it names none)
and a request not aligned to its minimum is read (or read-modify-written) over the aligned span.

Connections: one libnbd handle serves one request at a time; several requests run on several
connections only where the server advertises multi-conn (``connections`` of them at most).

A server that goes away: a request whose connection fails, or that has no reply after
``request_timeout`` seconds, drops that connection and waits while vdm reconnects (backing off
up to 1 s between tries) for up to ``reconnect_timeout`` seconds after the first failure; then it
fails with EIO (the guest sees an I/O error) and the next request tries again. One log line per
outage. Writes are retried whole after a reconnect (an NBD write is idempotent). :meth:`close`
ends every wait within 0.2 s, so vdm's exit never waits on a dead server. A reply that breaks
the protocol (a wrong handle, a short or oversized reply) kills the connection inside libnbd,
which writes nothing outside the request's buffer; it is treated as a failure like the above.
"""

from __future__ import annotations

import errno
import logging
import threading
import time
from typing import Any, Callable, Mapping, Sequence

from vdm.sg import scatter

from .base import SECTOR, DiskError, total_length
from .libnbd import CMD_FLAG_FUA, CMD_FLAG_NO_HOLE, SIZE_MAXIMUM, SIZE_MINIMUM, SIZE_PREFERRED, load
from .protocol import Protocol

__all__ = ["SCHEMES", "NbdProtocol", "open_nbd"]

log = logging.getLogger(__name__)

SCHEMES = ("nbd", "nbd+unix", "nbds", "nbds+unix")
DEFAULT_MAX = 32 << 20
ZERO_MAX = 1 << 30
POLL_MS = 200


class _Down(Exception):
    """The connection is unusable (the message says why); reconnect."""


class NbdProtocol(Protocol):
    """An NBD export (see the module documentation)."""

    def __init__(
        self,
        uri: str,
        *,
        read_only: bool = False,
        writethrough: bool = False,
        reconnect_timeout: float = 10.0,
        request_timeout: float = 30.0,
        connections: int = 4,
    ) -> None:
        try:
            self._ffi, self._lib = load()
        except OSError as e:
            raise DiskError(f"{uri}: {e}") from None
        self.path = uri
        self.reconnect_timeout = max(0.0, reconnect_timeout)
        self.request_timeout = max(0.1, request_timeout)
        self._closing = threading.Event()
        self._cond = threading.Condition()
        self._idle: list[Any] = []
        self._open = 0  # handles in existence (idle or in use)
        self._outage = False
        self._rmw = threading.Lock()
        self._null_owner = self._ffi.new("nbd_completion_callback *")
        #: LIBNBD_NULL_COMPLETION: completion is collected with nbd_aio_command_completed
        self._null = self._null_owner[0]
        try:
            h = self._connect()
        except _Down as e:
            raise DiskError(f"{uri}: cannot connect to the NBD server: {e}") from None
        lib = self._lib
        try:
            self._size = lib.nbd_get_size(h)
            if self._size < 0:
                raise DiskError(f"{uri}: the NBD server gave no export size: {self._error()}")
            server_ro = lib.nbd_is_read_only(h) == 1
            if server_ro and not read_only:
                raise DiskError(f"{uri}: the NBD export is read-only; open it with ro")
            self.read_only = read_only
            self.can_flush = lib.nbd_can_flush(h) == 1
            self.can_fua = lib.nbd_can_fua(h) == 1
            self.supports_discard = lib.nbd_can_trim(h) == 1 and not read_only
            self.supports_write_zeroes = lib.nbd_can_zero(h) == 1 and not read_only
            multi = lib.nbd_can_multi_conn(h) == 1
            minimum = max(1, lib.nbd_get_block_size(h, SIZE_MINIMUM))
            preferred = lib.nbd_get_block_size(h, SIZE_PREFERRED)
            maximum = lib.nbd_get_block_size(h, SIZE_MAXIMUM)
        except BaseException:
            lib.nbd_close(h)
            raise
        self.align = minimum
        self.logical_block_size = max(SECTOR, minimum) if minimum <= 4096 else SECTOR
        self.physical_block_size = max(
            self.logical_block_size, preferred if 0 < preferred <= 1 << 20 else 4096
        )
        self.max_transfer = maximum if maximum > 0 else DEFAULT_MAX
        self.max_transfer -= self.max_transfer % minimum
        self.optimal_io_size = preferred if preferred > SECTOR else 0
        self.writethrough = writethrough and not read_only
        self.can_grow = False
        self.connections = max(1, connections) if multi else 1
        self._open = 1
        self._idle.append(h)

    def __str__(self) -> str:
        return self.path

    @property
    def connections_open(self) -> int:
        """Connections to the server now (idle or serving a request); at most ``connections``."""
        with self._cond:
            return self._open

    # ---- connections -----------------------------------------------------------------------------

    def _error(self) -> str:
        msg = self._lib.nbd_get_error()
        return self._ffi.string(msg).decode(errors="replace") if msg != self._ffi.NULL else "unknown error"

    def _connect(self) -> Any:
        """A new, ready handle; _Down with libnbd's reason if the server cannot be reached."""
        lib = self._lib
        h = lib.nbd_create()
        if h == self._ffi.NULL:
            raise _Down(self._error())
        try:
            if lib.nbd_aio_connect_uri(h, self.path.encode()) == -1:
                raise _Down(self._error())
            deadline = time.monotonic() + self.request_timeout
            while lib.nbd_aio_is_connecting(h) == 1:
                if self._closing.is_set():
                    raise _Down("the disk is closing")
                if time.monotonic() > deadline:
                    raise _Down(f"no answer to the handshake in {self.request_timeout:g} s")
                if lib.nbd_poll(h, POLL_MS) == -1:
                    raise _Down(self._error())
            if lib.nbd_aio_is_ready(h) != 1:
                raise _Down(self._error())
            if hasattr(self, "_size") and lib.nbd_get_size(h) != self._size:
                raise _Down(f"the export's size changed (was {self._size} bytes)")
        except BaseException:
            lib.nbd_close(h)
            raise
        return h

    def _take(self) -> Any | None:
        """An idle handle, or None when the caller may open a new one; waits when at the limit."""
        with self._cond:
            while True:
                if self._closing.is_set():
                    raise OSError(errno.EIO, f"{self.path}: the disk is closed")
                if self._idle:
                    return self._idle.pop()
                if self._open < self.connections:
                    self._open += 1
                    return None
                self._cond.wait(POLL_MS / 1000)

    def _give(self, h: Any) -> None:
        with self._cond:
            if self._closing.is_set():
                self._lib.nbd_close(h)
                self._open -= 1
            else:
                self._idle.append(h)
            self._cond.notify()

    def _drop(self, h: Any | None) -> None:
        if h is not None:
            self._lib.nbd_close(h)
        with self._cond:
            self._open -= 1
            self._cond.notify()

    def _run(self, submit: Callable[[Any], int], what: str) -> None:
        """Run one command (``submit(handle) -> cookie``) to completion, reconnecting as documented."""
        lib = self._lib
        deadline: float | None = None
        backoff = 0.05
        while True:
            h = self._take()
            try:
                if h is None:
                    h = self._connect()
                try:
                    cookie = submit(h)
                except BaseException:  # not libnbd's answer (a Python error): the handle is not kept
                    self._drop(h)
                    raise
                if cookie == -1:
                    if lib.nbd_aio_is_dead(h) == 1 or lib.nbd_aio_is_closed(h) == 1:
                        raise _Down(self._error())
                    err, msg = lib.nbd_get_errno() or errno.EIO, self._error()
                    self._give(h)
                    raise OSError(err, f"{self.path}: {what}: {msg}")
                give_up = time.monotonic() + self.request_timeout
                while True:
                    r = lib.nbd_aio_command_completed(h, cookie)
                    if r == 1:
                        self._give(h)
                        if self._outage:
                            self._outage = False
                            log.warning("%s: the NBD server answers again", self.path)
                        return
                    if r == -1:
                        if lib.nbd_aio_is_dead(h) == 1 or lib.nbd_aio_is_closed(h) == 1:
                            raise _Down(self._error())
                        err, msg = lib.nbd_get_errno() or errno.EIO, self._error()
                        self._give(h)
                        raise OSError(err, f"{self.path}: {what}: the server answered {msg}")
                    if self._closing.is_set():
                        raise _Down("the disk is closing")
                    if time.monotonic() > give_up:
                        raise _Down(f"no reply in {self.request_timeout:g} s")
                    if lib.nbd_poll(h, POLL_MS) == -1:
                        raise _Down(self._error())
            except _Down as e:
                self._drop(h)
                now = time.monotonic()
                if deadline is None:
                    deadline = now + self.reconnect_timeout
                if not self._outage:
                    self._outage = True
                    log.warning(
                        "%s: NBD connection lost (%s); reconnecting for up to %g s",
                        self.path,
                        e,
                        self.reconnect_timeout,
                    )
                if self._closing.is_set() or now >= deadline:
                    raise OSError(errno.EIO, f"{self.path}: {what}: NBD server unreachable: {e}") from None
                self._closing.wait(min(backoff, deadline - now))
                backoff = min(backoff * 2, 1.0)

    # ---- data ------------------------------------------------------------------------------------

    def size(self) -> int:
        return self._size

    def _read_into(self, buf: memoryview, offset: int) -> None:
        """One aligned read of at most max_transfer bytes straight into ``buf``."""
        ffi, lib = self._ffi, self._lib
        cbuf = ffi.from_buffer(buf, require_writable=True)
        null, n = self._null, len(buf)
        try:
            self._run(lambda h: lib.nbd_aio_pread(h, cbuf, n, offset, null, 0), f"read {n}@{offset}")
        finally:
            # _run returns or raises only when libnbd no longer holds the buffer (the command
            # completed or its handle is closed): let go of guest memory now, not whenever the
            # garbage collector gets to a traceback that still references it
            ffi.release(cbuf)

    def _write_from(self, buf: memoryview, offset: int) -> None:
        ffi, lib = self._ffi, self._lib
        cbuf = ffi.from_buffer(buf)
        null, n = self._null, len(buf)
        flags = CMD_FLAG_FUA if self.writethrough and self.can_fua else 0
        try:
            self._run(lambda h: lib.nbd_aio_pwrite(h, cbuf, n, offset, null, flags), f"write {n}@{offset}")
        finally:
            ffi.release(cbuf)
        if self.writethrough and not self.can_fua:
            self.sync()

    def _chunks(self, offset: int, length: int):
        step = self.max_transfer
        for pos in range(0, length, step):
            yield pos, min(step, length - pos)

    def preadv(self, views: Sequence[memoryview], offset: int) -> int:
        total = total_length(views)
        inside = max(0, min(total, self._size - offset))
        a = self.align
        if len(views) == 1 and not offset % a and not inside % a:
            v = views[0]
            for pos, n in self._chunks(offset, inside):
                self._read_into(v[pos : pos + n], offset + pos)
            if inside < total:
                v[inside:] = bytes(total - inside)
            return total
        buf = bytearray(total)
        if inside:
            start = offset - offset % a
            end = min(self._size, -(-(offset + inside) // a) * a)
            span = bytearray(end - start)
            sv = memoryview(span)
            for pos, n in self._chunks(start, len(span)):
                self._read_into(sv[pos : pos + n], start + pos)
            buf[:inside] = span[offset - start : offset - start + inside]
        scatter(buf, views)
        return total

    def pwritev(self, views: Sequence[memoryview], offset: int) -> int:
        if self.read_only:
            raise OSError(errno.EROFS, f"{self.path}: the export is opened read-only")
        total = total_length(views)
        if offset + total > self._size:
            raise DiskError(
                f"{self.path}: a write at {offset}+{total} is past the end of the NBD export "
                f"({self._size} bytes), which cannot grow; give the export more room"
            )
        a = self.align
        data = views[0] if len(views) == 1 else memoryview(b"".join(views))
        if offset % a or total % a:
            with self._rmw:  # read-modify-write of the aligned span (metadata-sized writes)
                start = offset - offset % a
                end = -(-(offset + total) // a) * a
                span = bytearray(end - start)
                self.preadv([memoryview(span)], start)
                span[offset - start : offset - start + total] = data
                self._write_all(memoryview(span), start)
            return total
        self._write_all(data, offset)
        return total

    def _write_all(self, data: memoryview, offset: int) -> None:
        for pos, n in self._chunks(offset, len(data)):
            self._write_from(data[pos : pos + n], offset + pos)

    def sync(self) -> None:
        if self.read_only or not self.can_flush:
            return
        null = self._null
        self._run(lambda h: self._lib.nbd_aio_flush(h, null, 0), "flush")

    def truncate(self, length: int) -> None:
        if length > self._size:
            raise DiskError(
                f"{self.path}: the image needs {length} bytes but the NBD export has {self._size} and "
                "cannot grow; give the export room (qemu-img resize -f raw, or truncate -s, on the server)"
            )

    def discard(self, offset: int, length: int) -> None:
        if not self.supports_discard or not length:
            return
        null = self._null
        for pos in range(0, length, ZERO_MAX):
            n = min(ZERO_MAX, length - pos)
            self._run(lambda h, p=pos, n=n: self._lib.nbd_aio_trim(h, n, offset + p, null, 0), "trim")

    def write_zeroes(self, offset: int, length: int, unmap: bool) -> None:
        if not self.supports_write_zeroes or offset % self.align or length % self.align:
            super().write_zeroes(offset, length, unmap)
            return
        null = self._null
        flags = (0 if unmap else CMD_FLAG_NO_HOLE) | (
            CMD_FLAG_FUA if self.writethrough and self.can_fua else 0
        )
        for pos in range(0, length, ZERO_MAX):
            n = min(ZERO_MAX, length - pos)
            self._run(
                lambda h, p=pos, n=n: self._lib.nbd_aio_zero(h, n, offset + p, null, flags), "write-zeroes"
            )

    def close(self) -> None:
        """Stop every wait (in-flight requests fail with EIO within 0.2 s) and disconnect."""
        self._closing.set()
        with self._cond:
            idle, self._idle = self._idle, []
            self._open -= len(idle)
            self._cond.notify_all()
        for h in idle:
            self._lib.nbd_close(h)


def open_nbd(uri: str, *, read_only: bool, options: Mapping[str, Any]) -> NbdProtocol:
    """The nbd protocol's opener (see :func:`vdm_blk.backends.register_protocol`)."""
    return NbdProtocol(
        uri,
        read_only=read_only,
        writethrough=bool(options.get("writethrough", False)),
        reconnect_timeout=float(options.get("reconnect_timeout", 10.0)),
        request_timeout=float(options.get("request_timeout", 30.0)),
        connections=int(options.get("connections", 4)),
    )
