"""The thread that watches a virtio-net device's tap fds.

It waits (``selectors``) on every queue pair's tap fd -- readable while that pair may receive,
writable while its transmit side is blocked -- and turns readiness into
:meth:`vdm.device.VirtioDevice.kick` calls, so the device's ordinary queue processing (which the
base class serializes per queue) does the work. A pair that ran out of receive buffers is not
watched for reading at all until the driver's kick un-stalls it: no busy loop, no dropped frames.
"""

from __future__ import annotations

import logging
import os
import selectors
import threading
from typing import TYPE_CHECKING, Optional, Protocol, Sequence

from vdm.eventfd import EFD_CLOEXEC, EFD_NONBLOCK, eventfd, eventfd_read, eventfd_write

if TYPE_CHECKING:
    from vdm.device import VirtioDevice

__all__ = ["PolledPair", "TapPoller"]

log = logging.getLogger(__name__)

JOIN_TIMEOUT = 5.0


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


class TapPoller:
    """One thread per device watching its pairs' tap fds (see :class:`PolledPair`)."""

    def __init__(self, device: VirtioDevice, pairs: Sequence[PolledPair], name: str = "vdm-net-io") -> None:
        self._device = device
        self._pairs = list(pairs)
        self._sel = selectors.DefaultSelector()
        #: wake-ups from other threads (vdm.eventfd: os.eventfd, or libc's on Python 3.9)
        self._wake_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC)
        self._sel.register(self._wake_fd, selectors.EVENT_READ, None)
        self._interest: dict[int, int] = {}
        self._scheduled: set[int] = set()
        self._lock = threading.Lock()
        self._stop = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def wake(self) -> None:
        """Re-read the pairs' state (a pair stalled, un-stalled, blocked, was enabled...)."""
        with self._lock:  # never write to a closed (and maybe reused) fd number
            self._poke()

    def schedule(self, queue_index: int) -> None:
        """Kick ``queue_index`` from the poller thread soon (a queue that yielded its turn)."""
        with self._lock:
            self._scheduled.add(queue_index)
            self._poke()

    def _poke(self) -> None:
        if self._wake_fd >= 0:
            try:
                eventfd_write(self._wake_fd)
            except BlockingIOError:
                pass  # the counter is at its maximum: a wake-up is pending anyway

    def stop(self) -> None:
        """Stop the thread and wait for it (unless called from it)."""
        self._stop = True
        self.wake()
        if threading.current_thread() is not self._thread and self._thread.is_alive():
            self._thread.join(JOIN_TIMEOUT)
            if self._thread.is_alive():
                log.warning("%s: poller thread did not stop within %.0f s", self._device.name, JOIN_TIMEOUT)

    # ---- the thread -------------------------------------------------------------------------------

    def _sync(self) -> None:
        dev = self._device
        running = dev.activated and dev.broken is None
        for pair in self._pairs:
            fd = pair.fd
            if fd is None:
                continue
            mask = 0
            if running and pair.enabled:
                if not pair.rx_stalled and dev.queues[pair.rx_queue].active:
                    mask |= selectors.EVENT_READ
                if pair.tx_blocked:
                    mask |= selectors.EVENT_WRITE
            old = self._interest.get(fd, 0)
            if mask == old:
                continue
            if old == 0:
                self._sel.register(fd, mask, pair)
            elif mask == 0:
                self._sel.unregister(fd)
            else:
                self._sel.modify(fd, mask, pair)
            if mask:
                self._interest[fd] = mask
            else:
                self._interest.pop(fd, None)

    def _run(self) -> None:
        try:
            while not self._stop:
                self._sync()
                kicks: list[int] = []
                for key, events in self._sel.select():
                    if key.data is None:
                        try:
                            eventfd_read(self._wake_fd)
                        except BlockingIOError:
                            pass
                        continue
                    pair: PolledPair = key.data
                    if events & selectors.EVENT_WRITE:
                        pair.tx_blocked = False
                        kicks.append(pair.tx_queue)
                    if events & selectors.EVENT_READ:
                        kicks.append(pair.rx_queue)
                with self._lock:
                    kicks.extend(self._scheduled)
                    self._scheduled.clear()
                for index in kicks:
                    if self._stop:
                        break
                    self._device.kick(index)
        except Exception:
            log.exception("%s: poller thread failed", self._device.name)
        finally:
            self._sel.close()
            with self._lock:
                os.close(self._wake_fd)
                self._wake_fd = -1
