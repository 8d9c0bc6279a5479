"""Hostile guests for the resource-bound tests: drivers that flood, storm and hoard."""

from __future__ import annotations

import threading
import time

from vdm.device import VirtioDevice
from vdm.eventfd import EFD_CLOEXEC, EFD_NONBLOCK, eventfd, eventfd_write
from vdm.eventloop import EventLoop, drain_eventfd
from vdm.ring_layout import VIRTQ_DESC_F_NEXT as F_NEXT
from vdm.ring_layout import VIRTQ_DESC_F_WRITE as F_WRITE
from vdm.testing import VirtioTestDriver

__all__ = ["F_NEXT", "F_WRITE", "Flooder", "KickStorm", "attach_kicks", "publish_shared_tail"]


def attach_kicks(loop: EventLoop, device: VirtioDevice) -> list[int]:
    """Route each queue's kicks through an eventfd on ``loop``, as vdm.vmm does for ioeventfds
    (the device's budgeted kicks resume there too; :meth:`VirtioDevice.stop_serving` undoes it)."""
    fds = []
    for index in range(len(device.queues)):
        fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC)

        def on_kick(fd: int = fd, index: int = index) -> None:
            if drain_eventfd(fd):
                device.kick(index)

        loop.add_reader(fd, on_kick)
        fds.append(fd)
    device.serve_on(loop)  # as vdm.vmm does: a kick walks a bounded slice, the loop serves the rest
    return fds


class Flooder(threading.Thread):
    """A guest that keeps queue ``qi`` full: every chain the device returns is published again at
    once (the same descriptors, no parsing) and kicked, as fast as this thread can go."""

    def __init__(
        self, drv: VirtioTestDriver, qi: int, kick_fd: int, chains: list[list[tuple[int, int, int]]]
    ) -> None:
        super().__init__(daemon=True)
        self.drv, self.qi, self.kick_fd = drv, qi, kick_fd
        q = drv.queues[qi]
        self.q = q
        self.heads = []
        free = list(range(q.size))
        for bufs in chains[: q.size]:
            if len(bufs) > len(free):
                break
            idxs = [free.pop(0) for _ in bufs]
            for n, (addr, length, flags) in enumerate(bufs):
                more = F_NEXT if n + 1 < len(bufs) else 0
                nxt = idxs[n + 1] if more else 0
                drv.write_desc(qi, idxs[n], addr, length, flags | more, nxt)
            self.heads.append(idxs[0])
        self.stop = threading.Event()
        self.served = 0

    def run(self) -> None:
        drv, q = self.drv, self.q
        for h in self.heads:
            drv.publish(self.qi, h)
        eventfd_write(self.kick_fd, 1)
        last = 0
        while not self.stop.is_set():
            idx = q.used_idx()
            if idx == last:
                eventfd_write(self.kick_fd, 1)
                time.sleep(0)
                continue
            while last != idx:
                head, _ = q.used_elem(last)
                drv.publish(self.qi, head)
                last = (last + 1) & 0xFFFF
                self.served += 1
            eventfd_write(self.kick_fd, 1)


class KickStorm(threading.Thread):
    """A guest that kicks queue ``fd`` in a tight loop without ever posting anything."""

    def __init__(self, fd: int) -> None:
        super().__init__(daemon=True)
        self.fd = fd
        self.stop = threading.Event()
        self.kicks = 0

    def run(self) -> None:
        while not self.stop.is_set():
            eventfd_write(self.fd, 1)
            self.kicks += 1


def publish_shared_tail(drv: VirtioTestDriver, qi: int, buf: int, buf_len: int) -> int:
    """Fill queue ``qi`` with one chain per descriptor that all share one tail, and publish them.

    Descriptor ``i`` names ``buf`` and chains to ``i + 1``; the last one ends the chain. Every
    head 0..size-1 is published, so head ``i`` walks ``size - i`` descriptors and the whole ring
    costs size * (size + 1) / 2 descriptor reads while the guest wrote only ``size`` descriptors.
    Returns the number of chains published (the queue size).
    """
    size = drv.queues[qi].size
    for i in range(size):
        more = F_NEXT if i + 1 < size else 0
        drv.write_desc(qi, i, buf, buf_len, more, i + 1 if more else 0)
    for i in range(size):
        drv.publish(qi, i)
    return size
