"""libxenevtchn, simulated: interdomain event channels over a pipe per handle."""

from __future__ import annotations

import errno
import os
from typing import Any

from .calls import LibCalls
from .state import SimEvtchn


class EvtchnCalls(LibCalls):
    """The ``xenevtchn_*`` calls of :class:`~vdm_xen.sim.lib.SimLib`."""

    # ---- libxenevtchn -----------------------------------------------------------------------------

    def _xenevtchn_open(self, logger: Any, flags: int) -> int:
        if not self.xen.privcmd:
            return self._fail(errno.ENOENT, 0)
        return self._handle("xce", SimEvtchn())

    def _xenevtchn_close(self, xce: Any) -> int:
        return self._close("xce", xce)

    def _xenevtchn_fd(self, xce: Any) -> int:
        e = self._get("xce", xce)
        return e.r if e is not None else self._fail(errno.EBADF)

    def _xenevtchn_bind_interdomain(self, xce: Any, domid: int, remote: int) -> int:
        x = self.xen
        e = self._get("xce", xce)
        if e is None:
            return self._fail(errno.EBADF)
        d = x.domains.get(domid)
        if d is None or not d.alive:
            return self._fail(errno.ESRCH)
        with x.lock:
            owner = x.xen_ports.get((domid, remote))
            if owner is None or owner[0].emulator != self.domid:
                x.violation(f"bind_interdomain to dom{domid} port {remote}: not an ioreq port for us")
                return self._fail(errno.EINVAL)
            if (domid, remote) in x.port_binding:
                return self._fail(errno.EINVAL)
            local = x.next_port()
            e.bound[local] = (domid, remote)
            x.port_binding[(domid, remote)] = (e, local)
        return local

    def _xenevtchn_unbind(self, xce: Any, port: int) -> int:
        e = self._get("xce", xce)
        if e is None:
            return self._fail(errno.EBADF)
        with self.xen.lock:
            peer = e.bound.pop(port, None)
            if peer is None:
                return self._fail(errno.EINVAL)
            self.xen.port_binding.pop(peer, None)
            e.masked.discard(port)
            e.pending.discard(port)
        return 0

    def _xenevtchn_notify(self, xce: Any, port: int) -> int:
        e = self._get("xce", xce)
        if e is None:
            return self._fail(errno.EBADF)
        with self.xen.lock:
            peer = e.bound.get(port)
        if peer is None:
            return self._fail(errno.EINVAL)
        self.xen.notify_xen(peer)
        return 0

    def _xenevtchn_pending(self, xce: Any) -> int:
        e = self._get("xce", xce)
        if e is None:
            return self._fail(errno.EBADF)
        try:
            data = os.read(e.r, 4)
        except BlockingIOError:
            self.xen.violation("xenevtchn_pending with nothing pending (the real call would block)")
            return self._fail(errno.EAGAIN)
        return int.from_bytes(data, "little")

    def _xenevtchn_unmask(self, xce: Any, port: int) -> int:
        e = self._get("xce", xce)
        if e is None:
            return self._fail(errno.EBADF)
        with self.xen.lock:
            if port not in e.bound:
                return self._fail(errno.EINVAL)
            e.masked.discard(port)
            again = port in e.pending
            e.pending.discard(port)
        if again:
            self.xen.deliver_event(e, port)
        return 0
