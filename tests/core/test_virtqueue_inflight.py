"""Virtqueue.push_many, Virtqueue.chain_at and in-flight head tracking, driven by hand.

The device (vdm.testing's EchoDevice, holding) is never kicked: each test takes chains and
completes them itself, as a device with its own threads (vdm-net's merged receive buffers, a
vhost-user backend resubmitting requests after a reconnect) does. The driver's view is
vdm.testing's, which refuses any used element whose head it does not have outstanding -- what
Linux reports as "id N is not a head!".
"""

from __future__ import annotations

import threading

import pytest
from vdm.device import F_EVENT_IDX
from vdm.testing import EchoDevice, VirtioTestDriver
from vdm.virtqueue import DescriptorChain, Virtqueue, VirtqueueError

from tests.core import rings

SIZE = 16


@pytest.fixture
def hold(virtio_driver):
    def make(*, exclude: int = 0) -> tuple[VirtioTestDriver, Virtqueue]:
        drv = virtio_driver(EchoDevice(hold=True, queue_size=SIZE), ram_size=1 << 20)
        drv.init(exclude=exclude)
        return drv, drv.device.queues[0]

    return make


def take(drv: VirtioTestDriver, q: Virtqueue, n: int, in_len: int = 8) -> list[DescriptorChain]:
    for i in range(n):
        drv.post(0, [b"req%d" % i], [in_len])
    chains = [q.pop() for _ in range(n)]
    assert all(c is not None for c in chains)
    return chains  # type: ignore[return-value]


# ---- push_many ------------------------------------------------------------------------------------


def test_push_many_returns_every_chain_in_order_with_its_length(hold):
    drv, q = hold()
    chains = take(drv, q, 3)
    for n, c in enumerate(chains):
        c.write(b"x" * (n + 1))
    q.push_many([(c, n + 1) for n, c in enumerate(chains)])
    used = drv.collect(0)
    assert [(u.head, u.written) for u in used] == [(c.head, n + 1) for n, c in enumerate(chains)]
    assert [u.data[: u.written] for u in used] == [b"x", b"xx", b"xxx"]
    assert drv.used_idx(0) == 3 == q.used_idx


def test_push_many_is_one_push_for_interrupts(hold):
    drv, q = hold()
    assert not q.should_notify(), "nothing pushed yet"
    q.push_many([(c, 0) for c in take(drv, q, 4)])
    assert q.should_notify()
    assert not q.should_notify(), "the batch was already signalled"
    q.push_many([])
    assert not q.should_notify(), "an empty batch is not a push"
    assert drv.used_idx(0) == 4


def test_push_many_with_event_idx_interrupts_when_used_event_is_crossed(hold):
    drv, q = hold()
    assert drv.features >> F_EVENT_IDX & 1
    chains = take(drv, q, 6)
    q.push_many([(c, 0) for c in chains[:2]])
    assert q.should_notify()  # the first signal is always sent
    rings.set_used_event(drv, 0, 4)  # "interrupt me when the 5th element is used"
    q.push_many([(c, 0) for c in chains[2:4]])
    assert not q.should_notify(), "used.idx 4 has not passed used_event 4"
    q.push_many([(c, 0) for c in chains[4:]])
    assert q.should_notify(), "used.idx 6 passed used_event 4"


def test_push_many_after_a_reset_writes_nothing(hold):
    drv, q = hold()
    chains = take(drv, q, 3)
    epoch = q.epoch
    drv.init()  # the driver resets the device and sets the queue up again (new rings)
    assert q.epoch != epoch and q.active
    q.push_many([(c, 1) for c in chains])
    assert q.used_idx == 0 and drv.used_idx(0) == 0, "completions of the old rings reached the new ones"
    assert q.duplicate_completions == 0, "a stale chain is not a duplicate"
    # the new rings work, and the old heads can be offered again
    q.push_many([(c, 2) for c in take(drv, q, 3)])
    assert [u.written for u in drv.collect(0)] == [2, 2, 2]


def test_push_many_on_a_queue_that_was_reset_and_not_set_up_again(hold):
    drv, q = hold()
    chains = take(drv, q, 2)
    drv.set_status(0)
    q.push_many([(c, 1) for c in chains])  # no rings any more: nothing to write, no error
    assert not q.active and q.used_idx == 0


def test_a_head_completed_twice_in_one_batch_is_published_once(hold):
    drv, q = hold()
    a, b = take(drv, q, 2)
    q.push_many([(a, 1), (b, 1), (a, 1)])
    assert [u.head for u in drv.collect(0)] == [a.head, b.head]
    assert q.used_idx == 2 and q.duplicate_completions == 1


def test_a_head_completed_again_later_is_dropped(hold):
    drv, q = hold()
    (a,) = take(drv, q, 1)
    q.push(a, 1)
    assert [u.head for u in drv.collect(0)] == [a.head]
    q.push(a, 1)
    q.push_many([(a, 1)])
    assert drv.collect(0) == [] and drv.used_idx(0) == 1
    assert q.duplicate_completions == 2


def test_a_chain_the_queue_never_handed_out_is_not_published(hold):
    drv, q = hold()
    take(drv, q, 1)
    forged = DescriptorChain(5, [], [], q.epoch, q.memory)  # head 5 was never offered
    out_of_range = DescriptorChain(SIZE + 3, [], [], q.epoch, q.memory)
    q.push_many([(forged, 0), (out_of_range, 0)])
    assert drv.used_idx(0) == 0 and q.duplicate_completions == 2


@pytest.mark.parametrize("written", [-1, 1 << 32, 1.0, None])
def test_a_length_that_does_not_fit_32_bits_is_refused_before_anything_is_published(hold, written):
    drv, q = hold()
    a, b = take(drv, q, 2)
    with pytest.raises(ValueError):
        q.push_many([(a, 1), (b, written)])
    assert drv.used_idx(0) == 0
    q.push_many([(a, 1), (b, 2)])  # both still in flight: a correct retry goes through
    assert [u.written for u in drv.collect(0)] == [1, 2]


def test_push_and_push_many_from_many_threads_return_each_head_once(hold):
    drv, q = hold()
    rounds = 40
    for _ in range(rounds):
        chains = take(drv, q, SIZE // 2)  # two descriptors each: the whole table
        groups = [chains[0:1], chains[1:4], chains[4:7], chains[7:8]]
        start = threading.Barrier(len(groups))

        def complete(group: list[DescriptorChain], start: threading.Barrier) -> None:
            start.wait()
            if len(group) == 1:
                q.push(group[0], 1)
            else:
                q.push_many([(c, 1) for c in group])

        threads = [threading.Thread(target=complete, args=(g, start)) for g in groups]
        for t in threads:
            t.start()
        for t in threads:
            t.join(5)
        used = drv.collect(0)  # raises if a head comes back that is not outstanding
        assert sorted(u.head for u in used) == sorted(c.head for c in chains)
    assert q.used_idx == rounds * SIZE // 2 and q.duplicate_completions == 0


# ---- chain_at -------------------------------------------------------------------------------------


def test_chain_at_walks_the_chain_like_pop_without_touching_the_available_ring(hold):
    drv, q = hold()
    head = drv.post(0, [b"abc", b"de"], [4, 4])
    chain = q.chain_at(head)
    assert chain.head == head and chain.read() == b"abcde" and chain.writable_len == 8
    assert q.last_avail_idx == 0, "chain_at moved the available index"
    chain.write(b"resubmitted")
    q.push(chain, 8)
    (used,) = drv.collect(0)
    assert (used.head, used.data) == (head, b"resubmit")


def test_chain_at_of_an_indirect_chain(hold):
    drv, q = hold()
    head = drv.post(0, [b"in", b"direct"], [3], indirect=True)
    chain = q.chain_at(head)
    assert chain.read() == b"indirect" and chain.writable_len == 3


@pytest.mark.parametrize("head", [SIZE, SIZE + 1, 0xFFFF, -1])
def test_chain_at_refuses_a_head_outside_the_queue(hold, head):
    _, q = hold()
    with pytest.raises(VirtqueueError, match="head index"):
        q.chain_at(head)


def test_chain_at_refuses_a_loop_and_leaves_the_head_free(hold):
    drv, q = hold()
    b = drv.ram.alloc(16, 8)
    drv.write_desc(0, 3, b, 8, rings.NEXT, 4)
    drv.write_desc(0, 4, b + 8, 8, rings.NEXT, 3)
    for _ in range(2):  # the second call fails the same way: a refused walk holds nothing
        with pytest.raises(VirtqueueError, match="loop"):
            q.chain_at(3)
    drv.write_desc(0, 4, b + 8, 8, 0, 0)  # the driver mends the chain
    assert q.chain_at(3).readable_len == 16


def test_chain_at_refuses_buffers_outside_guest_ram(hold):
    drv, q = hold()
    drv.write_desc(0, 2, drv.ram.end - 4, 8, 0, 0)
    with pytest.raises(VirtqueueError, match="queue 0"):
        q.chain_at(2)
    drv.write_desc(0, 2, drv.ram.base - 4096, 8, rings.WRITE, 0)
    with pytest.raises(VirtqueueError):
        q.chain_at(2)


def test_chain_at_on_a_queue_that_is_not_active(hold):
    drv, q = hold()
    drv.set_status(0)
    with pytest.raises(VirtqueueError, match="not active"):
        q.chain_at(0)


def test_chain_at_of_a_head_the_device_already_holds_returns_it_once(hold):
    """A ring stopped and started again while a request was being served: the backend resubmits
    the head from its records while the first chain is still out; the driver gets one completion."""
    drv, q = hold()
    (first,) = take(drv, q, 1)
    again = q.chain_at(first.head)
    assert again.head == first.head and again.read() == first.read()
    q.push(again, 2)
    q.push(first, 1)  # the original finishes too, later: dropped
    assert [(u.head, u.written) for u in drv.collect(0)] == [(first.head, 2)]
    assert q.duplicate_completions == 1


def test_in_flight_heads_survive_the_rings_being_unmapped_and_mapped_again(hold):
    drv, q = hold()
    (held,) = take(drv, q, 1)
    with q.lock:
        q.deactivate()
    drv.device.start_queue(q)  # the same rings, the same indexes (a vhost-user ring restart)
    q.push(held, 1)
    assert [u.head for u in drv.collect(0)] == [held.head]
    q.push(held, 1)
    assert drv.used_idx(0) == 1 and q.duplicate_completions == 1


def test_a_reset_between_chain_at_and_push(hold):
    drv, q = hold()
    head = drv.post(0, [b"old"], [4])
    stale = q.chain_at(head)
    drv.init()
    q.push(stale, 4)
    assert drv.used_idx(0) == 0 and q.duplicate_completions == 0
    head = drv.post(0, [b"new"], [4])
    fresh = q.chain_at(head)  # after the reset nothing is held
    q.push(fresh, 3)
    assert [(u.head, u.written) for u in drv.collect(0)] == [(head, 3)]


# ---- heads the driver offers twice ------------------------------------------------------------------


def test_a_driver_offering_a_head_the_device_holds_breaks_the_rules(hold):
    drv, q = hold()
    head = drv.post(0, [b"once"], [4])
    drv.publish(0, head)  # the same head a second time, still outstanding
    first = q.pop()
    assert first is not None and first.head == head
    with pytest.raises(VirtqueueError, match=f"head {head} offered again"):
        q.pop()


def test_a_head_offered_again_after_it_came_back_is_fine(hold):
    drv, q = hold()
    for _ in range(3 * SIZE):  # every head is reused several times
        (c,) = take(drv, q, 1)
        q.push(c, 1)
        (used,) = drv.collect(0)
        assert used.head == c.head
    assert q.duplicate_completions == 0


def test_a_discarded_chain_is_never_completed(hold):
    drv, q = hold()
    (c,) = take(drv, q, 1)
    q.discard(c)
    q.push(c, 1)  # a device that completes what it gave up: dropped
    assert drv.used_idx(0) == 0 and q.duplicate_completions == 1
