"""An in-process virtio driver that drives a device through virtio-mmio registers.

It does what a guest's driver does: reset, negotiate features, lay out split rings in (fake)
guest memory, post descriptor chains, kick, and collect used buffers. Tests of devices -- ours and
third parties' -- use it instead of a VM::

    drv = VirtioTestDriver(MyDevice())
    drv.init()
    used = drv.request(0, out=[header], in_lens=[512, 1])
    assert used.data[-1] == 0

Low-level helpers (:meth:`VirtioTestDriver.write_desc`, :meth:`VirtioTestDriver.publish`) let
tests build hostile rings by hand.
"""

from __future__ import annotations

import time
from typing import Sequence

from ..device import F_EVENT_IDX, F_INDIRECT_DESC, Status, VirtioDevice
from ..interrupts import RecordingIrqLine
from ..transport.mmio import MmioTransport, Reg
from .memory import GuestRam
from .ring import DriverRing, Used

__all__ = ["DriverQueue", "FeaturesRefused", "Used", "VirtioTestDriver"]

#: one queue as the driver sees it (kept under its old name: it is a :class:`DriverRing`)
DriverQueue = DriverRing


class FeaturesRefused(Exception):
    """The device cleared FEATURES_OK after the driver's feature selection."""


class VirtioTestDriver:
    """A virtio driver for one device, over a virtio-mmio transport, in fake guest RAM."""

    def __init__(
        self,
        device: VirtioDevice,
        *,
        ram_size: int = 16 << 20,
        ram: GuestRam | None = None,
        transport: MmioTransport | None = None,
    ) -> None:
        """``transport``: drive an existing transport (e.g. one attached by a Vmm) instead of a new one."""
        self.device = device
        self.ram = ram if ram is not None else GuestRam(ram_size)
        self.irq = RecordingIrqLine()
        self.transport = (
            transport if transport is not None else MmioTransport(device, self.ram.memory, self.irq)
        )
        self.queues: dict[int, DriverQueue] = {}
        self.features = 0
        #: used buffers that :meth:`request` collected while waiting for its own
        self.others: list[Used] = []

    # ---- registers ------------------------------------------------------------------------------

    def reg_read(self, offset: int, size: int = 4) -> int:
        return self.transport.read(offset, size)

    def reg_write(self, offset: int, value: int, size: int = 4) -> None:
        self.transport.write(offset, size, value)

    @property
    def status(self) -> int:
        return self.reg_read(Reg.STATUS)

    def set_status(self, value: int) -> None:
        self.reg_write(Reg.STATUS, value)

    def write_driver_features(self, features: int) -> None:
        for sel in (0, 1):
            self.reg_write(Reg.DRIVER_FEATURES_SEL, sel)
            self.reg_write(Reg.DRIVER_FEATURES, (features >> (32 * sel)) & 0xFFFFFFFF)

    def queue_max_size(self, qi: int) -> int:
        """The device's maximum size of queue ``qi`` (0: no such queue). Call :meth:`check_transport`
        first (:meth:`init` does): the PCI driver finds its registers there."""
        self.reg_write(Reg.QUEUE_SEL, qi)
        return self.reg_read(Reg.QUEUE_NUM_MAX)

    def enable_queue(self, q: DriverQueue) -> None:
        """Program the selected queue's size and ring addresses, then set it ready."""
        self.reg_write(Reg.QUEUE_SEL, q.index)
        self.reg_write(Reg.QUEUE_NUM, q.size)
        for low, value in (
            (Reg.QUEUE_DESC_LOW, q.desc),
            (Reg.QUEUE_DRIVER_LOW, q.avail),
            (Reg.QUEUE_DEVICE_LOW, q.used),
        ):
            self.reg_write(low, value & 0xFFFFFFFF)
            self.reg_write(low + 4, value >> 32)
        self.reg_write(Reg.QUEUE_READY, 1)

    def check_transport(self) -> None:
        """Check the transport's identification registers (the PCI driver also walks its
        capabilities and sets up MSI-X here); :meth:`init` starts with it."""
        assert self.reg_read(Reg.MAGIC) == 0x74726976
        assert self.reg_read(Reg.VERSION) == 2

    @property
    def needs_reset(self) -> bool:
        return bool(self.status & Status.DEVICE_NEEDS_RESET)

    def device_features(self) -> int:
        self.reg_write(Reg.DEVICE_FEATURES_SEL, 0)
        low = self.reg_read(Reg.DEVICE_FEATURES)
        self.reg_write(Reg.DEVICE_FEATURES_SEL, 1)
        return low | self.reg_read(Reg.DEVICE_FEATURES) << 32

    def config_read(self, offset: int, size: int) -> int:
        """``size`` bytes (1, 2 or 4) of the device's config space at ``offset``, as an int (LE)."""
        return self.reg_read(Reg.CONFIG + offset, size)

    def config_bytes(self, offset: int, length: int) -> bytes:
        return b"".join(bytes([self.config_read(offset + i, 1)]) for i in range(length))

    def config_write(self, offset: int, value: int, size: int) -> None:
        """Write ``value`` as ``size`` bytes (1, 2 or 4, LE) at ``offset`` of the config space.

        The positional order (offset, value, size) is plugin API 1's and differs from
        :meth:`config_read`'s (offset, size); keywords read the same way for both:
        ``config_write(offset, size=2, value=v)``.
        """
        self.reg_write(Reg.CONFIG + offset, value, size)

    def ack_interrupts(self) -> int:
        status = self.reg_read(Reg.INTERRUPT_STATUS)
        if status:
            self.reg_write(Reg.INTERRUPT_ACK, status)
        return status

    # ---- initialisation ---------------------------------------------------------------------------

    def init(
        self,
        features: int | None = None,
        *,
        exclude: int = 0,
        queue_sizes: Sequence[int] | None = None,
        queues: Sequence[int] | None = None,
    ) -> int:
        """Reset and bring the device up; returns the negotiated features.

        ``features``: exactly these bits (default: everything offered, minus ``exclude``).
        ``queues``: which queues to set up (default all); ``queue_sizes``: their sizes.
        """
        self.check_transport()
        self.set_status(0)
        self.queues.clear()
        self.set_status(Status.ACKNOWLEDGE)
        self.set_status(Status.ACKNOWLEDGE | Status.DRIVER)
        offered = self.device_features()
        chosen = offered & ~exclude if features is None else features
        self.write_driver_features(chosen)
        st = Status.ACKNOWLEDGE | Status.DRIVER | Status.FEATURES_OK
        self.set_status(st)
        if not self.status & Status.FEATURES_OK:
            raise FeaturesRefused(f"device refused features 0x{chosen:x}")
        self.features = chosen
        indexes = list(range(len(self.device.queues))) if queues is None else list(queues)
        for n, qi in enumerate(indexes):
            size = queue_sizes[n] if queue_sizes is not None else None
            self.setup_queue(qi, size)
        self.set_status(st | Status.DRIVER_OK)
        return chosen

    def setup_queue(self, qi: int, size: int | None = None) -> DriverQueue:
        max_size = self.queue_max_size(qi)
        assert max_size, f"queue {qi} does not exist"
        q = DriverRing.allocate(self.ram, qi, min(size or max_size, max_size))
        self.enable_queue(q)
        self.queues[qi] = q
        return q

    # ---- posting requests ----------------------------------------------------------------------

    @property
    def _event_idx(self) -> bool:
        return bool(self.features >> F_EVENT_IDX & 1)

    def post(
        self,
        qi: int,
        out: Sequence[bytes] = (),
        in_lens: Sequence[int] = (),
        *,
        indirect: bool = False,
    ) -> int:
        """Put a chain of device-readable ``out`` buffers and device-writable buffers of
        ``in_lens`` bytes on the available ring (no kick). Returns the head index."""
        if indirect:
            assert self.features >> F_INDIRECT_DESC & 1, "INDIRECT_DESC not negotiated"
        return self.queues[qi].add(out, in_lens, indirect=indirect, used_event=self._event_idx)

    def write_desc(self, qi: int, index: int, addr: int, length: int, flags: int, next_: int) -> None:
        """Write descriptor ``index`` of queue ``qi`` directly (for hand-made, hostile rings)."""
        self.queues[qi].write_desc(index, addr, length, flags, next_)

    def publish(self, qi: int, head: int, *, bump: int = 1) -> None:
        """Add ``head`` to the available ring and move its index on by ``bump`` (with EVENT_IDX,
        ``used_event`` asks for an interrupt for every used buffer)."""
        self.queues[qi].publish(head, bump=bump, used_event=self._event_idx)

    def kick(self, qi: int) -> None:
        self.reg_write(Reg.QUEUE_NOTIFY, qi)

    def submit(self, qi: int, out: Sequence[bytes] = (), in_lens: Sequence[int] = (), **kw: bool) -> int:
        head = self.post(qi, out, in_lens, **kw)
        self.kick(qi)
        return head

    # ---- completions ---------------------------------------------------------------------------

    def used_idx(self, qi: int) -> int:
        return self.queues[qi].used_idx()

    def avail_event(self, qi: int) -> int:
        return self.queues[qi].avail_event()

    def collect(self, qi: int) -> list[Used]:
        """Every used buffer the device returned since the last call (and free their resources)."""
        return self.queues[qi].collect()

    def wait(self, qi: int, count: int = 1, timeout: float = 5.0) -> list[Used]:
        """Collect until ``count`` used buffers arrived (the device may complete from threads)."""
        return self.queues[qi].wait(
            count, timeout, broken=lambda: "device needs reset" if self.needs_reset else None
        )

    def request(
        self,
        qi: int,
        out: Sequence[bytes] = (),
        in_lens: Sequence[int] = (),
        *,
        timeout: float = 5.0,
        indirect: bool = False,
    ) -> Used:
        """Submit one chain and wait for it to come back."""
        head = self.submit(qi, out, in_lens, indirect=indirect)
        deadline = time.monotonic() + timeout
        while True:
            for u in self.wait(qi, 1, max(0.0, deadline - time.monotonic())):
                if u.head == head:
                    return u
                self.others.append(u)
