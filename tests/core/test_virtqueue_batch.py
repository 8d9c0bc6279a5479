"""Virtqueue.complete_batch: push_many + should_notify + set_notification(True) in one call.

Each test drives two identical queues (vdm.testing's EchoDevice, holding; never kicked) through the
same random script: one ends its batches with the three calls, the other with complete_batch. The
driver must see the same rings (used elements and index, avail_event, used.flags), get the same
used buffers back, and the device the same answers (interrupt or not, buffers left or not), with
and without EVENT_IDX, with the driver moving used_event and NO_INTERRUPT at random and buffers
added after the device looked. Runs on the Python and the compiled path alike (VDM_FASTPATH).
"""

from __future__ import annotations

import random

import pytest
from vdm.device import F_EVENT_IDX
from vdm.testing import EchoDevice, VirtioTestDriver
from vdm.virtqueue import DescriptorChain, Virtqueue

from tests.core import rings

SIZE = 16


@pytest.fixture
def pair(virtio_driver):
    def make(*, exclude: int = 0) -> list[tuple[VirtioTestDriver, Virtqueue]]:
        out = []
        for _ in range(2):
            drv = virtio_driver(EchoDevice(hold=True, queue_size=SIZE), ram_size=1 << 20)
            drv.init(exclude=exclude)
            out.append((drv, drv.device.queues[0]))
        return out

    return make


def _ring_state(drv: VirtioTestDriver) -> tuple:
    elems = tuple(rings.used_elem(drv, 0, slot) for slot in range(SIZE))
    return drv.used_idx(0), rings.used_flags(drv, 0), drv.avail_event(0), elems


def _three_calls(q: Virtqueue, items: list[tuple[DescriptorChain, int]]) -> tuple[bool, bool]:
    q.push_many(items)
    notify = q.should_notify()
    return notify, q.set_notification(True)


@pytest.mark.parametrize("event_idx", [True, False], ids=["event_idx", "no_event_idx"])
@pytest.mark.parametrize("seed", range(6))
def test_complete_batch_does_what_the_three_calls_do(pair, event_idx, seed):
    sides = pair(exclude=0 if event_idx else 1 << F_EVENT_IDX)
    assert [bool(d.features >> F_EVENT_IDX & 1) for d, _ in sides] == [event_idx] * 2
    rnd = random.Random(seed)
    held: list[list[DescriptorChain]] = [[], []]
    outstanding = 0  # chains posted, not yet collected (two descriptors each: room for SIZE // 2)
    answers = []
    for step in range(60):
        # the same script for both sides: the driver's buffers, used_event and NO_INTERRUPT, and
        # the device's pops and completions
        n_post = min(rnd.randrange(0, 4), SIZE // 2 - 1 - outstanding)
        late = outstanding + n_post < SIZE // 2 - 1 and rnd.random() < 0.3  # added after the pops
        used_event = rnd.randrange(0, 1 << 16)
        flags = rnd.choice([0, 0, 1])
        disable = rnd.random() < 0.2
        n_pop, n_done = rnd.randrange(0, 4), rnd.randrange(0, 4)
        for side, (drv, q) in enumerate(sides):
            if disable:
                q.set_notification(False)
            for k in range(n_post):
                drv.post(0, [b"s%d-%d" % (step, k)], [8])
            rings.set_used_event(drv, 0, used_event)
            rings.set_avail_flags(drv, 0, flags)
            for _ in range(n_pop):
                chain = q.pop()
                if chain is not None:
                    held[side].append(chain)
            done = [(c, c.write(b"r%d" % c.head)) for c in held[side][:n_done]]
            del held[side][:n_done]
            if late:
                drv.post(0, [b"late%d" % step], [8])
            answers.append(_three_calls(q, done) if side == 0 else q.complete_batch(done))
            if held[side] and step % 7 == 3:  # a completion from another thread between batches
                q.push(held[side].pop(0), 0)
        outstanding += n_post + late
        assert answers[-1] == answers[-2], f"step {step}: (notify, more) differ"
        assert _ring_state(sides[0][0]) == _ring_state(sides[1][0]), f"step {step}: rings differ"
        got = [[(u.head, u.written, u.data[: u.written]) for u in d.collect(0)] for d, _ in sides]
        assert got[0] == got[1]
        outstanding -= len(got[0])
    assert any(a[0] for a in answers) and not all(a[0] for a in answers), "the script tried both answers"
    assert any(a[1] for a in answers) and not all(a[1] for a in answers)


def test_complete_batch_publishes_notifies_and_rearms(pair):
    (drv, q), _ = pair()
    chains = [q.pop() for _ in (drv.post(0, [b"a"], [4]), drv.post(0, [b"b"], [4]))]
    assert all(c is not None for c in chains)
    drv.ram.write(drv.queues[0].used + 4 + 8 * SIZE, b"\0\0")  # avail_event cleared by the driver
    notify, more = q.complete_batch([(c, 1) for c in chains])  # type: ignore[misc]
    assert (notify, more) == (True, False)
    assert drv.used_idx(0) == 2 and drv.avail_event(0) == 2  # published and re-armed
    assert [u.head for u in drv.collect(0)] == [c.head for c in chains]  # type: ignore[union-attr]
    assert q.complete_batch([]) == (False, False), "nothing pushed since: no interrupt"
    drv.post(0, [b"c"], [4])
    assert q.complete_batch([]) == (False, True), "a buffer is there: process the queue again"


def test_complete_batch_with_a_bad_length_publishes_nothing(pair):
    (drv, q), _ = pair()
    drv.post(0, [b"a"], [4])
    chain = q.pop()
    assert chain is not None
    with pytest.raises(ValueError, match="does not fit 32 bits"):
        q.complete_batch([(chain, 1 << 32)])
    assert drv.used_idx(0) == 0 and q.in_flight == 1
    assert q.complete_batch([(chain, 4)]) == (True, False)
    assert [(u.head, u.written) for u in drv.collect(0)] == [(chain.head, 4)]


def test_complete_batch_drops_a_completion_of_a_head_not_held(pair):
    (drv, q), _ = pair()
    drv.post(0, [b"a"], [4])
    chain = q.pop()
    assert chain is not None
    assert q.complete_batch([(chain, 4)])[0]
    assert q.complete_batch([(chain, 4)]) == (False, False)
    assert q.duplicate_completions == 1 and drv.used_idx(0) == 1
