"""virtio-rng (virtio 1.2, section 5.4): an entropy source for the guest.

One queue, ``requestq``. The driver posts device-writable buffers; the device fills them with
random bytes and returns them with the number of bytes written. There are no feature bits and no
configuration space. A request may carry device-readable buffers too (the spec tells drivers not
to); they are ignored. A request is served with at most ``max_bytes`` bytes -- the driver reads
the used length, so a partial fill is allowed.
"""

from __future__ import annotations

import os
from typing import Callable

from vdm.device import VirtioDevice
from vdm.virtqueue import Virtqueue

from .config import RngConfig

VIRTIO_ID_RNG = 4


class RngDevice(VirtioDevice):
    device_id = VIRTIO_ID_RNG
    name = "rng"

    def __init__(self, config: RngConfig | None = None, source: Callable[[int], bytes] = os.urandom) -> None:
        self.config = config if config is not None else RngConfig()
        self.queue_max_sizes = (self.config.queue_size,)
        super().__init__()
        self._random = source
        #: random bytes handed to the guest so far
        self.bytes_served = 0

    def process_queue(self, queue: Virtqueue) -> None:
        while True:
            chain = queue.pop()
            if chain is None:
                break
            want = min(chain.writable_len, self.config.max_bytes)
            written = chain.write(self._random(want)) if want else 0
            self.bytes_served += written
            queue.push(chain, written)
        self.signal_used(queue)
