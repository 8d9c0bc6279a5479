"""virtio-mmio, modern (version 2) register interface (virtio 1.2, section 4.2.2).

:class:`MmioTransport` is an :class:`~vdm.iorange.IoHandler` for a 0x200-byte window: the
hypervisor routes guest accesses to it, it drives the device base. Interrupts go out through an
:class:`~vdm.interrupts.IrqLine` held high while InterruptStatus is not zero (level semantics; an
edge-only line sees the rising edges).
"""

from __future__ import annotations

import logging
import threading

from ..device import Status, VirtioDevice
from ..interrupts import IrqLine
from ..memory import GuestMemory
from ..virtqueue import Virtqueue, VirtqueueError

__all__ = ["MMIO_WINDOW_SIZE", "MmioTransport", "Reg"]

log = logging.getLogger(__name__)

MAGIC = 0x74726976  # "virt"
VERSION = 2
VENDOR_ID = 0x1AF4
MMIO_WINDOW_SIZE = 0x200

INT_VRING = 1
INT_CONFIG = 2


class Reg:
    """Register offsets."""

    MAGIC = 0x000
    VERSION = 0x004
    DEVICE_ID = 0x008
    VENDOR_ID = 0x00C
    DEVICE_FEATURES = 0x010
    DEVICE_FEATURES_SEL = 0x014
    DRIVER_FEATURES = 0x020
    DRIVER_FEATURES_SEL = 0x024
    QUEUE_SEL = 0x030
    QUEUE_NUM_MAX = 0x034
    QUEUE_NUM = 0x038
    QUEUE_READY = 0x044
    QUEUE_NOTIFY = 0x050
    INTERRUPT_STATUS = 0x060
    INTERRUPT_ACK = 0x064
    STATUS = 0x070
    QUEUE_DESC_LOW = 0x080
    QUEUE_DESC_HIGH = 0x084
    QUEUE_DRIVER_LOW = 0x090
    QUEUE_DRIVER_HIGH = 0x094
    QUEUE_DEVICE_LOW = 0x0A0
    QUEUE_DEVICE_HIGH = 0x0A4
    SHM_SEL = 0x0AC
    SHM_LEN_LOW = 0x0B0
    SHM_LEN_HIGH = 0x0B4
    SHM_BASE_LOW = 0x0B8
    SHM_BASE_HIGH = 0x0BC
    QUEUE_RESET = 0x0C0
    CONFIG_GENERATION = 0x0FC
    CONFIG = 0x100


def _set_low(value: int, low: int) -> int:
    return (value & ~0xFFFFFFFF) | (low & 0xFFFFFFFF)


def _set_high(value: int, high: int) -> int:
    return (value & 0xFFFFFFFF) | ((high & 0xFFFFFFFF) << 32)


class MmioTransport:
    """One virtio-mmio window in front of one device."""

    def __init__(self, device: VirtioDevice, memory: GuestMemory, irq: IrqLine) -> None:
        self.device = device
        self.memory = memory
        self.irq = irq
        self.device.memory = memory
        self.device.interrupts = self
        self.interrupt_status = 0
        self.device_features_sel = 0
        self.driver_features_sel = 0
        self.queue_sel = 0
        self._lock = threading.RLock()
        self._warned: set[tuple[str, int]] = set()

    # ---- DeviceInterrupts ------------------------------------------------------------------------

    def queue_interrupt(self, queue: Virtqueue) -> None:
        with self._lock:
            self.interrupt_status |= INT_VRING
            self.irq.set_level(True)

    def config_interrupt(self) -> None:
        with self._lock:
            self.interrupt_status |= INT_CONFIG
            self.irq.set_level(True)

    # ---- IoHandler -------------------------------------------------------------------------------

    def _queue(self) -> Virtqueue | None:
        if 0 <= self.queue_sel < len(self.device.queues):
            return self.device.queues[self.queue_sel]
        return None

    def _warn_once(self, what: str, offset: int) -> None:
        if (what, offset) not in self._warned:
            self._warned.add((what, offset))
            log.warning("%s: virtio-mmio %s at offset 0x%x ignored", self.device.name, what, offset)

    def read(self, offset: int, size: int) -> int:
        dev = self.device
        if offset >= Reg.CONFIG:
            if size not in (1, 2, 4, 8):
                return 0
            return int.from_bytes(dev.read_config(offset - Reg.CONFIG, size), "little")
        if size != 4 or offset % 4:
            self._warn_once(f"{size}-byte read", offset)
            return 0
        with self._lock:
            q = self._queue()
            if offset == Reg.MAGIC:
                return MAGIC
            if offset == Reg.VERSION:
                return VERSION
            if offset == Reg.DEVICE_ID:
                return dev.device_id
            if offset == Reg.VENDOR_ID:
                return VENDOR_ID
            if offset == Reg.DEVICE_FEATURES:
                if self.device_features_sel > 1:
                    return 0
                return (dev.features() >> (32 * self.device_features_sel)) & 0xFFFFFFFF
            if offset == Reg.QUEUE_NUM_MAX:
                return q.max_size if q else 0
            if offset == Reg.QUEUE_READY:
                return int(q.ready) if q else 0
            if offset == Reg.INTERRUPT_STATUS:
                return self.interrupt_status
            if offset == Reg.STATUS:
                return dev.status
            if offset == Reg.CONFIG_GENERATION:
                return dev.config_generation
            if offset in (Reg.SHM_LEN_LOW, Reg.SHM_LEN_HIGH):
                return 0xFFFFFFFF  # no shared memory regions
            if offset == Reg.QUEUE_RESET:
                return 0
            if q is not None and offset in _QUEUE_ADDR_REGS:
                attr, high = _QUEUE_ADDR_REGS[offset]
                value = getattr(q, attr)
                return (value >> 32) & 0xFFFFFFFF if high else value & 0xFFFFFFFF
            if offset == Reg.QUEUE_NUM:
                return q.size if q else 0
            return 0

    def write(self, offset: int, size: int, value: int) -> None:
        dev = self.device
        if offset >= Reg.CONFIG:
            if size in (1, 2, 4, 8):
                data = (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little")
                dev.write_config(offset - Reg.CONFIG, data)
            return
        if size != 4 or offset % 4:
            self._warn_once(f"{size}-byte write", offset)
            return
        value &= 0xFFFFFFFF
        if offset == Reg.QUEUE_NOTIFY:
            # Without ioeventfd the kick arrives here, on the vCPU (or ioreq) thread.
            dev.kick(value & 0xFFFF)
            return
        if offset == Reg.STATUS:
            # Not under the transport lock: a reset waits for in-flight requests, whose completions
            # raise interrupts through this transport.
            dev.set_status(value)
            if value == 0:
                with self._lock:
                    self.interrupt_status = 0
                    self.irq.set_level(False)
            return
        with self._lock:
            q = self._queue()
            if offset == Reg.DEVICE_FEATURES_SEL:
                self.device_features_sel = value
            elif offset == Reg.DRIVER_FEATURES:
                if self.driver_features_sel <= 1 and not dev.status & Status.FEATURES_OK:
                    shift = 32 * self.driver_features_sel
                    dev.driver_features = (dev.driver_features & ~(0xFFFFFFFF << shift)) | (value << shift)
            elif offset == Reg.DRIVER_FEATURES_SEL:
                self.driver_features_sel = value
            elif offset == Reg.QUEUE_SEL:
                self.queue_sel = value
            elif offset == Reg.INTERRUPT_ACK:
                self.interrupt_status &= ~value
                if not self.interrupt_status:
                    self.irq.set_level(False)
            elif q is None:
                self._warn_once("queue register write with no such queue", offset)
            elif offset == Reg.QUEUE_NUM:
                if not q.ready:
                    q.size = value
            elif offset == Reg.QUEUE_READY:
                self._set_queue_ready(q, bool(value & 1))
            elif offset == Reg.QUEUE_RESET:
                if value & 1:
                    with q.lock:
                        q.deactivate()
                        q.reset()
            elif offset in _QUEUE_ADDR_REGS:
                if q.ready:
                    self._warn_once("queue address write while ready", offset)
                    return
                attr, high = _QUEUE_ADDR_REGS[offset]
                cur = getattr(q, attr)
                setattr(q, attr, _set_high(cur, value) if high else _set_low(cur, value))
            else:
                self._warn_once("write to read-only or unknown register", offset)

    def _set_queue_ready(self, q: Virtqueue, ready: bool) -> None:
        dev = self.device
        if not ready:
            with q.lock:
                q.deactivate()
                q.ready = False
            return
        if q.ready:
            return
        q.ready = True
        if dev.status & Status.DRIVER_OK and dev.activated:
            # A queue enabled after DRIVER_OK (virtio 1.2 allows it with queue reset).
            try:
                dev.start_queue(q)
            except VirtqueueError as e:
                dev.fail(str(e))


_QUEUE_ADDR_REGS = {
    Reg.QUEUE_DESC_LOW: ("desc_addr", False),
    Reg.QUEUE_DESC_HIGH: ("desc_addr", True),
    Reg.QUEUE_DRIVER_LOW: ("avail_addr", False),
    Reg.QUEUE_DRIVER_HIGH: ("avail_addr", True),
    Reg.QUEUE_DEVICE_LOW: ("used_addr", False),
    Reg.QUEUE_DEVICE_HIGH: ("used_addr", True),
}
