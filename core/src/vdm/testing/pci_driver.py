"""The in-process test driver over virtio-pci: capabilities, common config, notify, MSI-X."""

from __future__ import annotations

from ..device import VirtioDevice
from ..interrupts import RecordingIrqLine
from ..transport.pci import (
    CAP_MSIX,
    CAP_VENDOR,
    CFG_COMMON,
    CFG_DEVICE,
    CFG_ISR,
    CFG_NOTIFY,
    CommonCfg,
    VirtioPciTransport,
)
from .driver import DriverQueue, VirtioTestDriver
from .memory import GuestRam

__all__ = ["RecordingMsi", "VirtioPciTestDriver"]

MSI_ADDRESS = 0xFEE0_0000


class RecordingMsi:
    """An MsiSink that records the messages it is asked to deliver."""

    def __init__(self) -> None:
        self.messages: list[tuple[int, int]] = []

    def send_msi(self, address: int, data: int) -> None:
        self.messages.append((address, data))


class VirtioPciTestDriver(VirtioTestDriver):
    """Like :class:`VirtioTestDriver`, but through the virtio-pci capabilities and BAR0.

    With ``msix=True`` (default) the driver programs one MSI-X vector per queue (data 0x41 + queue
    index; 0x40 for configuration changes) and the messages land in :attr:`msi`; otherwise
    interrupts arrive on the INTx line :attr:`irq` with the ISR.
    """

    BAR = 0xFE00_0000

    def __init__(
        self,
        device: VirtioDevice,
        *,
        ram_size: int = 16 << 20,
        ram: GuestRam | None = None,
        msix: bool = True,
        transport: VirtioPciTransport | None = None,
    ) -> None:
        self.device = device
        self.ram = ram if ram is not None else GuestRam(ram_size)
        self.irq = RecordingIrqLine()
        self.msi = RecordingMsi()
        self.transport = transport or VirtioPciTransport(  # type: ignore[assignment]
            device, self.ram.memory, msi=self.msi, intx=self.irq, bar_address=self.BAR
        )
        self.queues: dict[int, DriverQueue] = {}
        self.features = 0
        self.others = []
        self.use_msix = msix
        self.caps: dict[int, tuple[int, int, int]] = {}

    # ---- configuration space and BAR access ----------------------------------------------------

    def cfg_read(self, offset: int, size: int) -> int:
        return self.transport.config_read(offset, size)  # type: ignore[attr-defined]

    def cfg_write(self, offset: int, size: int, value: int) -> None:
        self.transport.config_write(offset, size, value)  # type: ignore[attr-defined]

    def _bar_offset(self, cfg_type: int) -> int:
        cap = self.caps.get(cfg_type)
        if cap is None:
            raise RuntimeError(
                f"virtio-pci capability {cfg_type} not known yet: call check_transport() first "
                "(init() does), which walks the capability list and sets up MSI-X"
            )
        return cap[1]

    def common_read(self, off: int, size: int) -> int:
        return self.transport.read(self._bar_offset(CFG_COMMON) + off, size)

    def common_write(self, off: int, size: int, value: int) -> None:
        self.transport.write(self._bar_offset(CFG_COMMON) + off, size, value)

    def check_transport(self) -> None:
        """Walk the capability list like a guest driver, then set up MSI-X."""
        assert self.cfg_read(0, 2) == 0x1AF4
        assert self.cfg_read(2, 2) == 0x1040 + self.device.device_id
        assert self.cfg_read(6, 2) & 0x10, "no capability list"
        self.caps.clear()
        pos = self.cfg_read(0x34, 1)
        seen = 0
        msix_cap = None
        while pos and seen < 48:
            cap_id = self.cfg_read(pos, 1)
            if cap_id == CAP_VENDOR:
                cfg_type, bar = self.cfg_read(pos + 3, 1), self.cfg_read(pos + 4, 1)
                offset, length = self.cfg_read(pos + 8, 4), self.cfg_read(pos + 12, 4)
                if cfg_type not in self.caps and bar == 0:
                    self.caps[cfg_type] = (bar, offset, length)
                if cfg_type == CFG_NOTIFY:
                    self.notify_multiplier = self.cfg_read(pos + 16, 4)
            elif cap_id == CAP_MSIX:
                msix_cap = pos
            pos = self.cfg_read(pos + 1, 1)
            seen += 1
        for needed in (CFG_COMMON, CFG_NOTIFY, CFG_ISR, CFG_DEVICE):
            assert needed in self.caps, f"capability {needed} missing"
        bar = self.cfg_read(0x10, 4)
        self.cfg_write(0x10, 4, 0xFFFFFFFF)
        self.bar_size = (~self.cfg_read(0x10, 4) & 0xFFFFFFFF) + 1
        self.cfg_write(0x10, 4, bar)
        assert self.cfg_read(0x10, 4) == bar
        self.cfg_write(0x04, 2, 0x0006)  # memory space + bus master
        if self.use_msix:
            assert msix_cap is not None, "no MSI-X capability"
            table = self.cfg_read(msix_cap + 4, 4)
            nvec = (self.cfg_read(msix_cap + 2, 2) & 0x7FF) + 1
            for v in range(nvec):
                entry = (table & ~7) + 16 * v
                self.transport.write(entry, 4, MSI_ADDRESS)
                self.transport.write(entry + 4, 4, 0)
                self.transport.write(entry + 8, 4, 0x40 + v)
                self.transport.write(entry + 12, 4, 0)  # unmask
            self.cfg_write(msix_cap + 2, 2, 1 << 15)

    # ---- the VirtioTestDriver operations ---------------------------------------------------------

    @property
    def status(self) -> int:
        return self.common_read(CommonCfg.DEVICE_STATUS, 1)

    def set_status(self, value: int) -> None:
        self.common_write(CommonCfg.DEVICE_STATUS, 1, value)
        if value == 0 and self.use_msix:
            self.common_write(CommonCfg.CONFIG_MSIX_VECTOR, 2, 0)  # config changes on vector 0

    def device_features(self) -> int:
        self.common_write(CommonCfg.DEVICE_FEATURE_SELECT, 4, 0)
        low = self.common_read(CommonCfg.DEVICE_FEATURE, 4)
        self.common_write(CommonCfg.DEVICE_FEATURE_SELECT, 4, 1)
        return low | self.common_read(CommonCfg.DEVICE_FEATURE, 4) << 32

    def write_driver_features(self, features: int) -> None:
        for sel in (0, 1):
            self.common_write(CommonCfg.DRIVER_FEATURE_SELECT, 4, sel)
            self.common_write(CommonCfg.DRIVER_FEATURE, 4, (features >> (32 * sel)) & 0xFFFFFFFF)

    def queue_max_size(self, qi: int) -> int:
        if qi >= self.common_read(CommonCfg.NUM_QUEUES, 2):
            return 0
        self.common_write(CommonCfg.QUEUE_SELECT, 2, qi)
        return self.common_read(CommonCfg.QUEUE_SIZE, 2)

    def enable_queue(self, q: DriverQueue) -> None:
        self.common_write(CommonCfg.QUEUE_SELECT, 2, q.index)
        self.common_write(CommonCfg.QUEUE_SIZE, 2, q.size)
        if self.use_msix:
            self.common_write(CommonCfg.QUEUE_MSIX_VECTOR, 2, q.index + 1)
        for off, value in (
            (CommonCfg.QUEUE_DESC, q.desc),
            (CommonCfg.QUEUE_DRIVER, q.avail),
            (CommonCfg.QUEUE_DEVICE, q.used),
        ):
            self.common_write(off, 4, value & 0xFFFFFFFF)
            self.common_write(off + 4, 4, value >> 32)
        self.common_write(CommonCfg.QUEUE_ENABLE, 2, 1)

    def kick(self, qi: int) -> None:
        self.common_write(CommonCfg.QUEUE_SELECT, 2, qi)
        notify_off = self.common_read(CommonCfg.QUEUE_NOTIFY_OFF, 2)
        self.transport.write(self._bar_offset(CFG_NOTIFY) + notify_off * self.notify_multiplier, 2, qi)

    def config_read(self, offset: int, size: int) -> int:
        return self.transport.read(self._bar_offset(CFG_DEVICE) + offset, size)

    def config_write(self, offset: int, value: int, size: int) -> None:
        """See :meth:`VirtioTestDriver.config_write` (``config_write(offset, size=2, value=v)``)."""
        self.transport.write(self._bar_offset(CFG_DEVICE) + offset, size, value)

    def ack_interrupts(self) -> int:
        return self.transport.read(self._bar_offset(CFG_ISR), 1)

    def vectors_signalled(self) -> list[int]:
        """MSI-X vectors delivered so far, in order."""
        return [data - 0x40 for _, data in self.msi.messages]
