"""The kick budget: a kick served on an event loop walks a bounded slice, the loop serves the rest.

What a device author relies on (vdm.device's module doc): ``process_queue`` may find the queue
empty early and is called again for the rest without another kick from the driver; requests come
back in order and none is lost; a device driven without a loop is served to the end in one kick;
and the charge is what the walk read, indirect-table entries included.
"""

from __future__ import annotations

import pytest
from vdm.eventloop import EventLoop
from vdm.testing.devices import EchoDevice
from vdm.virtqueue import Virtqueue


class CountingEcho(EchoDevice):
    """Echo with 128 entries that records what each call of process_queue walked and took."""

    queue_max_sizes = (128,)

    def __init__(self) -> None:
        super().__init__()
        #: (descriptors walked, chains taken) per call of process_queue
        self.calls: list[tuple[int, int]] = []

    def process_queue(self, queue: Virtqueue) -> None:
        walked, taken = queue.descriptors_walked, len(self.seen)
        super().process_queue(queue)
        self.calls.append((queue.descriptors_walked - walked, len(self.seen) - taken))


class NotifyingEcho(CountingEcho):
    """The loop of vdm_blk and vdm_net: pop until None, ask for kicks, look again if more came."""

    def process_queue(self, queue: Virtqueue) -> None:
        walked, taken = queue.descriptors_walked, len(self.seen)
        while True:
            while (chain := queue.pop()) is not None:
                data = chain.read()
                self.seen.append(data)
                queue.push(chain, chain.write(data))
            self.signal_used(queue)
            if not queue.set_notification(True):
                break
            queue.set_notification(False)
        self.calls.append((queue.descriptors_walked - walked, len(self.seen) - taken))


@pytest.fixture
def loop():
    ev = EventLoop("budget-test").start()
    yield ev
    ev.stop()


@pytest.mark.parametrize("cls", [CountingEcho, NotifyingEcho])
def test_one_kick_serves_a_slice_and_the_loop_serves_the_rest(virtio_driver, loop, cls):
    dev = cls()
    dev.kick_budget = 8
    dev.serve_on(loop)
    try:
        drv = virtio_driver(dev, ram_size=1 << 20)
        drv.init()
        sent = [b"req%02d" % i for i in range(40)]
        for msg in sent:
            drv.post(0, [msg], [len(msg)])  # two descriptors each
        drv.kick(0)  # one kick for all 40
        used = drv.wait(0, 40, timeout=10)
        assert [u.data for u in used] == sent  # in order, none lost, no second kick needed
        assert not drv.needs_reset
        busy = [c for c in dev.calls if c[1]]
        assert len(busy) >= 40 * 2 // (8 + 2)
        # a slice: the budget, then the chain that crossed it (2 descriptors) is the last one
        assert max(w for w, _ in busy) <= 8 - 1 + 2, dev.calls
    finally:
        dev.stop_serving()


def test_without_a_loop_one_kick_serves_the_whole_queue(virtio_driver):
    dev = CountingEcho()
    dev.kick_budget = 8
    drv = virtio_driver(dev, ram_size=1 << 20)
    drv.init()
    for i in range(40):
        drv.post(0, [b"%02d" % i], [2])
    drv.kick(0)
    assert drv.used_idx(0) == 40
    assert [c for c in dev.calls if c[1]] == [(80, 40)]


def test_a_chain_is_charged_its_indirect_entries(virtio_driver):
    dev = CountingEcho()
    drv = virtio_driver(dev, ram_size=1 << 20)
    drv.init()
    q = dev.queues[0]
    drv.post(0, [b"a", b"b", b"c"], [1, 1, 1], indirect=True)
    drv.kick(0)
    assert q.descriptors_walked == 1 + 6  # the head, then six table entries
    drv.post(0, [b"a"], [1, 1])
    drv.kick(0)
    assert q.descriptors_walked == 7 + 3


def test_after_stop_serving_kicks_run_to_the_end(virtio_driver, loop):
    dev = CountingEcho()
    dev.kick_budget = 4
    dev.serve_on(loop)
    dev.stop_serving()
    dev.stop_serving()  # twice: nothing to undo
    drv = virtio_driver(dev, ram_size=1 << 20)
    drv.init()
    for i in range(10):
        drv.post(0, [b"%d" % i], [1])
    drv.kick(0)
    assert drv.used_idx(0) == 10 and [c for c in dev.calls if c[1]] == [(20, 10)]


class BigEcho(EchoDevice):
    queue_max_sizes = (8192,)


@pytest.mark.parametrize("length", [4096, 4097])
def test_a_chain_may_have_at_most_4096_ring_descriptors(virtio_driver, length):
    """However big the queue: one chain is never more than one slice of work (QEMU caps a chain's
    buffers the same way, at 1024). 4096 descriptors are served; 4097 are a guest error."""
    drv = virtio_driver(BigEcho(), ram_size=2 << 20)
    drv.init()
    buf = drv.ram.alloc(8, 8)
    drv.ram.write(buf, b"abcdefgh")
    for i in range(length):
        more = 1 if i + 1 < length else 0  # NEXT
        drv.write_desc(0, i, buf, 1, more, i + 1 if more else 0)
    drv.publish(0, 0)
    drv.kick(0)
    if length <= 4096:
        assert drv.used_idx(0) == 1 and not drv.needs_reset
        assert drv.device.seen == [b"a" * length]
    else:
        assert drv.needs_reset and drv.used_idx(0) == 0
        assert "longer than 4096" in (drv.device.broken or "")


def test_stop_serving_after_the_loop_stopped(virtio_driver):
    """A transport that stops its loop before it lets go of the device (vhost-user's close)."""
    dev = CountingEcho()
    dev.kick_budget = 4
    ev = EventLoop("stopped-first").start()
    dev.serve_on(ev)
    ev.stop()
    dev.stop_serving()  # no error although the loop's fds are gone
    drv = virtio_driver(dev, ram_size=1 << 20)
    drv.init()
    for i in range(10):
        drv.post(0, [b"%d" % i], [1])
    drv.kick(0)
    assert drv.used_idx(0) == 10  # nothing waits for the stopped loop
