"""vdm.poller.FdPoller, the one wakeable poller thread vdm-net and vdm-vsock use: what it watches
follows interest(), ready fds become kicks (each queue once a round), wake/schedule from other
threads, stop from its own thread, a failing callback ends the thread with one line and no fd
left open. Real socketpairs; no timed assertions (waits are bounded, they only fail a hung run)."""

from __future__ import annotations

import logging
import os
import selectors
import socket
import threading

import pytest
from vdm.poller import FdPoller

WAIT = 10.0


class Recorder:
    """The device's side: names fds to watch, answers ready fds with queues, records kicks."""

    def __init__(self) -> None:
        self.watch: dict[int, tuple[int, object]] = {}
        self.answers: dict[object, list[int]] = {}
        self.kicks: list[int] = []
        self.ready_calls: list[tuple[object, int]] = []
        self.cond = threading.Condition()
        self.poller: FdPoller | None = None
        self.on_kick = None

    def interest(self):
        with self.cond:
            return dict(self.watch)

    def ready(self, tag, events):
        with self.cond:
            self.ready_calls.append((tag, events))
        return self.answers.get(tag, [])

    def kick(self, index: int) -> None:
        if self.on_kick is not None:
            self.on_kick(index)
        with self.cond:
            self.kicks.append(index)
            self.cond.notify_all()

    def wait_kicks(self, n: int) -> list[int]:
        return self.wait_until(lambda kicks: len(kicks) >= n)

    def wait_until(self, done) -> list[int]:
        with self.cond:
            assert self.cond.wait_for(lambda: done(self.kicks), WAIT), self.kicks
            return list(self.kicks)


@pytest.fixture
def rec():
    r = Recorder()
    pollers: list[FdPoller] = []

    def make(name="test-poller"):
        p = FdPoller(r.interest, r.ready, r.kick, name=name)
        r.poller = p
        pollers.append(p)
        p.start()
        return p

    r.make = make
    yield r
    for p in pollers:
        p.stop()


def open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def test_a_readable_fd_kicks_the_queues_ready_names_once_each(rec):
    a, b = socket.socketpair()
    with a, b:
        rec.watch = {a.fileno(): (selectors.EVENT_READ, "conn")}
        rec.answers = {"conn": [2, 0, 2]}
        rec.make()
        b.send(b"x")
        assert rec.wait_kicks(2)[:2] == [2, 0]
        tag, events = rec.ready_calls[0]
        assert (tag, events & selectors.EVENT_READ) == ("conn", selectors.EVENT_READ)


def test_what_is_watched_follows_interest_after_a_wake(rec):
    a, b = socket.socketpair()
    c, d = socket.socketpair()
    with a, b, c, d:
        rec.answers = {"a": [1], "c": [3]}
        p = rec.make()
        b.send(b"readable all along, not watched yet")
        rec.watch = {c.fileno(): (selectors.EVENT_READ, "c")}
        p.wake()
        d.send(b"x")
        rec.wait_until(lambda kicks: 3 in kicks)
        with rec.cond:
            seen_before = [tag for tag, _ in rec.ready_calls]
            rec.watch = {a.fileno(): (selectors.EVENT_READ, "a")}  # c dropped, a added
        p.wake()
        rec.wait_until(lambda kicks: 1 in kicks)
        assert "a" not in seen_before  # a was readable but not named, so never handed to ready()


def test_schedule_from_another_thread_kicks_that_queue_once(rec):
    release = threading.Event()
    rec.on_kick = lambda index: index == 0 and release.wait(WAIT)  # the poller busy in a kick
    p = rec.make()
    p.schedule(0)
    p.schedule(5)
    p.schedule(5)
    release.set()
    rec.wait_until(lambda kicks: 5 in kicks)
    p.stop()
    assert rec.kicks.count(5) == 1


def test_stop_from_its_own_thread_ends_it_and_join_waits(rec):
    p = rec.make()
    rec.on_kick = lambda index: p.stop()  # as a device reset from the poller's own kick does
    p.schedule(0)
    rec.wait_kicks(1)
    p.join()
    assert not p._thread.is_alive()
    p.wake()  # after the end: no write to the closed wake-up fd
    p.schedule(1)


def test_a_failing_callback_ends_the_thread_with_one_line_and_no_fd_left(rec, caplog):
    before = open_fds()
    a, b = socket.socketpair()
    with a, b:
        rec.watch = {a.fileno(): (selectors.EVENT_READ, "boom")}

        def ready(tag, events):
            raise RuntimeError("device bug")

        rec.ready = ready
        with caplog.at_level(logging.ERROR, logger="vdm.poller"):
            p = rec.make(name="poller-x")
            b.send(b"x")
            p._thread.join(WAIT)
        assert not p._thread.is_alive()
        lines = [r for r in caplog.records if r.name == "vdm.poller"]
        assert [r.getMessage() for r in lines] == ["poller-x: poller thread failed"]
        p.wake()
    assert open_fds() == before


def test_stop_closes_its_fds_and_no_kick_follows(rec):
    before = open_fds()
    p = rec.make()
    p.stop()
    assert not p._thread.is_alive()
    assert open_fds() == before
    p.schedule(1)
    assert rec.kicks == []
