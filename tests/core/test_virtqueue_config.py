"""Plugin API 2's queue configuration: one set of methods for every transport, a tracker told of
taken and completed heads, heads resumed after a reconnect, and API 1's attribute writes still
honoured with a warning that names the replacement (issue 19 item 1)."""

from __future__ import annotations

import warnings

import pytest
from vdm.device import VirtioDevice
from vdm.testing.devices import EchoDevice
from vdm.virtqueue import Virtqueue


class HoldDevice(VirtioDevice):
    device_id = 0x7E
    name = "hold"
    queue_max_sizes = (16,)

    def process_queue(self, queue: Virtqueue) -> None:
        pass


class RecordingTracker:
    """Writes down each call, with the used index the driver could see at that moment."""

    def __init__(self, drv) -> None:
        self.drv = drv
        self.calls: list[tuple] = []

    def taken(self, head: int) -> None:
        self.calls.append(("taken", head))

    def completing(self, heads: list[int]) -> None:
        self.calls.append(("completing", list(heads), self.drv.used_idx(0)))

    def completed(self, heads: list[int], used_idx: int) -> None:
        self.calls.append(("completed", list(heads), used_idx, self.drv.used_idx(0)))

    def reset(self) -> None:
        self.calls.append(("reset",))


@pytest.mark.parametrize("transport", ["mmio", "pci"])
def test_transports_configure_queues_without_deprecated_writes(virtio_driver, transport):
    """The core's own transports use the configuration methods, never API 1's attribute writes."""
    dev = EchoDevice()
    drv = virtio_driver(dev, transport=transport, ram_size=1 << 20)
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        drv.init()
        head = drv.post(0, [b"ping"], [4])
        drv.kick(0)
        (used,) = drv.collect(0)
        drv.set_status(0)
    assert (used.head, used.data) == (head, b"ping")


def test_api1_assignments_still_configure_the_queue_and_warn():
    q = Virtqueue(0, 256)
    for attr, value, setter in (
        ("size", 64, "set_size"),
        ("desc_addr", 0x1000, "set_desc_addr"),
        ("avail_addr", 0x2000, "set_avail_addr"),
        ("used_addr", 0x3000, "set_used_addr"),
        ("ready", True, "set_ready"),
        ("last_avail_idx", 7, "restore"),
        ("used_idx", 5, "restore"),
    ):
        with pytest.warns(DeprecationWarning, match=rf"Virtqueue\.{attr} .*Virtqueue\.{setter}\("):
            setattr(q, attr, value)
        assert getattr(q, attr) == value


def test_configuration_is_refused_while_the_rings_are_mapped(virtio_driver):
    drv = virtio_driver(HoldDevice(), ram_size=1 << 20)
    drv.init()
    q = drv.device.queues[0]
    assert q.active
    for call in (
        lambda: q.set_size(8),
        lambda: q.set_addresses(0, 0, 0),
        lambda: q.set_desc_addr(0),
        lambda: q.restore(0, 0),
        lambda: q.set_tracker(None),
        lambda: q.set_max_size(32),
    ):
        with pytest.raises(RuntimeError, match="while the queue is active"):
            call()
    assert q.size == 16


def test_a_tracker_hears_of_takes_and_completions_before_and_after_the_used_index_moves(virtio_driver):
    dev = HoldDevice()
    drv = virtio_driver(dev, ram_size=1 << 20)
    tracker = RecordingTracker(drv)
    dev.queues[0].set_tracker(tracker)
    drv.init()
    tracker.calls.clear()  # (the reset of init)
    q = dev.queues[0]
    heads = [drv.post(0, [b"r%d" % i], [4]) for i in range(3)]
    chains = [q.pop() for _ in range(3)]
    q.push_many([(chains[2], 0), (chains[0], 0)])
    q.push(chains[1], 0)
    q.push(chains[1], 0)  # a duplicate completion: dropped, so nobody hears of it
    assert tracker.calls == [
        ("taken", heads[0]),
        ("taken", heads[1]),
        ("taken", heads[2]),
        ("completing", [heads[2], heads[0]], 0),
        ("completed", [heads[2], heads[0]], 2, 2),
        ("completing", [heads[1]], 2),
        ("completed", [heads[1]], 3, 3),
    ]
    drv.set_status(0)
    assert tracker.calls[-1] == ("reset",)
    assert q.tracker is tracker, "the tracker stays across a reset"


def test_restore_resumes_indexes_and_serves_the_given_heads_first(virtio_driver):
    """What vhost-user does after a reconnect: next-avail/next-used from the frontend, and the
    heads a previous backend left in flight served before anything new."""
    dev = HoldDevice()
    drv = virtio_driver(dev, ram_size=1 << 20)
    drv.init()
    q = dev.queues[0]
    old = [drv.post(0, [b"old%d" % i], [4]) for i in range(3)]
    first = q.pop()
    assert first is not None and first.head == old[0]
    # the backend goes away with old[1] and old[2] taken, and a new one resumes the ring
    q.pop(), q.pop()
    with q.lock:
        q.deactivate()
    q.reset()
    drv.device.queues[0].set_size(drv.queues[0].size)
    ring = drv.queues[0]
    q.set_addresses(ring.desc, ring.avail, ring.used)
    q.restore(3, 0, resubmit=[old[2], old[1]])
    q.set_ready(True)
    dev.start_queue(q)
    new = drv.post(0, [b"new"], [3])
    got = [q.pop() for _ in range(3)]
    assert [c.head for c in got] == [old[2], old[1], new]
    assert [c.read() for c in got] == [b"old2", b"old1", b"new"]
    assert (q.last_avail_idx, q.used_idx) == (4, 0)
    assert q.pop() is None
