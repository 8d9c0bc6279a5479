"""vdm-blk's optional compiled serve step for raw images (issue 18): serve.c, built at install.

The split (device-neutral core, device logic here): :meth:`vdm.virtqueue.Virtqueue.serve_compiled`
runs core's ``vdm_serve_batch`` (vdm/fastpath/ring.c), which takes chains with the compiled ring
walk's checks, calls a device's C serve function on each and publishes the served ones with one
used-index store; this package is vdm-blk's serve function: a T_IN or write-back T_OUT request
laid out as Linux and QEMU lay it out, on a raw image's buffered file, read with
``preadv2(RWF_NOWAIT)`` or written with ``pwritev2`` straight into / from guest memory. Whatever it
does not serve -- another type or shape, a read that would block, qcow2, O_DIRECT, a read-only
disk, write-through, an error -- is left to the Python path (vdm_blk.device), which stays complete.

Selection at run time: the step is used when this module's ``_serve*.so`` imports and the core's
compiled path is active (``VDM_FASTPATH=0`` turns both off). :data:`STATUS` says which.

Invariant: a :class:`ServeStep` belongs to one open raw image; :meth:`ServeStep.close` (called by
the image before its file is closed) makes the C step serve nothing from then on.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import vdm.fastpath as _core

__all__ = ["BUILT", "STATUS", "ServeStep"]


def _import() -> tuple[Any, Any, str]:
    try:
        from ._serve import ffi, lib  # type: ignore[import-not-found]
    except ImportError as e:
        if not any(Path(__file__).parent.glob("_serve*.so")):
            return None, None, "not built: python3 -m vdm_blk.fastserve.build"
        return None, None, f"does not import: {e}"
    return ffi, lib, ""


_ffi, _lib, _why = _import()
#: the compiled serve step imports (the tests compare it with the Python path even when not used)
BUILT = _lib is not None
if not _core.ACTIVE:
    STATUS = f"python (core fast path: {_core.STATUS})"
else:
    STATUS = "compiled" if BUILT else f"python ({_why})"
#: True when raw images opened from now on serve through the compiled step
ACTIVE = STATUS == "compiled"


class ServeStep:
    """The compiled step bound to one raw image's file: hand ``fn`` and ``ctx`` to
    :meth:`vdm.virtqueue.Virtqueue.serve_compiled`; set :attr:`capacity` / :attr:`writes` when
    the disk's size or write-back state change."""

    __slots__ = ("_can_write", "_data", "_limits", "ctx", "fn")

    def __init__(
        self, fd: int, capacity: int, *, reads: bool, read_flags: int, writes: bool, write_flags: int,
        write_max: int,
    ) -> None:  # fmt: skip
        self._data = _ffi.new(
            "struct vdm_blk *",
            {"fd": fd, "reads": int(reads), "read_flags": read_flags, "writes": int(writes),
             "write_flags": write_flags, "capacity": capacity, "write_max": write_max},
        )  # fmt: skip
        self._can_write = writes
        self._limits = (capacity, writes)
        self.fn = _core.serve_function(int(_ffi.cast("uintptr_t", _ffi.addressof(_lib, "vdm_blk_serve"))))
        self.ctx = _core.serve_context(int(_ffi.cast("uintptr_t", self._data)))

    def set_limits(self, capacity: int, writes: bool) -> None:
        """The disk's size in sectors, and whether write-back writes may be served here (called
        for every batch: only a change reaches the C record)."""
        if self._limits == (capacity, writes):
            return
        self._limits = (capacity, writes)
        data = self._data
        data.capacity = capacity
        data.writes = writes and self._can_write

    def close(self) -> None:
        """Serve nothing from now on (the file is about to be closed)."""
        self._data.fd = -1
