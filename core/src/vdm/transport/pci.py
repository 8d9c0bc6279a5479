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

from ..device import VirtioDevice
from ..interrupts import IrqLine, MsiSink
from ..memory import GuestMemory
from ..virtqueue import Virtqueue
from .common import RING_DESC, RING_DEVICE, RING_DRIVER, CommonConfig
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

__all__ = ["BAR_SIZE", "NOTIFY_OFFSET", "CommonCfg", "VirtioPciTransport"]

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


class CommonCfg:
    """Offsets in ``struct virtio_pci_common_cfg`` (virtio 1.2, 4.1.4.3), the one table the
    transport and :mod:`vdm.testing`'s PCI driver use; ``WIDTH`` gives each field's bytes."""

    DEVICE_FEATURE_SELECT = 0x00
    DEVICE_FEATURE = 0x04
    DRIVER_FEATURE_SELECT = 0x08
    DRIVER_FEATURE = 0x0C
    CONFIG_MSIX_VECTOR = 0x10
    NUM_QUEUES = 0x12
    DEVICE_STATUS = 0x14
    CONFIG_GENERATION = 0x15
    QUEUE_SELECT = 0x16
    QUEUE_SIZE = 0x18
    QUEUE_MSIX_VECTOR = 0x1A
    QUEUE_ENABLE = 0x1C
    QUEUE_NOTIFY_OFF = 0x1E
    QUEUE_DESC = 0x20
    QUEUE_DRIVER = 0x28
    QUEUE_DEVICE = 0x30
    QUEUE_NOTIFY_DATA = 0x38
    QUEUE_RESET = 0x3A
    #: bytes of the structure
    SIZE = 0x3C

    WIDTH = {
        DEVICE_FEATURE_SELECT: 4,
        DEVICE_FEATURE: 4,
        DRIVER_FEATURE_SELECT: 4,
        DRIVER_FEATURE: 4,
        CONFIG_MSIX_VECTOR: 2,
        NUM_QUEUES: 2,
        DEVICE_STATUS: 1,
        CONFIG_GENERATION: 1,
        QUEUE_SELECT: 2,
        QUEUE_SIZE: 2,
        QUEUE_MSIX_VECTOR: 2,
        QUEUE_ENABLE: 2,
        QUEUE_NOTIFY_OFF: 2,
        QUEUE_DESC: 8,
        QUEUE_DRIVER: 8,
        QUEUE_DEVICE: 8,
        QUEUE_NOTIFY_DATA: 2,
        QUEUE_RESET: 2,
    }


#: the 64-bit ring address fields: which ring
_RING_FIELDS = {
    CommonCfg.QUEUE_DESC: RING_DESC,
    CommonCfg.QUEUE_DRIVER: RING_DRIVER,
    CommonCfg.QUEUE_DEVICE: RING_DEVICE,
}


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
        slot: int = 0,
    ) -> None:
        self.device = device
        self.memory = memory
        self.msi = msi
        self.intx = intx
        #: the PCI slot the Vmm put the function in (0 if nobody did)
        self.slot = slot
        device.memory = memory
        device.interrupts = self
        #: feature, status and queue registers (the rules every transport shares)
        self.common = CommonConfig(device)
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
        self.common.reset_selectors()
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
            (CFG_COMMON, COMMON_OFFSET, CommonCfg.SIZE, b""),
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
        if COMMON_OFFSET <= offset < COMMON_OFFSET + CommonCfg.SIZE:
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
        if COMMON_OFFSET <= offset < COMMON_OFFSET + CommonCfg.SIZE:
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

    def _common_read(self, off: int, size: int) -> int:
        dev = self.device
        common = self.common
        R = CommonCfg
        with self._lock:
            q = common.queue()
            qi = common.queue_sel
            fields = {
                R.DEVICE_FEATURE_SELECT: common.device_features_sel,
                R.DEVICE_FEATURE: common.device_features_word(),
                R.DRIVER_FEATURE_SELECT: common.driver_features_sel,
                R.DRIVER_FEATURE: common.driver_features_word(),
                R.CONFIG_MSIX_VECTOR: self.config_vector,
                R.NUM_QUEUES: len(dev.queues),
                R.DEVICE_STATUS: dev.status,
                R.CONFIG_GENERATION: dev.config_generation & 0xFF,
                R.QUEUE_SELECT: qi,
                R.QUEUE_SIZE: q.size if q else 0,
                R.QUEUE_MSIX_VECTOR: self.queue_vectors[qi] if q else NO_VECTOR,
                R.QUEUE_ENABLE: int(q.ready) if q else 0,
                R.QUEUE_NOTIFY_OFF: qi if q else 0,
                R.QUEUE_DESC: q.desc_addr if q else 0,
                R.QUEUE_DRIVER: q.avail_addr if q else 0,
                R.QUEUE_DEVICE: q.used_addr if q else 0,
                R.QUEUE_NOTIFY_DATA: qi if q else 0,
                R.QUEUE_RESET: 0,
            }
        for base, value in fields.items():
            width = R.WIDTH[base]
            if base <= off < base + width and off + size <= base + width:
                return (value >> (8 * (off - base))) & ((1 << (8 * size)) - 1)
        return 0

    def _common_write(self, off: int, size: int, value: int) -> None:
        common = self.common
        R = CommonCfg
        if off == R.DEVICE_STATUS and size == 1:
            if common.write_status(value):  # not under our lock: a reset waits for in-flight completions
                with self._lock:
                    self._reset_transport_state()
                    if self.intx is not None:
                        self.intx.set_level(False)
            return
        with self._lock:
            q = common.queue()
            if off == R.DEVICE_FEATURE_SELECT and size == 4:
                common.device_features_sel = value
            elif off == R.DRIVER_FEATURE_SELECT and size == 4:
                common.driver_features_sel = value
            elif off == R.DRIVER_FEATURE and size == 4:
                common.write_driver_features_word(value)
            elif off == R.CONFIG_MSIX_VECTOR and size == 2:
                self.config_vector = value if value < self.num_vectors else NO_VECTOR
            elif off == R.QUEUE_SELECT and size == 2:
                common.queue_sel = value
            elif q is None:
                return
            elif off == R.QUEUE_SIZE and size == 2:
                common.write_queue_size(q, value)
            elif off == R.QUEUE_MSIX_VECTOR and size == 2:
                self.queue_vectors[q.index] = value if value < self.num_vectors else NO_VECTOR
            elif off == R.QUEUE_ENABLE and size == 2:
                if value & 1:  # (0 is not a request: a driver disables a queue by resetting it)
                    common.enable_queue(q)
            elif off == R.QUEUE_RESET and size == 2:
                if value & 1:
                    common.reset_queue(q)
            elif off & ~7 in _RING_FIELDS:
                ring = _RING_FIELDS[off & ~7]
                if size == 8 and off % 8 == 0:
                    common.write_ring_address(q, ring, value)
                elif size == 4:
                    common.write_ring_address(q, ring, value, half=(off % 8) // 4)
