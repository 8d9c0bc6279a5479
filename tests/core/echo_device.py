"""A tiny device for core tests: queue 0 copies each request's readable bytes into its writable ones."""

from __future__ import annotations

from vdm.device import VirtioDevice
from vdm.virtqueue import Virtqueue


class EchoDevice(VirtioDevice):
    device_id = 0x7F
    name = "echo"
    queue_max_sizes = (16,)

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[bytes] = []
        self.activations = 0

    def config_space(self) -> bytes:
        return b"ECHO" + len(self.seen).to_bytes(4, "little")

    def on_activate(self) -> None:
        self.activations += 1

    def process_queue(self, queue: Virtqueue) -> None:
        while (chain := queue.pop()) is not None:
            data = chain.read()
            self.seen.append(data)
            written = chain.write(data)
            queue.push(chain, written)
        self.signal_used(queue)
