"""A virtio-net queue pair's state: its tap fd, the frame being received, the chain being sent."""

from __future__ import annotations

from collections import Counter
from typing import TYPE_CHECKING

from vdm.virtqueue import DescriptorChain, Virtqueue

from .vnet_hdr import HDR_LEN, MAX_FRAME_LEN

if TYPE_CHECKING:
    from .fastsend import TxStep

__all__ = ["QueuePair"]


class QueuePair:
    """One receive/transmit queue pair and its tap fd.

    Receive state is touched only by the receive queue's serialized processing, transmit state by
    the transmit queue's; the poller reads the flags (:class:`~vdm_net.backends.poller.PolledPair`).
    """

    def __init__(self, index: int, fd: int | None) -> None:
        self.index = index
        self.fd = fd
        self.rx_buf = bytearray(HDR_LEN + MAX_FRAME_LEN)
        #: bytes in rx_buf of a frame read from the tap but not yet delivered (0: none)
        self.rx_len = 0
        #: chains popped for that frame that are not enough for it yet
        self.rx_held: list[DescriptorChain] = []
        #: out of receive buffers: not reading the tap until the driver kicks the receive queue
        self.rx_stalled = False
        #: a chain whose write the tap pushed back (EAGAIN); retried when the fd is writable
        self.tx_chain: DescriptorChain | None = None
        self.tx_blocked = False
        #: the compiled transmit step on this pair's fd (vdm_net.fastsend.TxStep), while the device
        #: is active and the step is built and on; None: every frame goes through the Python path
        self.tx_step: TxStep | None = None
        #: this pair is in use (VQ_PAIRS_SET)
        self.enabled = False
        #: per-direction counters (each touched only by its own queue's serialized processing)
        self.rx_stats: Counter[str] = Counter()
        self.tx_stats: Counter[str] = Counter()

    @property
    def rx_queue(self) -> int:
        return 2 * self.index

    @property
    def tx_queue(self) -> int:
        return 2 * self.index + 1

    def clear(self, rx: Virtqueue, tx: Virtqueue) -> None:
        for chain in self.rx_held:
            rx.discard(chain)
        self.rx_held = []
        if self.tx_chain is not None:
            tx.discard(self.tx_chain)
            self.tx_chain = None
        if self.rx_len:
            self.rx_stats["rx_dropped"] += 1
            self.rx_stats["rx_dropped_reset"] += 1
        self.rx_len = 0
        self.rx_stalled = False
        self.tx_blocked = False
        if self.tx_step is not None:
            self.tx_step.close()
            self.tx_step = None
        self.enabled = False
