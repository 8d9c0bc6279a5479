"""Xenstore: reading what libxl wrote for a standalone virtio disk, and the backend handshake.

Xen 4.17's libxl, for ``disk = [ '..., backendtype=standalone, specification=virtio' ]`` on Arm,
writes a backend directory ``/local/domain/<backend>/backend/virtio_disk/<guest>/<devid>`` with
(among others) ``frontend`` (the guest-side path), ``state`` = 1 (Initialising), ``mode`` ("w" or
"r"), ``params`` (the image), ``base`` (the virtio-mmio window, decimal in 4.17, ``0x`` hex later)
and ``irq`` (the SPI), then waits until the backend says ``state`` = 2 (InitWait). The device model
must therefore be running before ``xl create``. The guest's driver is plain virtio-mmio and never
speaks xenbus, so the backend stays in InitWait until it closes (state 6, Closed).
"""

from __future__ import annotations

import errno
import logging
import select
import time
from dataclasses import dataclass
from typing import Any

from .abi import (
    XBT_NULL,
    XENBUS_STATE_CLOSED,
    XENBUS_STATE_CLOSING,
    XENBUS_STATE_INITIALISING,
    XENBUS_STATE_INITWAIT,
    XENBUS_STATE_UNKNOWN,
    XS_WATCH_PATH,
    XS_WATCH_TOKEN,
)

__all__ = ["DiskEntry", "XenStore", "XenStoreError", "XsDisk", "find_disks", "wait_for_disks"]

log = logging.getLogger(__name__)

KIND = "virtio_disk"


class XenStoreError(OSError):
    """Xenstore is unreachable, or a node holds something unusable."""


class XenStore:
    """A thin, typed wrapper over libxenstore (real or simulated)."""

    def __init__(self, lib: Any) -> None:
        self.lib = lib
        self.h = lib.xs_open(0)
        if self.h == lib.ffi.NULL:
            err = lib.errno
            raise XenStoreError(err, f"cannot connect to xenstore: {errno.errorcode.get(err, err)}")

    def close(self) -> None:
        if self.h is not None:
            self.lib.xs_close(self.h)
            self.h = None

    def read(self, path: str) -> str | None:
        lib, ffi = self.lib, self.lib.ffi
        n = ffi.new("unsigned int *")
        p = lib.xs_read(self.h, XBT_NULL, path.encode(), n)
        if p == ffi.NULL:
            return None
        try:
            return bytes(ffi.buffer(p, n[0])).decode("utf-8", "replace")
        finally:
            lib.free(p)

    def write(self, path: str, value: str) -> bool:
        data = value.encode()
        return bool(self.lib.xs_write(self.h, XBT_NULL, path.encode(), data, len(data)))

    def rm(self, path: str) -> bool:
        return bool(self.lib.xs_rm(self.h, XBT_NULL, path.encode()))

    def directory(self, path: str) -> list[str]:
        lib, ffi = self.lib, self.lib.ffi
        n = ffi.new("unsigned int *")
        vec = lib.xs_directory(self.h, XBT_NULL, path.encode(), n)
        if vec == ffi.NULL:
            return []
        try:
            return [ffi.string(vec[i]).decode("utf-8", "replace") for i in range(n[0])]
        finally:
            lib.free(vec)

    def watch(self, path: str, token: str) -> bool:
        return bool(self.lib.xs_watch(self.h, path.encode(), token.encode()))

    def unwatch(self, path: str, token: str) -> bool:
        return bool(self.lib.xs_unwatch(self.h, path.encode(), token.encode()))

    def fileno(self) -> int:
        return self.lib.xs_fileno(self.h)

    def events(self) -> list[tuple[str, str]]:
        """The (path, token) of every watch event that has arrived (does not block)."""
        lib, ffi = self.lib, self.lib.ffi
        out = []
        while True:
            vec = lib.xs_check_watch(self.h)
            if vec == ffi.NULL:
                return out
            try:
                out.append(
                    (ffi.string(vec[XS_WATCH_PATH]).decode(), ffi.string(vec[XS_WATCH_TOKEN]).decode())
                )
            finally:
                lib.free(vec)

    def read_int(self, path: str) -> int | None:
        v = self.read(path)
        if v is None:
            return None
        try:
            return int(v.strip(), 0) if v.strip().lower().startswith("0x") else int(v.strip(), 10)
        except ValueError:
            return None


@dataclass
class DiskEntry:
    """One virtio disk libxl described for a guest."""

    backend: str  # the backend directory
    frontend: str
    fe_domid: int
    devid: int
    params: str
    writable: bool
    base: int
    irq: int


def own_domid(xs: XenStore) -> int:
    """Our domain id (``domid`` relative to our own xenstore home; dom0 when absent)."""
    v = xs.read_int("domid")
    return 0 if v is None else v


def _entry(xs: XenStore, be_path: str, fe_domid: int, devid: int) -> DiskEntry:
    def need(key: str) -> str:
        v = xs.read(f"{be_path}/{key}")
        if v is None:
            raise XenStoreError(errno.ENOENT, f"{be_path}/{key} is missing")
        return v

    frontend = need("frontend")
    params = need("params")
    mode = need("mode")
    base = xs.read_int(f"{be_path}/base")
    irq = xs.read_int(f"{be_path}/irq")
    if base is None or irq is None:
        raise XenStoreError(errno.EINVAL, f"{be_path}: base/irq missing or not numbers")
    return DiskEntry(be_path, frontend, fe_domid, devid, params, mode.startswith("w"), base, irq)


def find_disks(xs: XenStore, be_domid: int, fe_domid: int) -> list[DiskEntry]:
    """The virtio disks libxl set up for guest ``fe_domid`` (in Initialising state or later)."""
    root = f"/local/domain/{be_domid}/backend/{KIND}/{fe_domid}"
    out = []
    for name in sorted(xs.directory(root), key=lambda s: (len(s), s)):
        if not name.isdigit():
            continue
        out.append(_entry(xs, f"{root}/{name}", fe_domid, int(name)))
    return out


def wait_for_disks(
    xs: XenStore, be_domid: int, fe_domid: int | None, stop_fd: int, timeout: float | None = None
) -> list[DiskEntry]:
    """Wait until libxl has written the disks of guest ``fe_domid`` and waits for a backend (all in
    state Initialising). With ``fe_domid`` None: the first such guest (a guest already served is in
    InitWait or later, so it is never taken twice)."""
    root = f"/local/domain/{be_domid}/backend/{KIND}"
    token = "vdm-wait"
    xs.watch(root, token)
    whose = "a guest's" if fe_domid is None else f"dom{fe_domid}'s"
    log.info("waiting for %s virtio disk in %s", whose, root)
    deadline = None if timeout is None else time.monotonic() + timeout
    try:
        while True:
            if fe_domid is not None:
                candidates = [fe_domid]
            else:
                candidates = sorted(int(d) for d in xs.directory(root) if d.isdigit())
            for fe in candidates:
                disks = find_disks(xs, be_domid, fe)
                if disks and all(
                    xs.read_int(f"{d.backend}/state") == XENBUS_STATE_INITIALISING for d in disks
                ):
                    return disks
            wait = None if deadline is None else max(0.0, deadline - time.monotonic())
            if wait == 0.0:
                raise TimeoutError(
                    f"no virtio disk for {'a new guest' if fe_domid is None else f'dom{fe_domid}'}"
                )
            ready, _, _ = select.select([xs.fileno(), stop_fd], [], [], wait)
            if stop_fd in ready:
                raise InterruptedError("stopped while waiting for the toolstack")
            xs.events()
    finally:
        xs.unwatch(root, token)


class XsDisk:
    """The backend side of one disk's xenstore handshake (what virtio-disk does)."""

    def __init__(self, xs: XenStore, entry: DiskEntry) -> None:
        self.xs = xs
        self.entry = entry
        self.watching = False

    def connect(self) -> None:
        """Check both ends are Initialising and watch them (state InitWait is written later)."""
        e = self.entry
        state = self.xs.read_int(f"{e.backend}/state")
        if state != XENBUS_STATE_INITIALISING:
            raise XenStoreError(errno.EINVAL, f"{e.backend}: backend state is {state}, not Initialising")
        fstate = self.xs.read_int(f"{e.frontend}/state")
        if fstate != XENBUS_STATE_INITIALISING:
            raise XenStoreError(errno.EINVAL, f"{e.frontend}: frontend state is {fstate}, not Initialising")
        self.xs.watch(e.backend, e.backend)
        self.xs.watch(e.frontend, e.frontend)
        self.watching = True

    def ready(self) -> None:
        """The device is served: tell libxl (state InitWait)."""
        self.xs.write(f"{self.entry.backend}/state", str(XENBUS_STATE_INITWAIT))

    def ended(self) -> str | None:
        """Why this device is over (toolstack closed or removed it), or None while it lives."""
        e = self.entry
        be = self.xs.read_int(f"{e.backend}/state")
        if be is None or be == XENBUS_STATE_UNKNOWN:
            return f"{e.backend} removed"
        if be >= XENBUS_STATE_CLOSING:
            return f"{e.backend} closing (state {be})"
        fe = self.xs.read_int(f"{e.frontend}/state")
        if fe is None or fe == XENBUS_STATE_UNKNOWN or fe >= XENBUS_STATE_CLOSING:
            return f"{e.frontend} gone or closing"
        return None

    def disconnect(self) -> None:
        """State Closed and stop watching (the directory is libxl's: it removes it)."""
        e = self.entry
        if self.xs.read(f"{e.backend}/state") is not None:
            self.xs.write(f"{e.backend}/state", str(XENBUS_STATE_CLOSED))
        if self.watching:
            self.xs.unwatch(e.frontend, e.frontend)
            self.xs.unwatch(e.backend, e.backend)
            self.watching = False
