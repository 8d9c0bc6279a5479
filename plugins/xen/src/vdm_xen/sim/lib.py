"""The simulated libraries as one namespace: :class:`SimLib`, a stand-in for
:class:`vdm_xen.bindings.XenLib` with the same function names and C signatures.

Each library's calls live in their own module (:mod:`.devicemodel`, :mod:`.foreignmemory`,
:mod:`.evtchn`, :mod:`.gnttab`, :mod:`.xenstore`); libxentoollog's and libc's few are here.
"""

from __future__ import annotations

import errno
import threading
from typing import TYPE_CHECKING, Any

from ..abi import ffi
from .devicemodel import DeviceModelCalls
from .evtchn import EvtchnCalls
from .foreignmemory import ForeignMemoryCalls
from .gnttab import GnttabCalls
from .signatures import SIGNATURES
from .xenstore import XenstoreCalls

if TYPE_CHECKING:
    from .xen import SimXen


class SimLib(DeviceModelCalls, ForeignMemoryCalls, EvtchnCalls, GnttabCalls, XenstoreCalls):
    """The library namespace of one simulated calling domain (normally dom0)."""

    XTL_CRITICAL = 9

    def __init__(self, xen: SimXen, domid: int = 0) -> None:
        self.ffi = ffi
        self.xen = xen
        self.domid = domid
        self._tls = threading.local()
        for name, ftype in SIGNATURES.items():
            impl = getattr(self, "_" + name)
            setattr(self, name, self._wrap(name, ftype, impl))

    # ---- libxentoollog / libc -------------------------------------------------------------------

    def _xtl_createlogger_stdiostream(self, f: Any, level: int, flags: int) -> int:
        return 0x7106

    def _xtl_logger_destroy(self, logger: Any) -> None:
        return None

    def _fdopen(self, fd: int, mode: bytes) -> int:
        return self._fail(errno.ENOSYS, 0)

    def _free(self, p: Any) -> None:
        if p == ffi.NULL:
            return
        addr = int(ffi.cast("uintptr_t", p))
        if not self.xen.free(addr):
            self.xen.violation(f"free() of 0x{addr:x}, which the library did not return")
