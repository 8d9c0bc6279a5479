"""A device for tests of the core, the transports and the servers: one configurable echo device.

:class:`EchoDevice` copies each request's readable bytes into its writable buffers, so a test
sees which request a completion belongs to. With ``hold=True`` it takes requests and completes
them only when the test says so (a slow or stuck backend: in-flight tests, reconnects, resets).
Tests subclass it to add a hook or a queue size of their own; it is the one echo/hold device of
the project's tests and fuzz targets, and a plugin author may use it too.

Invariants: :attr:`EchoDevice.seen` lists every request's readable bytes in the order the device
took them (held or not); a held request is in :attr:`EchoDevice.held` until completed, or until
a device reset drops it (``keep_held_on_reset=False``, the default: a crashed backend never
completes) -- with ``keep_held_on_reset=True`` it stays, to be completed after the reset, like a
backend whose workers cannot be stopped at once. The core must then drop those completions.
"""

from __future__ import annotations

import threading

from ..device import VirtioDevice
from ..virtqueue import DescriptorChain, Virtqueue

__all__ = ["EchoDevice"]


class EchoDevice(VirtioDevice):
    """Queue 0 echoes each request (readable bytes into writable ones); ``hold``: on request only.

    ``queue_size``: the queue's maximum size (default 16); ``limit``: read at most this many
    bytes of each request (a fuzz target's bound on work). The config space is ``b"ECHO"`` and
    the number of requests seen (u32 LE).
    """

    device_id = 0x7F
    name = "echo"
    queue_max_sizes: tuple[int, ...] = (16,)

    def __init__(
        self,
        *,
        hold: bool = False,
        queue_size: int | None = None,
        keep_held_on_reset: bool = False,
        limit: int | None = None,
    ) -> None:
        if queue_size is not None:
            self.queue_max_sizes = (queue_size,)
        super().__init__()
        self.hold = hold
        self.keep_held_on_reset = keep_held_on_reset
        self.limit = limit
        #: every request's readable bytes, in the order taken
        self.seen: list[bytes] = []
        #: requests taken but not completed (``hold``): (queue, chain, readable bytes)
        self.held: list[tuple[Virtqueue, DescriptorChain, bytes]] = []
        self.activations = 0
        self.resets = 0
        #: notified whenever a request is taken (see :meth:`wait_seen`)
        self.cond = threading.Condition()

    def config_space(self) -> bytes:
        return b"ECHO" + len(self.seen).to_bytes(4, "little")

    def on_activate(self) -> None:
        self.activations += 1

    def on_reset(self) -> None:
        self.resets += 1
        if not self.keep_held_on_reset:
            with self.cond:
                self.held.clear()

    def process_queue(self, queue: Virtqueue) -> None:
        while (chain := queue.pop()) is not None:
            data = chain.read(0, self.limit)
            with self.cond:
                self.seen.append(data)
                if self.hold:
                    self.held.append((queue, chain, data))
                self.cond.notify_all()
            if not self.hold:
                queue.push(chain, chain.write(data))
        if not self.hold:
            self.signal_used(queue)

    # ---- held requests ---------------------------------------------------------------------------

    def wait_seen(self, n: int, timeout: float = 5.0) -> None:
        """Wait until ``n`` requests were taken in all (AssertionError after ``timeout``)."""
        with self.cond:
            assert self.cond.wait_for(lambda: len(self.seen) >= n, timeout), f"{len(self.seen)} of {n} taken"

    def complete(self, data: bytes) -> None:
        """Complete the held request whose readable bytes are ``data``."""
        self.complete_together(data)

    def complete_together(self, *names: bytes) -> None:
        """Complete several held requests (by their readable bytes) with one used-index update."""
        with self.cond:
            picked = []
            for data in names:
                k = next(i for i, h in enumerate(self.held) if h[2] == data)
                picked.append(self.held.pop(k))
        self._complete(picked)

    def complete_all(self) -> None:
        """Complete every held request, one used-index update each, in the order taken."""
        with self.cond:
            picked, self.held = self.held, []
        for h in picked:
            self._complete([h])

    def _complete(self, picked: list[tuple[Virtqueue, DescriptorChain, bytes]]) -> None:
        if not picked:
            return
        queue = picked[0][0]
        if len(picked) == 1:
            _, chain, data = picked[0]
            queue.push(chain, chain.write(data))
        else:
            queue.push_many([(chain, chain.write(data)) for _, chain, data in picked])
        self.signal_used(queue)
