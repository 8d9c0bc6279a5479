"""A device for in-flight tests: it takes requests and completes them only when told to.

Each request's readable bytes are echoed into its writable buffers on completion, so a test sees
which request a completion belongs to.
"""

from __future__ import annotations

import threading

from vdm.device import VirtioDevice
from vdm.virtqueue import DescriptorChain, Virtqueue


class HoldDevice(VirtioDevice):
    device_id = 0x7E
    name = "hold"
    queue_max_sizes = (16,)

    def __init__(self) -> None:
        super().__init__()
        self.held: list[tuple[Virtqueue, DescriptorChain, bytes]] = []
        self.taken: list[bytes] = []
        self.cond = threading.Condition()

    def config_space(self) -> bytes:
        return b"HOLD"

    def process_queue(self, queue: Virtqueue) -> None:
        while (chain := queue.pop()) is not None:
            data = chain.read()
            with self.cond:
                self.held.append((queue, chain, data))
                self.taken.append(data)
                self.cond.notify_all()

    def wait_taken(self, n: int, timeout: float = 5.0) -> None:
        with self.cond:
            assert self.cond.wait_for(lambda: len(self.taken) >= n, timeout), (
                f"{len(self.taken)} of {n} taken"
            )

    def complete(self, data: bytes) -> None:
        """Complete the held request whose readable bytes are ``data``."""
        with self.cond:
            k = next(i for i, h in enumerate(self.held) if h[2] == data)
            queue, chain, _ = self.held.pop(k)
        n = chain.write(data)
        queue.push(chain, n)
        self.signal_used(queue)

    def complete_together(self, *names: bytes) -> None:
        """Complete several held requests with one used-index update (``push_many``)."""
        with self.cond:
            picked = []
            for data in names:
                k = next(i for i, h in enumerate(self.held) if h[2] == data)
                picked.append(self.held.pop(k))
        queue = picked[0][0]
        queue.push_many([(chain, chain.write(data)) for _, chain, data in picked])
        self.signal_used(queue)

    def on_reset(self) -> None:
        with self.cond:
            self.held.clear()  # dropped, as a crashed backend would: never completed
