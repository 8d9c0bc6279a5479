"""virtio-mmio, modern (version 2) register interface (virtio 1.2, section 4.2.2).

:class:`MmioTransport` is an :class:`~vdm.iorange.IoHandler` for a 0x200-byte window: the
hypervisor routes guest accesses to it, it drives the device base. Interrupts go out through an
:class:`~vdm.interrupts.IrqLine` held high while InterruptStatus is not zero (level semantics; an
edge-only line sees the rising edges).
"""

from __future__ import annotations

import logging
import threading

from ..device import VirtioDevice
from ..interrupts import IrqLine
from ..memory import GuestMemory
from ..virtqueue import Virtqueue
from .common import RING_DESC, RING_DEVICE, RING_DRIVER, CommonConfig

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


class MmioTransport:
    """One virtio-mmio window in front of one device."""

    def __init__(
        self, device: VirtioDevice, memory: GuestMemory, irq: IrqLine, *, base: int = 0, irq_number: int = 0
    ) -> None:
        self.device = device
        self.memory = memory
        self.irq = irq
        #: guest-physical address of the window and the interrupt line's number (set by the Vmm
        #: that places the device, for the kernel command line / device tree; 0 if nobody did)
        self.base = base
        self.irq_number = irq_number
        self.device.memory = memory
        self.device.interrupts = self
        self.interrupt_status = 0
        #: feature, status and queue registers (the rules every transport shares)
        self.common = CommonConfig(device)
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
        if offset == _INTERRUPT_STATUS:  # (every interrupt handler's read: first, no lock needed)
            return self.interrupt_status
        common = self.common
        with self._lock:
            q = common.queue()
            if offset == Reg.MAGIC:
                return MAGIC
            if offset == Reg.VERSION:
                return VERSION
            if offset == Reg.DEVICE_ID:
                return dev.device_id
            if offset == Reg.VENDOR_ID:
                return VENDOR_ID
            if offset == Reg.DEVICE_FEATURES:
                return common.device_features_word()
            if offset == Reg.QUEUE_NUM_MAX:
                return q.max_size if q else 0
            if offset == Reg.QUEUE_READY:
                return int(q.ready) if q else 0
            if offset == Reg.STATUS:
                return dev.status
            if offset == Reg.CONFIG_GENERATION:
                return dev.config_generation
            if offset in (Reg.SHM_LEN_LOW, Reg.SHM_LEN_HIGH):
                return 0xFFFFFFFF  # no shared memory regions
            if offset == Reg.QUEUE_RESET:
                return 0
            if q is not None and offset in _QUEUE_ADDR_REGS:
                ring, half = _QUEUE_ADDR_REGS[offset]
                return (common.ring_address(q, ring) >> (32 * half)) & 0xFFFFFFFF
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
        if offset == _INTERRUPT_ACK:  # (every interrupt handler's write: first)
            with self._lock:
                self.interrupt_status &= ~value
                if not self.interrupt_status:
                    self.irq.set_level(False)
            return
        if offset == Reg.QUEUE_NOTIFY:
            # Without ioeventfd the kick arrives here, on the vCPU (or ioreq) thread.
            dev.kick(value & 0xFFFF)
            return
        common = self.common
        if offset == Reg.STATUS:
            # Not under the transport lock: a reset waits for in-flight requests, whose completions
            # raise interrupts through this transport.
            if common.write_status(value):
                with self._lock:
                    self.interrupt_status = 0
                    self.irq.set_level(False)
            return
        with self._lock:
            q = common.queue()
            if offset == Reg.DEVICE_FEATURES_SEL:
                common.device_features_sel = value
            elif offset == Reg.DRIVER_FEATURES:
                common.write_driver_features_word(value)
            elif offset == Reg.DRIVER_FEATURES_SEL:
                common.driver_features_sel = value
            elif offset == Reg.QUEUE_SEL:
                common.queue_sel = value
            elif q is None:
                self._warn_once("queue register write with no such queue", offset)
            elif offset == Reg.QUEUE_NUM:
                common.write_queue_size(q, value)
            elif offset == Reg.QUEUE_READY:
                if value & 1:
                    common.enable_queue(q)  # also after DRIVER_OK (virtio 1.2, with queue reset)
                else:
                    common.disable_queue(q)
            elif offset == Reg.QUEUE_RESET:
                if value & 1:
                    common.reset_queue(q)
            elif offset in _QUEUE_ADDR_REGS:
                ring, half = _QUEUE_ADDR_REGS[offset]
                if not common.write_ring_address(q, ring, value, half=half):
                    self._warn_once("queue address write while ready", offset)
            else:
                self._warn_once("write to read-only or unknown register", offset)


#: the registers an interrupt handler reads and writes, checked first
_INTERRUPT_STATUS = Reg.INTERRUPT_STATUS
_INTERRUPT_ACK = Reg.INTERRUPT_ACK

#: ring address registers: which ring, which 32-bit half
_QUEUE_ADDR_REGS = {
    Reg.QUEUE_DESC_LOW: (RING_DESC, 0),
    Reg.QUEUE_DESC_HIGH: (RING_DESC, 1),
    Reg.QUEUE_DRIVER_LOW: (RING_DRIVER, 0),
    Reg.QUEUE_DRIVER_HIGH: (RING_DRIVER, 1),
    Reg.QUEUE_DEVICE_LOW: (RING_DEVICE, 0),
    Reg.QUEUE_DEVICE_HIGH: (RING_DEVICE, 1),
}
