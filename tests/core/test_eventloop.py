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


@pytest.mark.parametrize("remove_first", [True, False])
def test_a_reader_whose_fd_number_was_replaced_serves_the_new_file_only(loop, remove_first):
    """A kick fd replaced under the loop (dup2 of another file onto its number) while another
    reference keeps the old file alive, then unregistered and registered again as the vhost-user
    handler does (or only registered again): epoll keys its registrations by (file, number) and
    removes by number, which now finds the new file. The old file's events must no longer reach
    the loop, the new one's must."""
    old = eventfd(0, EFD_NONBLOCK)
    keeper = os.dup(old)  # e.g. the frontend's end of the old kick eventfd
    calls: list[int] = []
    served = threading.Event()

    def on_old() -> None:
        drain_eventfd(old)

    loop.add_reader(old, on_old)
    new = eventfd(0, EFD_NONBLOCK)
    os.dup2(new, old)  # the number `old` now names the new eventfd
    os.close(new)
    fd = old
    if remove_first:
        loop.remove_reader(fd)
    loop.add_reader(fd, lambda: (calls.append(drain_eventfd(fd)), served.set()))
    eventfd_write(keeper, 1)  # the old file is readable (and stays so: nobody reads it)
    time.sleep(0.3)  # time for the loop to (wrongly) act on it
    assert calls == []
    eventfd_write(fd, 2)
    assert served.wait(5)
    time.sleep(0.1)
    assert calls == [2]  # served once, no spinning on the old file's readiness
    loop.remove_reader(fd)
    os.close(fd)
    assert drain_eventfd(keeper) == 1  # nobody read the old one
    os.close(keeper)


def test_a_reader_closed_before_its_removal_leaves_nothing_behind(loop):
    """The number closed first (another reference keeps the file), removed after, then a new
    file registered (the lowest free number: often the same one): only its events are served."""
    old = eventfd(0, EFD_NONBLOCK)
    keeper = os.dup(old)
    loop.add_reader(old, lambda: drain_eventfd(keeper))
    os.close(old)
    loop.remove_reader(old)
    calls: list[int] = []
    new = eventfd(0, EFD_NONBLOCK)
    loop.add_reader(new, lambda: calls.append(drain_eventfd(new)))
    eventfd_write(keeper, 1)
    time.sleep(0.3)
    assert calls == []
    eventfd_write(new, 1)
    deadline = time.monotonic() + 5
    while not calls and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.1)
    assert calls == [1]
    loop.remove_reader(new)
    os.close(new)
    os.close(keeper)
