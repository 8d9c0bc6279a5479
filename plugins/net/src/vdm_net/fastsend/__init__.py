"""vdm-net's optional compiled transmit step (issue 18): send.c, built at install.

The split (device-neutral core, device logic here), as vdm-blk's ``fastserve``:
:meth:`vdm.virtqueue.Virtqueue.serve_compiled` runs core's ``vdm_serve_batch``
(vdm/fastpath/ring.c), which takes chains with the compiled ring walk's checks, calls a device's C
serve function on each and publishes the served ones with one used-index store, all in one call;
this package is vdm-net's serve function: a transmitted frame whose header
:func:`vdm_net.vnet_hdr.check_tx` would pass, checked by the same rules, re-packed the same way and
written to the tap with one ``writev`` straight from guest memory. Whatever it does not send -- a
header the rules refuse, writable buffers in the chain, more than ``MAX_IOV`` buffers, the tap
pushing back -- is left in the ring for the Python path (vdm_net.device's ``_send``), which stays
complete and decides, drops and counts it as before. A write that failed is not redone: the chain
is completed and the error handed to the caller to count (:meth:`TxStep.take`).

Selection at run time: the step is used when this module's ``_send*.so`` imports and the core's
compiled path is active (``VDM_FASTPATH=0`` turns both off). :data:`STATUS` says which.

Invariant: a :class:`TxStep` belongs to one queue pair's tap fd while the device is active, with the
transmit policy negotiated then; :meth:`TxStep.close` makes it send nothing from then on.
"""

from __future__ import annotations

import vdm.fastpath as _core

from ..vnet_hdr import HeaderPolicy

__all__ = ["ACTIVE", "BUILT", "SENT", "STATUS", "TAP_ERROR", "TxStep"]

#: the classes the step reports (serve_compiled's kinds): a frame sent, a chain whose write failed
SENT, TAP_ERROR = 1, 2


_step = _core.device_step(__name__, "_send", "vdm_net.fastsend.build")
_ffi = _step.ffi
#: the compiled step imports (the tests compare it with the Python path even when it is not used)
BUILT = _step.built
#: "compiled", or "python (<reason>)" (the core's path off, or this module not built)
STATUS = _step.status
#: True when devices activated from now on transmit through the compiled step
ACTIVE = STATUS == "compiled"


class TxStep:
    """The compiled transmit step bound to one tap fd and a transmit policy: hand ``fn`` and
    ``ctx`` to :meth:`vdm.virtqueue.Virtqueue.serve_compiled`, then :meth:`take` what it did."""

    __slots__ = ("_data", "ctx", "fn")

    def __init__(self, fd: int, policy: HeaderPolicy) -> None:
        self._data = _ffi.new(
            "struct vdm_net_tx *",
            {"fd": fd, "csum": int(policy.csum), "tso4": int(policy.tso4), "tso6": int(policy.tso6),
             "ecn": int(policy.ecn), "ufo": int(policy.ufo), "uso": int(policy.uso),
             "mtu": -1 if policy.mtu is None else policy.mtu},
        )  # fmt: skip
        self.fn, self.ctx = _step.bind("vdm_net_tx_send", self._data)

    def take(self) -> tuple[int, int]:
        """(frame bytes sent since the last take, the failed write's errno or 0; -1: it wrote
        short, -2: it failed without an errno), and clears both (the step sends again)."""
        d = self._data
        sent, err = d.bytes, d.err
        d.bytes = 0
        d.err = 0
        return sent, err

    def close(self) -> None:
        """Send nothing from now on (the fd is about to go)."""
        self._data.fd = -1
