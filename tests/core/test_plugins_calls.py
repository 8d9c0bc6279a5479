"""vdm.plugin_calls.bounded: plugin calls share one worker thread, and nothing a call does (raise,
exit, hang, call bounded itself, a fork after it) stops the next call from being answered."""

from __future__ import annotations

import os
import threading

from vdm.plugin_calls import NO_ANSWER, bounded


def test_calls_share_one_worker_thread_that_is_not_the_callers():
    idents = [bounded(threading.get_ident, 5)[0] for _ in range(20)]
    assert len(set(idents)) == 1
    assert idents[0] != threading.get_ident()


def test_a_call_that_raises_or_exits_leaves_the_worker_serving():
    def leave():
        raise SystemExit(3)

    before = bounded(threading.get_ident, 5)[0]
    assert bounded(leave, 5) == (None, "SystemExit: 3")
    assert bounded(lambda: 1 / 0, 5) == (None, "ZeroDivisionError: division by zero")
    assert bounded(threading.get_ident, 5)[0] == before


def test_a_call_that_hangs_keeps_its_thread_and_the_next_call_gets_another():
    release = threading.Event()
    hung: list[int] = []

    def hang():
        hung.append(threading.get_ident())
        release.wait(30)
        return "late"

    value, why = bounded(hang, 0.2)
    assert value is None and why.startswith(NO_ANSWER)
    try:
        answered, why = bounded(threading.get_ident, 5)
        assert why is None and answered != hung[0]
    finally:
        release.set()


def test_a_call_may_call_bounded_itself():
    """(add_arguments -> add_device_options -> a device check: the outer call holds the worker)"""
    outer = bounded(lambda: bounded(lambda: "inner", 5), 5)
    assert outer == (("inner", None), None)
    assert bounded(lambda: "next", 5) == ("next", None)


def test_a_forked_child_gets_answers():
    bounded(threading.get_ident, 5)  # the parent has an idle worker when it forks
    pid = os.fork()
    if pid == 0:  # the child: its copy of the worker has no thread behind it
        try:
            os._exit(0 if bounded(lambda: 7, 5) == (7, None) else 1)
        finally:
            os._exit(2)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
