"""The ``rbd`` protocol: a Ceph RBD image read and written through librbd (:mod:`.librbd`).

Disk names follow QEMU's: ``rbd:POOL[/NAMESPACE]/IMAGE[@SNAP][:KEY=VALUE]...`` where ``conf``
names the ceph.conf to read (default: librados' own search, /etc/ceph/ceph.conf), ``id`` the
cephx user without ``client.`` (default: admin) and any other key is a Ceph option set on the
connection (``:mon_host=...:keyring=...``); a ``:`` inside a value is written ``\\:``. An image at a
snapshot (``@SNAP``) is opened read-only. Any format works over it (``format=auto`` reads the
image's first bytes: a qcow2 image stored in RBD is opened as qcow2). A write past the end grows the
image (``rbd_resize``), as a file grows: the raw format never writes past its disk's size, qcow2
allocates clusters there.

Requests are librbd's asynchronous calls on bounce buffers owned by vdm (a request vdm gave up on
may complete later into its own buffer, never into guest memory): read, write, discard,
write-zeroes (``unmap=False`` keeps the range allocated) and flush; writethrough flushes after
each write. librbd's exclusive lock is its own: a second writer makes librbd hand the lock over
between the clients, as with QEMU.

A cluster that goes away: ``request_timeout`` becomes librados' ``rados_osd_op_timeout``,
``rados_mon_op_timeout`` and ``client_mount_timeout``, so every request ends (ETIMEDOUT, the guest
sees an I/O error); vdm waits for a completion at most ``request_timeout`` plus 5 s and the disk's
close ends every wait within 0.2 s. One log line per outage, one when the cluster answers again.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import threading
import time
from contextlib import contextmanager
from typing import Any, Iterator, Mapping, Sequence

from vdm.sg import scatter

from .base import DiskError, total_length
from .librbd import WRITE_ZEROES_FLAG_THICK_PROVISION, load
from .protocol import Protocol

__all__ = ["SCHEMES", "RbdName", "RbdProtocol", "open_rbd", "parse_name"]

log = logging.getLogger(__name__)

SCHEMES = ("rbd",)
USAGE = "rbd:POOL[/NAMESPACE]/IMAGE[@SNAP][:conf=PATH][:id=USER][:option=value]"
POLL_S = 0.2
#: extra seconds vdm waits for a completion beyond librados' own timeouts
GRACE_S = 5.0
_KEY = re.compile(r"[a-z][a-z0-9_ ]*\Z")
_SPLIT = re.compile(r"(?<!\\):")


class RbdName:
    """A parsed disk name: pool, namespace, image, snapshot, conf, user id and other options."""

    def __init__(self, pool: str, namespace: str, image: str, snap: str | None, conf: str | None,
                 user: str, options: dict[str, str]) -> None:  # fmt: skip
        self.pool, self.namespace, self.image, self.snap = pool, namespace, image, snap
        self.conf, self.user, self.options = conf, user, options


def parse_name(name: str) -> RbdName:
    """Parse ``rbd:...`` (see the module documentation); DiskError saying the syntax if malformed."""
    if not name.lower().startswith("rbd:"):
        raise DiskError(f"{name}: not an rbd disk name ({USAGE})")
    parts = [p.replace("\\:", ":") for p in _SPLIT.split(name[4:])]
    spec, opts = parts[0], parts[1:]
    snap = None
    if "@" in spec:
        spec, snap = spec.split("@", 1)
        if not snap:
            raise DiskError(f"{name}: an empty snapshot name after '@' ({USAGE})")
    names = spec.split("/")
    if len(names) not in (2, 3) or not all(names) or any("\0" in n for n in names):
        raise DiskError(f"{name}: expected POOL/IMAGE or POOL/NAMESPACE/IMAGE ({USAGE})")
    pool, image = names[0], names[-1]
    namespace = names[1] if len(names) == 3 else ""
    conf: str | None = None
    user = "admin"
    options: dict[str, str] = {}
    for opt in opts:
        key, sep, value = opt.partition("=")
        if not sep or not _KEY.match(key) or "\0" in value:
            raise DiskError(f"{name}: {opt!r} is not KEY=VALUE ({USAGE}; write ':' in a value as '\\:')")
        if key == "conf":
            conf = value
        elif key == "id":
            user = value.removeprefix("client.")
        else:
            options[key] = value
    return RbdName(pool, namespace, image, snap, conf, user, options)


_callback_lock = threading.Lock()
_callback_fn: Any = None


def _callback(ffi: Any) -> Any:
    """The process's one completion callback (never freed): sets the request's event."""
    global _callback_fn
    with _callback_lock:
        if _callback_fn is None:

            def complete(completion: Any, arg: Any) -> None:
                ffi.from_handle(arg).set()

            _callback_fn = ffi.callback("void(rbd_completion_t, void *)", complete)
        return _callback_fn


class _Request:
    """One asynchronous librbd call: its completion, bounce buffer and the event its callback sets."""

    __slots__ = ("buf", "completion", "event", "handle")

    def __init__(self, ffi: Any, buf: Any) -> None:
        self.event = threading.Event()
        self.handle = ffi.new_handle(self.event)
        self.buf = buf
        self.completion: Any = None


class RbdProtocol(Protocol):
    """An RBD image (see the module documentation)."""

    def __init__(
        self, name: str, *, read_only: bool = False, writethrough: bool = False, request_timeout: float = 30.0
    ) -> None:
        try:
            self._ffi, self._rados, self._rbd = load()
        except OSError as e:
            raise DiskError(f"{name}: {e}") from None
        spec = parse_name(name)
        self.path = name
        self.request_timeout = max(1.0, request_timeout)
        self.read_only = read_only or spec.snap is not None
        self.writethrough = writethrough and not self.read_only
        self.supports_discard = not self.read_only
        self.supports_write_zeroes = not self.read_only
        self.can_grow = not self.read_only
        self._closing = threading.Event()
        self._outage = False
        self._lock = threading.Lock()
        self._grow_lock = threading.Lock()
        #: calls into the image now (submissions, size, resize); the close waits for none
        self._users = 0
        self._users_cond = threading.Condition()
        self._abandoned: list[_Request] = []
        self._closed = False
        ffi = self._ffi
        self._callback = _callback(ffi)
        self._cluster = self._ioctx = self._image = ffi.NULL
        try:
            self._connect(spec)
            size = ffi.new("uint64_t *")
            self._check(self._rbd.rbd_get_size(self._image, size), "cannot read the image's size")
            self._size = int(size[0])
        except BaseException:
            self._teardown()
            raise

    def __str__(self) -> str:
        return self.path

    # ---- connection ------------------------------------------------------------------------------

    def _check(self, r: int, what: str) -> None:
        if r < 0:
            raise DiskError(f"{self.path}: {what}: {os.strerror(-r)}")

    def _connect(self, spec: RbdName) -> None:
        ffi, rados, rbd = self._ffi, self._rados, self._rbd
        cluster = ffi.new("rados_t *")
        self._check(rados.rados_create(cluster, spec.user.encode()), "cannot create a Ceph client")
        self._cluster = cluster[0]
        r = rados.rados_conf_read_file(self._cluster, spec.conf.encode() if spec.conf else ffi.NULL)
        if r < 0 and spec.conf:
            self._check(r, f"cannot read the Ceph configuration {spec.conf}")
        t = str(max(1, round(self.request_timeout))).encode()
        settings = {
            b"rados_osd_op_timeout": t,
            b"rados_mon_op_timeout": t,
            b"client_mount_timeout": t,
            **{k.encode(): v.encode() for k, v in spec.options.items()},
        }
        for key, value in settings.items():
            r = rados.rados_conf_set(self._cluster, key, value)
            if r < 0:
                raise DiskError(
                    f"{self.path}: Ceph option {key.decode()}={value.decode()}: {os.strerror(-r)}"
                )
        r = rados.rados_connect(self._cluster)
        if r < 0:
            raise DiskError(
                f"{self.path}: cannot connect to the Ceph cluster as client.{spec.user}: {os.strerror(-r)}; "
                "check conf= (its mon host) and the user's keyring"
            )
        io = ffi.new("rados_ioctx_t *")
        r = rados.rados_ioctx_create(self._cluster, spec.pool.encode(), io)
        if r < 0:
            why = "no such pool" if r == -errno.ENOENT else os.strerror(-r)
            raise DiskError(f"{self.path}: pool {spec.pool!r}: {why}")
        self._ioctx = io[0]
        if spec.namespace:
            rados.rados_ioctx_set_namespace(self._ioctx, spec.namespace.encode())
        image = ffi.new("rbd_image_t *")
        snap = spec.snap.encode() if spec.snap else ffi.NULL
        opener = rbd.rbd_open_read_only if self.read_only else rbd.rbd_open
        r = opener(self._ioctx, spec.image.encode(), image, snap)
        if r < 0:
            if r == -errno.ENOENT:
                what = f"snapshot {spec.snap!r} of image" if spec.snap else "image"
                raise DiskError(f"{self.path}: {what} {spec.image!r} not found in pool {spec.pool!r}")
            self._check(r, f"cannot open image {spec.image!r}")
        self._image = image[0]

    @contextmanager
    def _entered(self, what: str) -> Iterator[None]:
        """Around every call that uses the image handle: refused once the disk closes, and the
        close waits until no such call runs (the handle is never used after rbd_close)."""
        with self._users_cond:
            if self._closing.is_set():
                raise OSError(errno.EIO, f"{self.path}: {what}: the disk is closed")
            self._users += 1
        try:
            yield
        finally:
            with self._users_cond:
                self._users -= 1
                self._users_cond.notify_all()

    def _teardown(self) -> None:
        rados, rbd, null = self._rados, self._rbd, self._ffi.NULL
        with self._users_cond:
            while self._users:
                self._users_cond.wait()
        if self._image != null:
            rbd.rbd_close(self._image)
            self._image = null
        if self._ioctx != null:
            rados.rados_ioctx_destroy(self._ioctx)
            self._ioctx = null
        if self._cluster != null:
            rados.rados_shutdown(self._cluster)
            self._cluster = null
        with self._lock:
            for req in self._abandoned:
                if req.event.is_set():
                    rbd.rbd_aio_release(req.completion)
            self._abandoned = [r for r in self._abandoned if not r.event.is_set()]

    # ---- requests --------------------------------------------------------------------------------

    def _reap(self) -> None:
        """Release the completions of requests given up on that have finished since."""
        if not self._abandoned:
            return
        with self._lock:
            keep = []
            for req in self._abandoned:
                if req.event.is_set():
                    self._rbd.rbd_aio_release(req.completion)
                else:
                    keep.append(req)
            self._abandoned = keep

    def _run(self, submit: Any, what: str, buf: Any = None) -> int:
        """Submit one call (``submit(completion)`` -> librbd's return) and wait for its result."""
        if self._closing.is_set():
            raise OSError(errno.EIO, f"{self.path}: {what}: the disk is closed")
        self._reap()
        ffi, rbd = self._ffi, self._rbd
        req = _Request(ffi, buf)
        c = ffi.new("rbd_completion_t *")
        with self._entered(what):
            r = rbd.rbd_aio_create_completion(req.handle, self._callback, c)
            if r < 0:
                raise OSError(-r, f"{self.path}: {what}: {os.strerror(-r)}")
            req.completion = c[0]
            r = submit(req.completion)
            if r < 0:
                rbd.rbd_aio_release(req.completion)
                raise OSError(-r, f"{self.path}: {what}: {os.strerror(-r)}")
        give_up = time.monotonic() + self.request_timeout + GRACE_S
        while not req.event.wait(POLL_S):
            if self._closing.is_set() or time.monotonic() > give_up:
                with self._lock:
                    self._abandoned.append(req)  # librbd still owns it: keep buffer and handle alive
                why = "the disk is closed" if self._closing.is_set() else "no answer from the cluster"
                self._failed(what, why)
                raise OSError(errno.EIO, f"{self.path}: {what}: {why}")
        ret = int(rbd.rbd_aio_get_return_value(req.completion))
        rbd.rbd_aio_release(req.completion)
        if ret < 0:
            self._failed(what, os.strerror(-ret))
            raise OSError(-ret, f"{self.path}: {what}: {os.strerror(-ret)}")
        if self._outage:
            self._outage = False
            log.warning("%s: the Ceph cluster answers again", self.path)
        return ret

    def _failed(self, what: str, why: str) -> None:
        if not self._outage and not self._closing.is_set():
            self._outage = True
            msg = "%s: Ceph request failed (%s: %s); requests fail with EIO until it answers"
            log.warning(msg, self.path, what, why)

    # ---- data ------------------------------------------------------------------------------------

    def size(self) -> int:
        """The image's size as librbd knows it now (it follows a resize by another client through
        the image header's watch), else the last size seen."""
        out = self._ffi.new("uint64_t *")
        try:
            with self._entered("size"):
                if self._rbd.rbd_get_size(self._image, out) == 0:
                    self._size = int(out[0])
        except OSError:
            pass  # closed: the last size seen
        return self._size

    def _span(self, offset: int, total: int) -> int:
        if offset < 0 or total < 0:
            raise OSError(errno.EINVAL, f"{self.path}: negative offset or length")
        return max(0, min(total, self._size - offset))

    def preadv(self, views: Sequence[memoryview], offset: int) -> int:
        total = total_length(views)
        inside = self._span(offset, total)
        buf = bytearray(total)
        if inside:
            ffi, rbd, image = self._ffi, self._rbd, self._image
            cbuf = ffi.from_buffer(buf, require_writable=True)
            what = f"read {inside}@{offset}"
            got = self._run(lambda c: rbd.rbd_aio_read(image, offset, inside, cbuf, c), what, cbuf)
            if got < inside:  # librbd reads the whole range; be safe if it did not
                buf[got:inside] = bytes(inside - got)
        scatter(buf, views)
        return total

    def pwritev(self, views: Sequence[memoryview], offset: int) -> int:
        if self.read_only:
            raise OSError(errno.EROFS, f"{self.path}: the image is opened read-only")
        total = total_length(views)
        if self._span(offset, total) < total:
            self._grow(offset + total)
        if not total:
            return 0
        data = bytes(views[0]) if len(views) == 1 else b"".join(views)
        ffi, rbd, image = self._ffi, self._rbd, self._image
        cbuf = ffi.from_buffer(data)
        self._run(lambda c: rbd.rbd_aio_write(image, offset, total, cbuf, c), f"write {total}@{offset}", cbuf)
        if self.writethrough:
            self.sync()
        return total

    def sync(self) -> None:
        if self.read_only:
            return
        rbd, image = self._rbd, self._image
        self._run(lambda c: rbd.rbd_aio_flush(image, c), "flush")

    def _grow(self, end: int) -> None:
        """Grow the image to ``end`` bytes for a write past its end (a qcow2 image allocating
        clusters, as a file grows); OSError if librbd refuses."""
        with self._grow_lock:
            if end > self._size:
                with self._entered("grow"):
                    r = self._rbd.rbd_resize(self._image, end)
                if r < 0:
                    raise OSError(
                        -r, f"{self.path}: cannot grow the RBD image to {end} bytes: {os.strerror(-r)}"
                    )
                self._size = end

    def truncate(self, length: int) -> None:
        if length == self._size:
            return
        if self.read_only or length < 0:
            raise DiskError(
                f"{self.path}: the image is read-only or the size invalid; cannot resize to {length}"
            )
        with self._grow_lock, self._entered("resize"):
            r = self._rbd.rbd_resize(self._image, length)
            if r < 0:
                raise DiskError(
                    f"{self.path}: cannot resize the RBD image to {length} bytes: {os.strerror(-r)}"
                )
            self._size = length

    def discard(self, offset: int, length: int) -> None:
        if self.read_only:
            raise OSError(errno.EROFS, f"{self.path}: the image is opened read-only")
        n = self._span(offset, length)
        if n:
            rbd, image = self._rbd, self._image
            self._run(lambda c: rbd.rbd_aio_discard(image, offset, n, c), f"discard {n}@{offset}")

    def write_zeroes(self, offset: int, length: int, unmap: bool) -> None:
        if self.read_only:
            raise OSError(errno.EROFS, f"{self.path}: the image is opened read-only")
        if self._span(offset, length) < length:
            raise OSError(errno.ENOSPC, f"{self.path}: write-zeroes at {offset}+{length} is past the end")
        if not length:
            return
        rbd, image = self._rbd, self._image
        flags = 0 if unmap else WRITE_ZEROES_FLAG_THICK_PROVISION
        what = f"write-zeroes {length}@{offset}"
        self._run(lambda c: rbd.rbd_aio_write_zeroes(image, offset, length, c, flags, 0), what)
        if self.writethrough:
            self.sync()

    def close(self) -> None:
        """End every wait (within 0.2 s), then close the image and the cluster connection.

        librbd's close waits for its requests in flight, which librados' timeouts bound; if that
        takes more than 1 s (a dead cluster) it finishes on a daemon thread, so an exit never waits.
        """
        if self._closed:
            return
        self._closed = True
        self._closing.set()
        t = threading.Thread(target=self._teardown, name="rbd-close", daemon=True)
        t.start()
        t.join(1.0)
        if t.is_alive():
            log.warning(
                "%s: the Ceph cluster does not answer; closing the image in the background", self.path
            )


def open_rbd(name: str, *, read_only: bool, options: Mapping[str, Any]) -> RbdProtocol:
    """The rbd protocol's opener (see :func:`vdm_blk.backends.register_protocol`)."""
    return RbdProtocol(
        name,
        read_only=read_only,
        writethrough=bool(options.get("writethrough", False)),
        request_timeout=float(options.get("request_timeout", 30.0)),
    )
