"""What vdm-net's poller thread watches: each queue pair's tap fd.

The thread is the core's :class:`vdm.poller.FdPoller`; :class:`TapPoller` tells it what to watch
-- a pair's tap fd readable while that pair may receive, writable while its transmit side is
blocked -- and which queues to kick when one is ready, so the device's ordinary queue processing
(which the base class serializes per queue) does the work. A pair that ran out of receive buffers
is not watched for reading at all until the driver's kick un-stalls it: no busy loop, no dropped
frames.
"""

from __future__ import annotations

import selectors
from typing import TYPE_CHECKING, Optional, Protocol, Sequence, cast

from vdm.poller import FdPoller, Interest

if TYPE_CHECKING:
    from vdm.device import VirtioDevice

__all__ = ["PolledPair", "TapPoller"]


class PolledPair(Protocol):
    """What the poller reads (and, for ``tx_blocked``, clears) on a queue pair.

    ``vdm_net.queue_pair.QueuePair`` is the one implementation; the device changes these fields and
    then calls :meth:`TapPoller.wake` so the poller re-reads them.
    """

    #: the pair's tap fd (None: no backend, never watched)
    fd: Optional[int]
    #: the driver uses this pair (VQ_PAIRS_SET)
    enabled: bool
    #: out of receive buffers: the tap is not read until the driver kicks the receive queue
    rx_stalled: bool
    #: the tap pushed back a write: watched for writability, cleared by the poller when writable
    tx_blocked: bool

    @property
    def rx_queue(self) -> int: ...

    @property
    def tx_queue(self) -> int: ...


class TapPoller(FdPoller):
    """One thread per device watching its pairs' tap fds (see :class:`PolledPair`)."""

    def __init__(self, device: VirtioDevice, pairs: Sequence[PolledPair], name: str = "vdm-net-io") -> None:
        self._device = device
        self._pairs = list(pairs)
        super().__init__(self._tap_interest, self._tap_ready, device.kick, name=name)

    def _tap_interest(self) -> Interest:
        dev = self._device
        running = dev.activated and dev.broken is None
        want: Interest = {}
        for pair in self._pairs:
            fd = pair.fd
            if fd is None or not (running and pair.enabled):
                continue
            mask = 0
            if not pair.rx_stalled and dev.queues[pair.rx_queue].active:
                mask |= selectors.EVENT_READ
            if pair.tx_blocked:
                mask |= selectors.EVENT_WRITE
            if mask:
                want[fd] = (mask, pair)
        return want

    @staticmethod
    def _tap_ready(tag: object, events: int) -> list[int]:
        p = cast(PolledPair, tag)  # (each fd's tag is its pair)
        kicks = []
        if events & selectors.EVENT_WRITE:
            p.tx_blocked = False
            kicks.append(p.tx_queue)
        if events & selectors.EVENT_READ:
            kicks.append(p.rx_queue)
        return kicks
