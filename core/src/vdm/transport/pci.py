"""virtio-pci, modern (virtio 1.2, section 4.1), with MSI-X and INTx.

One :class:`VirtioPciTransport` is both the PCI function (configuration space with the virtio
vendor capabilities and an MSI-X capability) and the handler of its memory BAR:

==========  =====================================================
BAR0 offset what
==========  =====================================================
0x0000      common configuration (``virtio_pci_common_cfg``)
0x1000      ISR status (read to acknowledge; INTx only)
0x2000      device-specific configuration
0x3000      notifications: queue N at 0x3000 + 4 * N
0x4000      MSI-X table (16 bytes per vector)
0x5000      MSI-X pending bit array
==========  =====================================================

Interrupts go out as MSI-X messages through an :class:`~vdm.interrupts.MsiSink` when the guest
enables MSI-X, else on the INTx line with the ISR.
"""

from __future__ import annotations

import logging
import struct
import threading

from ..device import Status, VirtioDevice
from ..interrupts import IrqLine, MsiSink
from ..memory import GuestMemory
from ..virtqueue import Virtqueue, VirtqueueError
from .pci_config import (
    BAR0,
    CAP_PTR,
    CLASS_PROG,
    COMMAND,
    COMMAND_INTX_DISABLE,
    DEVICE_ID,
    HEADER_TYPE,
    INTERRUPT_LINE,
    INTERRUPT_PIN,
    REVISION,
    STATUS,
    STATUS_CAP_LIST,
    SUBSYSTEM_ID,
    SUBSYSTEM_VENDOR,
    VENDOR_ID,
    ConfigSpace,
)

__all__ = ["BAR_SIZE", "NOTIFY_OFFSET", "VirtioPciTransport"]

log = logging.getLogger(__name__)

VIRTIO_VENDOR = 0x1AF4
BAR_SIZE = 0x8000
BAR_MASK = 0xFFFFFFFF & ~(BAR_SIZE - 1)
COMMON_OFFSET = 0x0000
ISR_OFFSET = 0x1000
DEVICE_OFFSET = 0x2000
NOTIFY_OFFSET = 0x3000
NOTIFY_MULTIPLIER = 4
MSIX_TABLE_OFFSET = 0x4000
MSIX_PBA_OFFSET = 0x5000
NO_VECTOR = 0xFFFF

CAP_VENDOR = 0x09
CAP_MSIX = 0x11
CFG_COMMON, CFG_NOTIFY, CFG_ISR, CFG_DEVICE, CFG_PCI = 1, 2, 3, 4, 5

#: PCI class codes by virtio device id (class << 8 | subclass) << 8 | prog-if
CLASS_CODES = {1: 0x020000, 2: 0x018000, 3: 0x078000, 4: 0x00FF00, 5: 0x050000}

MSIX_ENABLE = 1 << 15
MSIX_MASKALL = 1 << 14


class VirtioPciTransport:
    """A virtio device on PCI: its configuration space and its BAR0 handler."""

    def __init__(
        self,
        device: VirtioDevice,
        memory: GuestMemory,
        *,
        msi: MsiSink | None = None,
        intx: IrqLine | None = None,
        bar_address: int = 0,
        irq_line: int = 0,
    ) -> None:
        self.device = device
        self.memory = memory
        self.msi = msi
        self.intx = intx
        device.memory = memory
        device.interrupts = self
        self.num_vectors = len(device.queues) + 1
        self.bar_address = bar_address
        self._lock = threading.RLock()
        # The MSI-X table is PCI function state: a virtio reset (status 0) leaves it alone.
        self.msix_table = bytearray(16 * self.num_vectors)
        for v in range(self.num_vectors):
            struct.pack_into("<I", self.msix_table, 16 * v + 12, 1)  # masked at power-on
        self.msix_pending = 0
        self._reset_transport_state()
        self.cfg = self._build_config_space(irq_line)

    def _reset_transport_state(self) -> None:
        self.device_feature_select = 0
        self.driver_feature_select = 0
        self.queue_select = 0
        self.config_vector = NO_VECTOR
        self.queue_vectors = [NO_VECTOR] * len(self.device.queues)
        self.isr = 0

    # ---- configuration space -------------------------------------------------------------------

    def _build_config_space(self, irq_line: int) -> ConfigSpace:
        cfg = ConfigSpace()
        dev = self.device
        cfg.set(VENDOR_ID, 2, VIRTIO_VENDOR)
        cfg.set(DEVICE_ID, 2, 0x1040 + dev.device_id)
        cfg.set(COMMAND, 2, 0, 0x0406)  # memory space, bus master, INTx disable
        cfg.set(STATUS, 2, STATUS_CAP_LIST)
        cfg.set(REVISION, 1, 1)
        cfg.set(CLASS_PROG, 3, CLASS_CODES.get(dev.device_id, 0xFF0000))
        cfg.set(HEADER_TYPE, 1, 0)
        cfg.set(BAR0, 4, self.bar_address, BAR_MASK)
        cfg.set(SUBSYSTEM_VENDOR, 2, VIRTIO_VENDOR)
        cfg.set(SUBSYSTEM_ID, 2, 0x40 + dev.device_id)
        cfg.set(INTERRUPT_LINE, 1, irq_line, 0xFF)
        cfg.set(INTERRUPT_PIN, 1, 1 if self.intx is not None else 0)
        caps = [
            (CFG_COMMON, COMMON_OFFSET, 0x3C, b""),
            (
                CFG_NOTIFY,
                NOTIFY_OFFSET,
                NOTIFY_MULTIPLIER * len(dev.queues),
                struct.pack("<I", NOTIFY_MULTIPLIER),
            ),
            (CFG_ISR, ISR_OFFSET, 1, b""),
            (CFG_DEVICE, DEVICE_OFFSET, 0x1000, b""),
        ]
        pos = 0x40
        cfg.set(CAP_PTR, 1, pos)
        for cfg_type, offset, length, extra in caps:
            cap_len = 16 + len(extra)
            body = struct.pack("<BBBBBBxxII", CAP_VENDOR, 0, cap_len, cfg_type, 0, 0, offset, length) + extra
            cfg.data[pos : pos + cap_len] = body
            cfg.data[pos + 1] = pos + cap_len  # next
            pos += cap_len
        # VIRTIO_PCI_CAP_PCI_CFG: a window onto the BARs through config space
        self._pci_cfg_cap = pos
        cfg.data[pos : pos + 20] = struct.pack(
            "<BBBBBBxxIII", CAP_VENDOR, pos + 20, 20, CFG_PCI, 0, 0, 0, 0, 0
        )
        cfg.wmask[pos + 4] = 0xFF  # bar
        cfg.wmask[pos + 8 : pos + 20] = b"\xff" * 12  # offset, length, data
        pos += 20
        # MSI-X
        self._msix_cap = pos
        cfg.data[pos : pos + 12] = struct.pack(
            "<BBHII", CAP_MSIX, 0, self.num_vectors - 1, MSIX_TABLE_OFFSET, MSIX_PBA_OFFSET
        )
        cfg.wmask[pos + 3] = (MSIX_ENABLE | MSIX_MASKALL) >> 8
        return cfg

    @property
    def msix_enabled(self) -> bool:
        return bool(self.cfg.get(self._msix_cap + 2, 2) & MSIX_ENABLE)

    @property
    def msix_masked(self) -> bool:
        return bool(self.cfg.get(self._msix_cap + 2, 2) & MSIX_MASKALL)

    def config_read(self, offset: int, size: int) -> int:
        cap = self._pci_cfg_cap
        if offset == cap + 16 and size in (1, 2, 4):
            return self._pci_cfg_window(read=True)
        return self.cfg.read(offset, size)

    def config_write(self, offset: int, size: int, value: int) -> None:
        cap = self._pci_cfg_cap
        if offset == cap + 16 and size in (1, 2, 4):
            self.cfg.write(offset, size, value)
            self._pci_cfg_window(read=False)
            return
        was_masked = self.msix_masked or not self.msix_enabled
        self.cfg.write(offset, size, value)
        if offset < BAR0 + 4 and BAR0 < offset + size:  # any byte of BAR0, not just the first
            bar = self.cfg.get(BAR0, 4)
            if bar not in (self.bar_address, BAR_MASK):  # BAR_MASK: the guest is sizing the BAR
                log.warning(
                    "%s: guest moved BAR0 to 0x%x; relocation is not supported, it stays at 0x%x",
                    self.device.name,
                    bar,
                    self.bar_address,
                )
                self.cfg.set(BAR0, 4, self.bar_address, BAR_MASK)
        if was_masked and self.msix_enabled and not self.msix_masked:
            self._deliver_pending()

    def _pci_cfg_window(self, read: bool) -> int:
        cap = self._pci_cfg_cap
        bar = self.cfg.get(cap + 4, 1)
        off = self.cfg.get(cap + 8, 4)
        length = self.cfg.get(cap + 12, 4)
        if bar != 0 or length not in (1, 2, 4) or off % length:
            return 0
        if read:
            return self.read(off, length)
        self.write(off, length, self.cfg.get(cap + 16, length))
        return 0

    # ---- interrupts ------------------------------------------------------------------------------

    def queue_interrupt(self, queue: Virtqueue) -> None:
        if self.msix_enabled:
            self._signal_vector(self.queue_vectors[queue.index])
        else:
            self._signal_intx(1)

    def config_interrupt(self) -> None:
        if self.msix_enabled:
            self._signal_vector(self.config_vector)
        else:
            self._signal_intx(2)

    def _signal_intx(self, bit: int) -> None:
        with self._lock:
            self.isr |= bit
            if self.intx is not None and not self.cfg.get(COMMAND, 2) & COMMAND_INTX_DISABLE:
                self.intx.set_level(True)

    def _signal_vector(self, vector: int) -> None:
        if vector >= self.num_vectors:
            return
        with self._lock:
            masked = self.msix_masked or struct.unpack_from("<I", self.msix_table, 16 * vector + 12)[0] & 1
            if masked:
                self.msix_pending |= 1 << vector
                return
            addr_lo, addr_hi, data = struct.unpack_from("<III", self.msix_table, 16 * vector)
        if self.msi is not None:
            self.msi.send_msi(addr_hi << 32 | addr_lo, data)

    def _deliver_pending(self) -> None:
        pending, self.msix_pending = self.msix_pending, 0
        for v in range(self.num_vectors):
            if pending >> v & 1:
                self._signal_vector(v)

    # ---- BAR0 ------------------------------------------------------------------------------------

    def read(self, offset: int, size: int) -> int:
        ones = (1 << (8 * size)) - 1 if size in (1, 2, 4, 8) else 0
        if COMMON_OFFSET <= offset < COMMON_OFFSET + 0x3C:
            return self._common_read(offset - COMMON_OFFSET, size)
        if offset == ISR_OFFSET:
            with self._lock:
                isr, self.isr = self.isr, 0
                if self.intx is not None:
                    self.intx.set_level(False)
            return isr
        if DEVICE_OFFSET <= offset < DEVICE_OFFSET + 0x1000 and size in (1, 2, 4, 8):
            return int.from_bytes(self.device.read_config(offset - DEVICE_OFFSET, size), "little")
        if MSIX_TABLE_OFFSET <= offset < MSIX_TABLE_OFFSET + len(self.msix_table) and size in (4, 8):
            off = offset - MSIX_TABLE_OFFSET
            with self._lock:
                return int.from_bytes(self.msix_table[off : off + size], "little")
        if MSIX_PBA_OFFSET <= offset < MSIX_PBA_OFFSET + 8 and size in (4, 8):
            return (self.msix_pending >> (8 * (offset - MSIX_PBA_OFFSET))) & ones
        return 0 if offset < BAR_SIZE else ones

    def write(self, offset: int, size: int, value: int) -> None:
        if NOTIFY_OFFSET <= offset < NOTIFY_OFFSET + NOTIFY_MULTIPLIER * len(self.device.queues):
            # Without ioeventfd the kick arrives here.
            self.device.kick((offset - NOTIFY_OFFSET) // NOTIFY_MULTIPLIER)
            return
        if COMMON_OFFSET <= offset < COMMON_OFFSET + 0x3C:
            self._common_write(offset - COMMON_OFFSET, size, value)
        elif DEVICE_OFFSET <= offset < DEVICE_OFFSET + 0x1000 and size in (1, 2, 4, 8):
            data = (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little")
            self.device.write_config(offset - DEVICE_OFFSET, data)
        elif (
            MSIX_TABLE_OFFSET <= offset <= MSIX_TABLE_OFFSET + len(self.msix_table) - size
            and size in (4, 8)
            and offset % 4 == 0  # else a write past the end would grow the table
        ):
            off = offset - MSIX_TABLE_OFFSET
            with self._lock:
                self.msix_table[off : off + size] = (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little")
                vector = off // 16
                unmasked = not struct.unpack_from("<I", self.msix_table, 16 * vector + 12)[0] & 1
                fire = unmasked and self.msix_pending >> vector & 1
                if fire:
                    self.msix_pending &= ~(1 << vector)
            if fire:
                self._signal_vector(vector)

    # ---- common configuration ----------------------------------------------------------------

    def _queue(self) -> Virtqueue | None:
        qs = self.device.queues
        return qs[self.queue_select] if 0 <= self.queue_select < len(qs) else None

    def _common_read(self, off: int, size: int) -> int:
        dev = self.device
        with self._lock:
            q = self._queue()
            qi = self.queue_select
            fields = {
                0x00: (4, self.device_feature_select),
                0x04: (
                    4,
                    (dev.features() >> (32 * self.device_feature_select)) & 0xFFFFFFFF
                    if self.device_feature_select <= 1
                    else 0,
                ),
                0x08: (4, self.driver_feature_select),
                0x0C: (
                    4,
                    (dev.driver_features >> (32 * self.driver_feature_select)) & 0xFFFFFFFF
                    if self.driver_feature_select <= 1
                    else 0,
                ),
                0x10: (2, self.config_vector),
                0x12: (2, len(dev.queues)),
                0x14: (1, dev.status),
                0x15: (1, dev.config_generation & 0xFF),
                0x16: (2, self.queue_select),
                0x18: (2, q.size if q else 0),
                0x1A: (2, self.queue_vectors[qi] if q else NO_VECTOR),
                0x1C: (2, int(q.ready) if q else 0),
                0x1E: (2, qi if q else 0),
                0x20: (8, q.desc_addr if q else 0),
                0x28: (8, q.avail_addr if q else 0),
                0x30: (8, q.used_addr if q else 0),
                0x38: (2, qi if q else 0),
                0x3A: (2, 0),
            }
        for base, (width, value) in fields.items():
            if base <= off < base + width and off + size <= base + width:
                return (value >> (8 * (off - base))) & ((1 << (8 * size)) - 1)
        return 0

    def _common_write(self, off: int, size: int, value: int) -> None:
        dev = self.device
        if off == 0x14 and size == 1:
            dev.set_status(value)  # not under our lock: a reset waits for in-flight completions
            if value == 0:
                with self._lock:
                    self._reset_transport_state()
                    if self.intx is not None:
                        self.intx.set_level(False)
            return
        start = False
        with self._lock:
            q = self._queue()
            if off == 0x00 and size == 4:
                self.device_feature_select = value
            elif off == 0x08 and size == 4:
                self.driver_feature_select = value
            elif off == 0x0C and size == 4:
                if self.driver_feature_select <= 1 and not dev.status & Status.FEATURES_OK:
                    shift = 32 * self.driver_feature_select
                    dev.driver_features = (dev.driver_features & ~(0xFFFFFFFF << shift)) | (
                        (value & 0xFFFFFFFF) << shift
                    )
            elif off == 0x10 and size == 2:
                self.config_vector = value if value < self.num_vectors else NO_VECTOR
            elif off == 0x16 and size == 2:
                self.queue_select = value
            elif q is None:
                return
            elif off == 0x18 and size == 2:
                if not q.ready:
                    q.size = value
            elif off == 0x1A and size == 2:
                self.queue_vectors[q.index] = value if value < self.num_vectors else NO_VECTOR
            elif off == 0x1C and size == 2:
                if value & 1 and not q.ready:
                    q.ready = True
                    start = dev.activated
                else:
                    return
            elif off == 0x3A and size == 2:
                if value & 1:
                    with q.lock:
                        q.deactivate()
                        q.reset()
                return
            elif off in (0x20, 0x28, 0x30) or off in (0x24, 0x2C, 0x34):
                if q.ready:
                    return
                attr = {0x20: "desc_addr", 0x28: "avail_addr", 0x30: "used_addr"}[off & ~7]
                cur = getattr(q, attr)
                if size == 8 and off % 8 == 0:
                    setattr(q, attr, value & 0xFFFFFFFFFFFFFFFF)
                elif size == 4:
                    shift = 32 if off % 8 else 0
                    setattr(q, attr, (cur & ~(0xFFFFFFFF << shift)) | ((value & 0xFFFFFFFF) << shift))
                return
            else:
                return
        if start and q is not None:  # a queue enabled after DRIVER_OK
            try:
                dev.start_queue(q)
            except VirtqueueError as e:
                dev.fail(str(e))
