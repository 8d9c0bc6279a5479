"""One request as the device sees it: the buffers of a descriptor chain (virtio 1.2, 2.7.5).

A :class:`DescriptorChain` is what :meth:`vdm.virtqueue.Virtqueue.pop` returns: the chain's head
index and its buffers, already checked and mapped, split into the device-readable ones (the
driver's request) and the device-writable ones (room for the reply), in chain order.

Invariants: every readable buffer comes before every writable one in the chain (the queue refused
the chain otherwise); the views stay valid until the chain is returned (``push``) or given up
(``discard``), which releases them; ``epoch`` is the queue's epoch when the chain was taken, so a
chain taken before a queue reset is never returned into the new rings. :mod:`vdm.virtqueue`
re-exports this class; devices may import it from either module.
"""

from __future__ import annotations

from .memory import GuestMemory
from .sg import gather, scatter, slice_views, total_length

__all__ = ["DescriptorChain"]


class DescriptorChain:
    """One request: the buffers of a descriptor chain, split into device-readable and -writable."""

    __slots__ = ("epoch", "head", "memory", "readable", "writable")

    def __init__(
        self,
        head: int,
        readable: list[memoryview],
        writable: list[memoryview],
        epoch: int = 0,
        memory: GuestMemory | None = None,
    ) -> None:
        self.head = head
        self.readable = readable
        self.writable = writable
        #: the queue's :attr:`~vdm.virtqueue.Virtqueue.epoch` when the chain was popped
        self.epoch = epoch
        #: the memory its buffers were mapped from (released there even after a queue reset)
        self.memory = memory

    @property
    def readable_len(self) -> int:
        return total_length(self.readable)

    @property
    def writable_len(self) -> int:
        return total_length(self.writable)

    def read(self, offset: int = 0, length: int | None = None) -> bytes:
        """Gather ``length`` bytes of the readable buffers starting at ``offset`` (short if fewer)."""
        return gather(self.readable, offset, length)

    def write(self, data: bytes, offset: int = 0) -> int:
        """Scatter ``data`` into the writable buffers at ``offset``; return how many bytes fit."""
        views = self.writable if offset == 0 else slice_views(self.writable, offset, None)
        return scatter(data, views)
