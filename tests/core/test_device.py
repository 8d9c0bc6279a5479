"""The device base: kicks from many threads, completions from worker threads, reset with requests in
flight, and device bugs that must not escape into the host process."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from vdm.device import Status, VirtioDevice
from vdm.memory import OnDemandGuestMemory
from vdm.testing import GuestRam, VirtioTestDriver
from vdm.testing.devices import EchoDevice
from vdm.transport.mmio import Reg
from vdm.virtqueue import DescriptorChain, Virtqueue


def held_echo() -> EchoDevice:
    """Takes requests but completes them only when the test says so (a slow backend); a reset does
    not drop them: a real backend cannot always stop its workers at once, they finish later."""
    return EchoDevice(hold=True, keep_held_on_reset=True)


def test_completion_after_reset_is_dropped(virtio_driver):
    """A request completed after the driver reset the device must not land in the new rings."""
    dev = held_echo()
    drv = virtio_driver(dev, ram_size=1 << 20)
    drv.init()
    drv.post(0, [b"old-1"], [5])
    drv.post(0, [b"old-2"], [5])
    drv.kick(0)
    assert len(dev.held) == 2
    drv.queues.clear()
    drv.init()  # reset, then new rings at new addresses
    assert dev.resets == 1
    dev.complete_all()  # the backend finishes the old requests now
    assert drv.used_idx(0) == 0, "a stale completion was written into the new used ring"
    assert drv.collect(0) == []
    head = drv.post(0, [b"new"], [3])
    drv.kick(0)
    dev.complete_all()
    (used,) = drv.collect(0)
    assert (used.head, used.data) == (head, b"new")


def test_completion_after_queue_reset_is_dropped(virtio_driver):
    dev = held_echo()
    drv = virtio_driver(dev, ram_size=1 << 20)
    drv.init()
    drv.post(0, [b"old"], [3])
    drv.kick(0)
    drv.reg_write(Reg.QUEUE_SEL, 0)
    drv.reg_write(Reg.QUEUE_RESET, 1)
    drv.queues.pop(0)
    drv.setup_queue(0)
    dev.complete_all()
    assert drv.used_idx(0) == 0


def test_completions_from_worker_threads(virtio_driver):
    """A backend that completes requests on a thread pool, out of order."""

    class PoolEcho(EchoDevice):
        queue_max_sizes = (64,)

        def __init__(self) -> None:
            super().__init__()
            self.pool = ThreadPoolExecutor(4)

        def process_queue(self, queue: Virtqueue) -> None:
            while (chain := queue.pop()) is not None:
                self.pool.submit(self._serve, queue, chain)

        def _serve(self, queue: Virtqueue, chain: DescriptorChain) -> None:
            data = chain.read()
            time.sleep(0.001 * (data[0] % 3))  # finish out of order
            queue.push(chain, chain.write(data))
            self.signal_used(queue)

    dev = PoolEcho()
    drv = virtio_driver(dev, ram_size=4 << 20)
    drv.init()
    try:
        for rnd in range(5):
            heads = {drv.post(0, [bytes([i, rnd]) * 8], [16]): bytes([i, rnd]) * 8 for i in range(20)}
            drv.kick(0)
            used = drv.wait(0, 20)
            assert {u.head: u.data for u in used} == heads
        assert not drv.needs_reset
    finally:
        dev.pool.shutdown(wait=True)


def test_kicks_from_many_threads_lose_no_request(virtio_driver):
    """Kicks race with the device's processing; every request is served without a final kick."""

    class SlowEcho(EchoDevice):
        queue_max_sizes = (256,)

        def process_queue(self, queue: Virtqueue) -> None:
            time.sleep(0.0005)
            super().process_queue(queue)

    dev = SlowEcho()
    drv = virtio_driver(dev, ram_size=4 << 20)
    drv.init()
    kickers = ThreadPoolExecutor(8)
    try:
        for n in range(120):
            drv.post(0, [n.to_bytes(2, "little")], [2])
            kickers.submit(drv.kick, 0)
        kickers.shutdown(wait=True)
        used = drv.wait(0, 120, timeout=10)
        assert sorted(int.from_bytes(u.data, "little") for u in used) == list(range(120))
    finally:
        kickers.shutdown(wait=True)


def test_a_device_bug_marks_it_broken_and_never_escapes(virtio_driver, caplog):
    class Buggy(EchoDevice):
        def process_queue(self, queue: Virtqueue) -> None:
            queue.pop()
            raise KeyError("oops")

    drv = virtio_driver(Buggy(), ram_size=1 << 20)
    drv.init()
    drv.post(0, [b"x"], [1])
    drv.kick(0)  # must not raise
    assert drv.needs_reset
    assert drv.device.broken == "internal error: KeyError('oops')"
    assert "internal error on queue 0" in caplog.text
    assert drv.ack_interrupts() & 2  # the driver is told through a config interrupt


def test_activation_failure_marks_it_broken(virtio_driver):
    class BadStart(EchoDevice):
        def on_activate(self) -> None:
            raise OSError("backend file vanished")

    drv = virtio_driver(BadStart(), ram_size=1 << 20)
    drv.init()
    assert drv.needs_reset
    assert drv.device.broken == "activation failed: backend file vanished"
    assert not drv.device.activated


def test_reset_stops_the_backend_once(virtio_driver):
    dev = held_echo()
    drv = virtio_driver(dev, ram_size=1 << 20)
    drv.init()
    drv.reg_write(Reg.STATUS, 0)
    drv.reg_write(Reg.STATUS, 0)  # a second reset of a stopped device
    assert dev.resets == 1
    drv.init()
    dev.fail("guest sent garbage")
    dev.fail("and more garbage")
    assert dev.resets == 2 and dev.broken == "and more garbage"
    assert drv.status & Status.DEVICE_NEEDS_RESET


def test_kick_of_a_queue_that_does_not_exist_or_is_not_ready(virtio_driver):
    dev = EchoDevice()
    drv = virtio_driver(dev, ram_size=1 << 20)
    dev.kick(0)  # before anything: ignored
    drv.init()
    for index in (-1, 1, 1 << 20):
        dev.kick(index)
    assert not drv.needs_reset


@pytest.mark.parametrize("sizes", [(0,), (3,), (1 << 16,)])
def test_bad_queue_max_sizes_refused(sizes):
    class Bad(VirtioDevice):
        queue_max_sizes = sizes

    with pytest.raises(ValueError):
        Bad()


def test_interrupts_from_threads_keep_the_line_consistent(virtio_driver):
    """Many threads signalling at once: the driver sees the line high while status is non-zero."""
    dev = EchoDevice()
    drv = virtio_driver(dev, ram_size=1 << 20)
    drv.init()
    t = drv.transport

    def spam() -> None:
        for _ in range(200):
            t.queue_interrupt(dev.queues[0])

    threads = [threading.Thread(target=spam) for _ in range(4)]
    for th in threads:
        th.start()
    for _ in range(200):
        drv.ack_interrupts()
    for th in threads:
        th.join()
    assert drv.irq.level == bool(drv.reg_read(Reg.INTERRUPT_STATUS))
    drv.ack_interrupts()
    assert not drv.irq.level


def test_buffers_of_a_request_completed_after_reset_are_released():
    """On-demand (Xen-style) memory: a late completion still gives its guest mappings back."""
    ram = GuestRam(1 << 20, base=0)

    class RamMapper:  # page mappings of the very bytes the test driver writes
        def map_pages(self, first_page: int, count: int, writable: bool) -> memoryview:
            return ram.region.view[first_page * 4096 : (first_page + count) * 4096]

        def unmap_pages(self, view: memoryview, count: int) -> None:
            pass

    dev = held_echo()
    drv = VirtioTestDriver(dev, ram=ram)
    od = OnDemandGuestMemory(RamMapper(), limit=ram.size)
    dev.memory = drv.transport.memory = od
    drv.init()
    drv.post(0, [b"abc"], [3])
    drv.kick(0)
    assert len(dev.held) == 1 and od.outstanding_views >= 2  # the rings and the chain's buffers
    drv.reg_write(Reg.STATUS, 0)  # reset while the backend still holds the request
    dev.complete_all()
    assert od.outstanding_views == 0, "a late completion kept its guest mappings forever"


class OwnStateEcho(EchoDevice):
    """A plugin that happens to use the names the base once kept for itself (issue 19 item 5)."""

    def __init__(self) -> None:
        super().__init__()
        self._stop = threading.Event()
        self._state_lock = "mine"
        self._kick_locks = {"a": 1}
        self._rekick = None
        self._deferred = "also mine"
        self._resume = 7
        self._resume_fd = -1

    def on_reset(self) -> None:
        self._stop.set()


def test_a_subclass_may_use_the_bases_private_names(virtio_driver):
    """A device's own ``_stop``, ``_state_lock``... must not break init, kicks, reset or fail."""
    dev = OwnStateEcho()
    drv = virtio_driver(dev, ram_size=1 << 20)
    drv.init()
    head = drv.post(0, [b"hello"], [5])
    drv.kick(0)
    (used,) = drv.collect(0)
    assert (used.head, used.data) == (head, b"hello")
    drv.reg_write(Reg.STATUS, 0)  # reset runs on_reset, which sets the device's own event
    assert dev._stop.is_set() and dev.status == 0
    assert (dev._state_lock, dev._kick_locks, dev._rekick) == ("mine", {"a": 1}, None)
    dev._stop.clear()
    drv.queues.clear()
    drv.init()
    dev.fail("test")
    assert dev.broken == "test" and dev._stop.is_set()
