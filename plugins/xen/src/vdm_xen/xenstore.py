"""Xenstore: reading what libxl wrote for a guest's virtio devices, and the backend handshake.

Two layouts, both under ``/local/domain/<backend>/backend/<kind>/<guest>/<devid>``:

* ``virtio_disk`` -- Xen 4.17+ libxl, for ``disk = [ '..., backendtype=standalone,
  specification=virtio' ]``: ``frontend`` (the guest-side path), ``state`` = 1 (Initialising),
  ``mode`` ("w" or "r"), ``params`` (the image), ``base`` (the virtio-mmio window, decimal in 4.17,
  ``0x`` hex later) and ``irq`` (the SPI). libxl then waits until the backend says ``state`` = 2
  (InitWait), so the device model must run before ``xl create``.
* ``virtio`` -- Xen 4.18+ libxl's generic devices, ``virtio = [ "type=virtio,device<ID>,
  transport=mmio, backend=<dom>, grant_usage=<0|1>" ]``: ``frontend``, ``frontend-id``, ``state`` = 1,
  ``base`` (``0x`` hex), ``irq``, ``type`` (``virtio,device<ID>``, the virtio device id in hex as in
  the device-tree binding: ``virtio,device1`` is a network card, ``virtio,device22`` an I2C
  adapter), ``transport`` ("mmio") and ``grant_usage`` ("0"/"1"). libxl carries no backend
  configuration for these and does not wait for the backend: the domain must be created paused
  (``xl create -p``) and unpaused once the backend is in InitWait.

The guest's driver is plain virtio-mmio and never speaks xenbus, so a served device's backend stays
in InitWait until it closes (state 6, Closed). A device vdm cannot serve (no plugin for its id, a
type string that names no id) is set to Closed at once.
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

__all__ = [
    "DiskEntry",
    "VirtioEntry",
    "XenStore",
    "XenStoreError",
    "XsDevice",
    "XsDisk",
    "find_devices",
    "find_disks",
    "wait_for_devices",
    "wait_for_disks",
]

log = logging.getLogger(__name__)

DISK_KIND = "virtio_disk"  # Xen 4.17+: virtio disks
GENERIC_KIND = "virtio"  # Xen 4.18+: generic virtio devices
KINDS = (DISK_KIND, GENERIC_KIND)
KIND = DISK_KIND  # the 4.17 name, kept for callers
#: what a generic device's ``type`` starts with; the virtio device id (hex) follows
TYPE_PREFIX = "virtio,device"
#: the virtio id of a ``virtio_disk`` device (block)
VIRTIO_ID_BLOCK = 2


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
class VirtioEntry:
    """One virtio device libxl described for a guest (either layout)."""

    backend: str  # the backend directory
    frontend: str
    fe_domid: int
    devid: int
    base: int
    irq: int
    kind: str = DISK_KIND  # the xenstore kind: "virtio_disk" or "virtio"
    #: the virtio device id (2 for a virtio_disk); None when the type names none
    virtio_id: int | None = VIRTIO_ID_BLOCK
    type: str = "disk"  # the ``type`` node of a generic device
    params: str | None = None  # virtio_disk: the image
    writable: bool = True  # virtio_disk: mode "w"
    grant_usage: bool = False  # generic: the guest gives grant references, not addresses


DiskEntry = VirtioEntry  # the 4.17-only name


def parse_virtio_type(text: str) -> int | None:
    """``virtio,device1`` -> 1, ``virtio,device22`` -> 0x22; None when it names no device id."""
    if not text.startswith(TYPE_PREFIX):
        return None
    tail = text[len(TYPE_PREFIX) :]
    if not tail or len(tail) > 4 or any(c not in "0123456789abcdefABCDEF" for c in tail):
        return None
    value = int(tail, 16)
    return value if value > 0 else None


def own_domid(xs: XenStore) -> int:
    """Our domain id (``domid`` relative to our own xenstore home; dom0 when absent)."""
    v = xs.read_int("domid")
    return 0 if v is None else v


def _entry(xs: XenStore, be_path: str, fe_domid: int, devid: int, kind: str = DISK_KIND) -> VirtioEntry:
    def need(key: str) -> str:
        v = xs.read(f"{be_path}/{key}")
        if v is None:
            raise XenStoreError(errno.ENOENT, f"{be_path}/{key} is missing")
        return v

    frontend = need("frontend")
    if kind == DISK_KIND:
        params = need("params")
        mode = need("mode")
    base = xs.read_int(f"{be_path}/base")
    irq = xs.read_int(f"{be_path}/irq")
    if base is None or irq is None:
        raise XenStoreError(errno.EINVAL, f"{be_path}: base/irq missing or not numbers")
    if kind == DISK_KIND:
        return VirtioEntry(
            be_path, frontend, fe_domid, devid, base, irq, params=params, writable=mode.startswith("w")
        )
    vtype = need("type")
    transport = xs.read(f"{be_path}/transport")
    if transport not in (None, "mmio"):
        raise XenStoreError(errno.EINVAL, f"{be_path}: transport {transport!r}, only mmio is served")
    return VirtioEntry(
        be_path,
        frontend,
        fe_domid,
        devid,
        base,
        irq,
        kind=GENERIC_KIND,
        virtio_id=parse_virtio_type(vtype),
        type=vtype,
        grant_usage=xs.read_int(f"{be_path}/grant_usage") == 1,
    )


def _devids(xs: XenStore, root: str) -> list[int]:
    return sorted(int(name) for name in xs.directory(root) if name.isdigit())


def find_devices(xs: XenStore, be_domid: int, fe_domid: int) -> list[VirtioEntry]:
    """Every virtio device libxl set up for guest ``fe_domid``, in both layouts: the disks first,
    then the generic devices, each by devid."""
    out = []
    for kind in KINDS:
        root = f"/local/domain/{be_domid}/backend/{kind}/{fe_domid}"
        out.extend(_entry(xs, f"{root}/{devid}", fe_domid, devid, kind) for devid in _devids(xs, root))
    return out


def find_disks(xs: XenStore, be_domid: int, fe_domid: int) -> list[VirtioEntry]:
    """The ``virtio_disk`` devices of guest ``fe_domid`` (the 4.17 layout alone)."""
    return [e for e in find_devices(xs, be_domid, fe_domid) if e.kind == DISK_KIND]


def wait_for_devices(
    xs: XenStore,
    be_domid: int,
    fe_domid: int | None,
    stop_fd: int,
    timeout: float | None = None,
    settle: float = 0.5,
) -> list[VirtioEntry]:
    """Wait until libxl has written the virtio devices of guest ``fe_domid`` (either layout) and they
    wait for a backend (all in state Initialising). With ``fe_domid`` None: the first such guest (a
    guest already served is in InitWait or later, so it is never taken twice).

    libxl writes one device per transaction: once a guest has devices, its list is taken only after
    ``settle`` seconds without a change, so a guest's later devices are not left out.
    """
    roots = [f"/local/domain/{be_domid}/backend/{kind}" for kind in KINDS]
    token = "vdm-wait"
    for root in roots:
        xs.watch(root, token)
    whose = "a guest's" if fe_domid is None else f"dom{fe_domid}'s"
    log.info("waiting for %s virtio devices in %s", whose, " and ".join(roots))
    deadline = None if timeout is None else time.monotonic() + timeout
    seen: tuple[int, list[str]] | None = None  # a candidate and its device list, waiting to settle
    try:
        while True:
            if fe_domid is not None:
                candidates = [fe_domid]
            else:
                candidates = sorted({d for root in roots for d in _devids(xs, root)})
            found = None
            for fe in candidates:
                devs = find_devices(xs, be_domid, fe)
                if devs and all(xs.read_int(f"{d.backend}/state") == XENBUS_STATE_INITIALISING for d in devs):
                    found = (fe, devs)
                    break
            if found is not None:
                key = (found[0], [d.backend for d in found[1]])
                if key == seen:
                    return found[1]
                seen = key
            else:
                seen = None
            wait = None if deadline is None else max(0.0, deadline - time.monotonic())
            if wait == 0.0 and seen is None:
                raise TimeoutError(
                    f"no virtio device for {'a new guest' if fe_domid is None else f'dom{fe_domid}'}"
                )
            if seen is not None:
                wait = settle
            ready, _, _ = select.select([xs.fileno(), stop_fd], [], [], wait)
            if stop_fd in ready:
                raise InterruptedError("stopped while waiting for the toolstack")
            if ready:
                xs.events()
                seen = None if seen is None else (-1, [])  # changed: look again, settle again
    finally:
        for root in roots:
            xs.unwatch(root, token)


def wait_for_disks(
    xs: XenStore, be_domid: int, fe_domid: int | None, stop_fd: int, timeout: float | None = None
) -> list[VirtioEntry]:
    """:func:`wait_for_devices` (kept under its 4.17 name)."""
    return wait_for_devices(xs, be_domid, fe_domid, stop_fd, timeout)


class XsDevice:
    """The backend side of one device's xenstore handshake (what virtio-disk does)."""

    def __init__(self, xs: XenStore, entry: VirtioEntry) -> None:
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

    def fail(self) -> None:
        """This device will not be served: state Closed now, so nothing waits for it."""
        self.xs.write(f"{self.entry.backend}/state", str(XENBUS_STATE_CLOSED))

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


XsDisk = XsDevice  # the 4.17-only name
