"""The plumbing every simulated library call shares: cffi-style wrapping, errno, handles.

:class:`LibCalls` is the base of the per-library parts of :class:`~vdm_xen.sim.lib.SimLib`.
"""

from __future__ import annotations

import errno
from typing import TYPE_CHECKING, Any, Callable

from ..abi import ffi
from .signatures import check_arg
from .state import SimEvtchn, SimXsConn

if TYPE_CHECKING:
    import threading

    from .xen import SimXen


class LibCalls:
    """What every call of a simulated library uses: argument/result conversion, errno, handles."""

    xen: SimXen
    domid: int
    _tls: threading.local

    # ---- plumbing -------------------------------------------------------------------------------

    def _wrap(self, name: str, ftype: Any, impl: Callable[..., Any]) -> Callable[..., Any]:
        args = ftype.args
        result = ftype.result

        def call(*a: Any) -> Any:
            if len(a) != len(args):
                raise TypeError(f"{name} expects {len(args)} arguments, got {len(a)}")
            conv = [check_arg(name, i, t, v) for i, (t, v) in enumerate(zip(args, a))]
            self.xen.calls.append(name)
            rv = impl(*conv)
            if result.kind == "pointer":
                return ffi.cast(result, rv if rv is not None else 0)
            if result.cname == "_Bool":
                return bool(rv)
            if result.cname == "void":
                return None
            return int(rv)

        call.__name__ = name
        return call

    @property
    def errno(self) -> int:
        return getattr(self._tls, "errno", 0)

    def _fail(self, err: int, ret: Any = -1) -> Any:
        self._tls.errno = err
        return ret

    @property
    def quiet_logger(self) -> Any:
        return ffi.cast("struct xentoollog_logger *", 0x7106)

    def _handle(self, kind: str, obj: Any) -> int:
        return self.xen.new_handle(kind, obj, self)

    def _get(self, kind: str, h: Any) -> Any:
        return self.xen.handle(kind, int(ffi.cast("uintptr_t", h)))

    # ---- opening and closing handles ------------------------------------------------------------

    def _dev_open(self, kind: str) -> int:
        x = self.xen
        if not x.privcmd:
            return self._fail(errno.ENOENT, 0)
        if not x.privileged:
            return self._fail(errno.EACCES, 0)
        return self._handle(kind, object())

    def _close(self, kind: str, h: Any) -> int:
        obj = self.xen.take_handle(kind, int(ffi.cast("uintptr_t", h)))
        if obj is None:
            self.xen.violation(f"closing a {kind} handle that is not open")
            return self._fail(errno.EBADF)
        if isinstance(obj, (SimEvtchn, SimXsConn)):
            if isinstance(obj, SimEvtchn) and obj.bound:
                self.xen.violation(f"evtchn handle closed with ports still bound: {sorted(obj.bound)}")
            obj.close()
        return 0
