"""The virtio transport rules every transport shares, written once (virtio 1.2, 2.1-2.4, 4.1.4.3, 4.2.2).

virtio-mmio's registers and virtio-pci's common configuration structure carry the same state
machine under different offsets: feature words chosen by a select register, the device status,
a queue chosen by a select register with its size, ring addresses, enable and reset.
:class:`CommonConfig` is that state machine; :mod:`.mmio` and :mod:`.pci` decode their offsets and
delegate to it register by register, and vhost-user's handler uses :meth:`CommonConfig.enable_queue`
for a ring that starts (the same rule: a queue enabled after DRIVER_OK starts at once).

Rules (each a guest write that is *ignored*, as the spec lets a device do, never an error):

* driver feature words are taken only before FEATURES_OK and only for select 0 and 1; device
  feature words past 1 read as 0;
* a queue's size and ring addresses change only while the queue is not ready (a 64-bit address
  may be written whole or as two 32-bit halves);
* queue enable 1 on a ready queue does nothing; a queue enabled while the device runs is mapped at
  once (a bad ring fails the device); virtio-mmio's QueueReady 0 unmaps the queue (pci has none);
* queue reset 1 unmaps the queue and forgets it (a completion of a request taken before is dropped);
* status 0 resets the device (waiting for requests in flight) and then the select registers.

Invariant: the transport holds its own lock around each call except :meth:`write_status` (a reset
waits for completions, whose interrupts take that lock); the device's queues are changed only
through the :class:`~vdm.virtqueue.Virtqueue` configuration methods.
"""

from __future__ import annotations

from ..device import Status, VirtioDevice
from ..virtqueue import Virtqueue, VirtqueueError

__all__ = ["RING_DESC", "RING_DEVICE", "RING_DRIVER", "CommonConfig"]

#: the three ring addresses, by the names the spec gives them (desc, driver = avail, device = used)
RING_DESC, RING_DRIVER, RING_DEVICE = 0, 1, 2

_LOW = 0xFFFFFFFF


class CommonConfig:
    """Feature, status and queue registers of one device (module doc)."""

    def __init__(self, device: VirtioDevice) -> None:
        self.device = device
        self.reset_selectors()

    def reset_selectors(self) -> None:
        """Select registers back to 0 (after a device reset)."""
        self.device_features_sel = 0
        self.driver_features_sel = 0
        self.queue_sel = 0

    # ---- features ------------------------------------------------------------------------------

    def device_features_word(self) -> int:
        """The 32 bits of the device's features that ``device_features_sel`` chooses."""
        sel = self.device_features_sel
        return (self.device.features() >> (32 * sel)) & _LOW if sel <= 1 else 0

    def driver_features_word(self) -> int:
        """The 32 bits of the driver's features that ``driver_features_sel`` chooses."""
        sel = self.driver_features_sel
        return (self.device.driver_features >> (32 * sel)) & _LOW if sel <= 1 else 0

    def write_driver_features_word(self, value: int) -> None:
        """The driver wrote the feature word ``driver_features_sel`` chooses."""
        dev = self.device
        sel = self.driver_features_sel
        if sel <= 1 and not dev.status & Status.FEATURES_OK:
            shift = 32 * sel
            dev.driver_features = (dev.driver_features & ~(_LOW << shift)) | ((value & _LOW) << shift)

    # ---- status ----------------------------------------------------------------------------------

    def write_status(self, value: int) -> bool:
        """The driver wrote the status register; True if that was a reset (the transport then
        clears its own interrupt state). Call without the transport's lock (module doc)."""
        self.device.set_status(value)
        if value & 0xFF:
            return False
        self.reset_selectors()
        return True

    # ---- the selected queue ----------------------------------------------------------------------

    def queue(self) -> Virtqueue | None:
        """The queue ``queue_sel`` chooses, or None past the last one."""
        qs = self.device.queues
        return qs[self.queue_sel] if 0 <= self.queue_sel < len(qs) else None

    def write_queue_size(self, q: Virtqueue, value: int) -> None:
        if not q.ready:
            q.set_size(value)

    def ring_address(self, q: Virtqueue, ring: int) -> int:
        return (q.desc_addr, q.avail_addr, q.used_addr)[ring]

    def write_ring_address(self, q: Virtqueue, ring: int, value: int, *, half: int | None = None) -> bool:
        """Set ring ``ring`` (RING_DESC/DRIVER/DEVICE) of ``q`` to ``value``, or only its low
        (``half=0``) or high (``half=1``) 32 bits. False (ignored) while the queue is ready."""
        if q.ready:
            return False
        if half is not None:
            cur = self.ring_address(q, ring)
            shift = 32 * half
            value = (cur & ~(_LOW << shift)) | ((value & _LOW) << shift)
        value &= 0xFFFFFFFFFFFFFFFF
        (q.set_desc_addr, q.set_avail_addr, q.set_used_addr)[ring](value)
        return True

    def enable_queue(self, q: Virtqueue) -> bool:
        """Queue enable 1: the queue is ready; if the device already runs it starts now.

        Returns True if it started (the caller may kick it); False if it waits for DRIVER_OK, was
        ready already, or its rings are bad (then the device is failed with one log line).
        """
        if q.ready:
            return False
        q.set_ready(True)
        dev = self.device
        if not dev.activated:
            return False
        try:
            dev.start_queue(q)
        except VirtqueueError as e:
            dev.fail(str(e))
            return False
        return True

    def disable_queue(self, q: Virtqueue) -> None:
        """virtio-mmio QueueReady 0: stop serving the queue, keep its configuration."""
        with q.lock:
            q.deactivate()
            q.set_ready(False)

    def reset_queue(self, q: Virtqueue) -> None:
        """Queue reset: unmap the queue and forget it (virtio 1.2, 2.6.1)."""
        with q.lock:
            q.deactivate()
            q.reset()
