"""The event loop thread: callbacks for readable fds, a bad callback does not stop the others."""

from __future__ import annotations

import os
import threading
import time

import pytest
from vdm.eventfd import EFD_NONBLOCK, eventfd, eventfd_write
from vdm.eventloop import EventLoop, drain_eventfd


@pytest.fixture
def loop():
    lp = EventLoop("test-events").start()
    yield lp
    lp.stop()


def test_callbacks_run_on_the_loop_thread(loop):
    fd = eventfd(0, EFD_NONBLOCK)
    seen: list[tuple[str, int]] = []
    done = threading.Event()

    def cb() -> None:
        seen.append((threading.current_thread().name, drain_eventfd(fd)))
        done.set()

    loop.add_reader(fd, cb)
    eventfd_write(fd, 3)
    assert done.wait(5)
    assert seen == [("test-events", 3)]
    os.close(fd)


def test_a_failing_callback_does_not_stop_the_loop(loop, caplog):
    bad, good = eventfd(0, EFD_NONBLOCK), eventfd(0, EFD_NONBLOCK)
    done = threading.Event()

    def boom() -> None:
        drain_eventfd(bad)
        raise RuntimeError("device bug")

    loop.add_reader(bad, boom)
    loop.add_reader(good, lambda: (drain_eventfd(good), done.set()))
    eventfd_write(bad, 1)
    eventfd_write(good, 1)
    assert done.wait(5)
    assert "event callback for fd" in caplog.text
    os.close(bad)
    os.close(good)


def test_remove_and_replace_readers(loop):
    fd = eventfd(0, EFD_NONBLOCK)
    hits: list[str] = []
    second = threading.Event()
    loop.add_reader(fd, lambda: (drain_eventfd(fd), hits.append("first")))
    loop.add_reader(fd, lambda: (drain_eventfd(fd), hits.append("second"), second.set()))  # replaces
    eventfd_write(fd, 1)
    assert second.wait(5)
    loop.remove_reader(fd)
    loop.remove_reader(fd)  # twice: harmless
    eventfd_write(fd, 1)
    time.sleep(0.1)  # time for the loop to (wrongly) act on it
    assert hits == ["second"]
    assert drain_eventfd(fd) == 1  # nobody read it
    os.close(fd)


def test_drain_of_an_idle_eventfd_is_zero():
    fd = eventfd(0, EFD_NONBLOCK)
    assert drain_eventfd(fd) == 0
    eventfd_write(fd, 5)
    eventfd_write(fd, 2)
    assert drain_eventfd(fd) == 7
    os.close(fd)


def test_a_reader_removed_by_a_callback_in_the_same_batch_is_not_called(loop, caplog):
    """Two fds ready at once; whichever callback runs first removes and closes the other (a
    disconnect does that to kick fds): the other callback must not run on its closed fd."""
    gate, a, b = (eventfd(0, EFD_NONBLOCK) for _ in range(3))
    blocked, release = threading.Event(), threading.Event()
    ran: list[int] = []
    fds = {a: b, b: a}

    def hold() -> None:
        drain_eventfd(gate)
        blocked.set()
        release.wait(5)

    def make(me: int):
        def cb() -> None:
            drain_eventfd(me)  # EBADF if the other one closed this fd already
            ran.append(me)
            other = fds[me]
            loop.remove_reader(other)
            os.close(other)

        return cb

    loop.add_reader(gate, hold)
    loop.add_reader(a, make(a))
    loop.add_reader(b, make(b))
    eventfd_write(gate, 1)
    assert blocked.wait(5)
    eventfd_write(a, 1)
    eventfd_write(b, 1)
    release.set()  # the next select() reports a and b together
    deadline = time.monotonic() + 5
    while not ran and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.2)  # time for the second callback to (wrongly) run
    assert len(ran) == 1, ran
    assert "event callback for fd" not in caplog.text
    loop.remove_reader(ran[0])
    loop.remove_reader(gate)
    os.close(ran[0])
    os.close(gate)
