"""virtio-rng (virtio 1.2, section 5.4): the guest's /dev/hwrng, from a host source.

One queue, ``requestq``; no feature bits, no configuration space. The driver posts
device-writable buffers; the device fills each with bytes read from its source (at most
:data:`MAX_REQUEST` per request: a huge buffer is filled in part, which the driver reads from the
used length) and returns it. Device-readable buffers in a request are ignored.

Rate limit (``rate=``/``period=``, see :mod:`vdm_virtio_rng.limit`): a request is answered whole
(its writable room, at most MAX_REQUEST, or the whole quota if that is smaller) or not yet. When
the window has too little quota left, the device keeps that one request aside and takes no
more from the guest's ring; its waker kicks the queue when the window ends, and they are served
then. Linux's virtio-rng stalls on answers cut short (seen with 6.1: a 51-byte answer to its
64-byte request, the window's rest, and its reader waited until its timeout), so the quota is
never used to cut one. Nothing waits under the device's state lock or in the kicking thread,
and a request is never answered with 0 bytes for lack of quota. The quota is the device's, not
the driver's: a reset does not renew it (a guest cannot reset its way past the limit); a reset
forgets the pending wake-up and the request kept aside (they went with the ring), and
:meth:`RngDevice.close` ends the waker's thread.

A source that ends (a file read to its end) or fails to read (EIO) fails the device with one log
line (DEVICE_NEEDS_RESET). Linux's virtio-rng cannot use a 0-byte answer: it posts its next
request only after it consumed bytes, so an empty answer would leave its reader blocked with
nothing pending and no word on the host of why.
"""

from __future__ import annotations

import os
import stat
import threading
import time
from typing import Callable, Optional

from vdm.chain import DescriptorChain
from vdm.device import VirtioDevice
from vdm.virtqueue import Virtqueue

from .config import RngConfig
from .limit import RateLimit, Waker

__all__ = ["MAX_REQUEST", "VIRTIO_ID_RNG", "RngDevice", "open_source"]

VIRTIO_ID_RNG = 4

#: most bytes read for one request (Linux asks for 64 at a time; a larger buffer gets this many)
MAX_REQUEST = 64 * 1024


def open_source(path: str) -> int:
    """Open an entropy source for reading; raises OSError, or ValueError for a file that is not a
    character device or regular file (a FIFO or socket waits for a writer and would stall the
    device). Opened non-blocking, so a FIFO with no writer is refused rather than waited for; the
    fd is made blocking once its type is known."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    try:
        mode = os.fstat(fd).st_mode
        if not (stat.S_ISCHR(mode) or stat.S_ISREG(mode)):
            raise ValueError("not a character device or regular file (a FIFO or socket would stall it)")
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


class RngDevice(VirtioDevice):
    """virtio-rng over a source fd, optionally rate-limited.

    Invariants: ``bytes_served`` counts every byte returned to the driver; with a limit, the
    bytes returned in any window of the limit's clock are at most ``config.quota``.
    """

    device_id = VIRTIO_ID_RNG
    name = "rng"

    def __init__(
        self,
        config: Optional[RngConfig] = None,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """Opens ``config.source`` (OSError/ValueError as :func:`open_source`). ``clock``: the
        monotonic seconds the rate limit counts in (tests inject their own)."""
        self.config = config if config is not None else RngConfig()
        self.queue_max_sizes = (self.config.queue_size,)
        super().__init__()
        self._fd = open_source(self.config.source)
        self._fd_lock = threading.Lock()
        self._limit: Optional[RateLimit] = None
        if self.config.quota:
            self._limit = RateLimit(self.config.quota, self.config.period / 1000, clock)
        self._waker = Waker(lambda: self.kick(0), clock, name=f"vdm-rng-wait:{self.config.source}")
        #: the request taken from the ring that waits for quota (only process_queue, which the
        #: queue's kick lock serializes, and on_reset change it)
        self._waiting_chain: Optional[DescriptorChain] = None
        #: random bytes handed to the guest so far
        self.bytes_served = 0

    @property
    def waiting(self) -> bool:
        """Requests wait for the rate limit's next window (a wake-up is armed)."""
        return self._waker.pending

    @property
    def waker_running(self) -> bool:
        """The waker's thread exists and has not ended (False after :meth:`close`)."""
        return self._waker.running

    def _read(self, n: int) -> Optional[bytes]:
        """Up to ``n`` bytes of the source, or None after failing the device (end or error)."""
        with self._fd_lock:
            if self._fd < 0:
                self.fail("the device is closed")
                return None
            try:
                data = os.read(self._fd, n)
            except OSError as e:
                self.fail(f"cannot read the source {self.config.source}: {e.strerror or e}")
                return None
        if not data:
            self.fail(f"the source {self.config.source} ended after {self.bytes_served} bytes")
            return None
        return data

    def process_queue(self, queue: Virtqueue) -> None:
        limit = self._limit
        while True:
            chain, self._waiting_chain = self._waiting_chain, None
            if chain is not None and chain.epoch != queue.epoch:
                chain = None  # taken before a reset: that ring is gone
            if chain is None:
                chain = queue.pop()
            if chain is None:
                break
            want = min(chain.writable_len, MAX_REQUEST)
            if limit is not None and want:
                room = limit.available()
                if room < min(want, limit.quota):
                    # answered whole in a later window (a cut answer stalls Linux's driver)
                    self._waiting_chain = chain
                    self._waker.arm(limit.window_end())
                    break
                want = min(want, room)
            written = 0
            if want:
                data = self._read(want)
                if data is None:
                    return  # the device failed; the reset that follows forgets the chain
                written = chain.write(data)
                if limit is not None:
                    limit.charge(written)
            self.bytes_served += written
            queue.push(chain, written)
        self.signal_used(queue)

    def on_reset(self) -> None:
        self._waker.cancel()
        chain, self._waiting_chain = self._waiting_chain, None
        if chain is not None:
            self.queues[0].discard(chain)

    def close(self) -> None:
        """End the waker's thread and close the source (idempotent)."""
        self._waker.close()
        with self._fd_lock:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1
