"""The hello virtio device.

The skeleton has one queue and copies each request's device-readable bytes into its
device-writable buffers. Replace :meth:`HelloDevice.process_queue` with what your device does;
the guest is untrusted, and the core already checked every descriptor, address and length of
each chain it hands you (a bad chain marks the device DEVICE_NEEDS_RESET before you see it).
"""

from __future__ import annotations

from vdm.device import VirtioDevice
from vdm.virtqueue import Virtqueue

from .config import HelloConfig


class HelloDevice(VirtioDevice):
    #: Your device's id from the virtio specification (section 5). 0 is "no device": a guest
    #: driver ignores it, which is right until the device does something real.
    device_id = 0
    name = "hello"

    def __init__(self, config: HelloConfig | None = None) -> None:
        self.config = config if config is not None else HelloConfig()
        self.queue_max_sizes = (self.config.queue_size,)
        super().__init__()

    def device_features(self) -> int:
        """Device-specific feature bits (the core adds VERSION_1, EVENT_IDX, INDIRECT_DESC)."""
        return 0

    def config_space(self) -> bytes:
        """The device-specific configuration space the driver reads (none yet)."""
        return b""

    def process_queue(self, queue: Virtqueue) -> None:
        """The driver kicked the queue: serve every available request, then interrupt once."""
        while True:
            chain = queue.pop()
            if chain is None:
                break
            written = chain.write(chain.read())
            queue.push(chain, written)
        self.signal_used(queue)
