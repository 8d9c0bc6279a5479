"""A pytest plugin that lists the test files whose tests walk virtqueue chains in their own process.

scripts/test.sh runs the suite on the default virtqueue path, then again, on the other one
(``VDM_FASTPATH``), only the tests that reach the code :mod:`vdm.fastpath` replaces:
:meth:`vdm.virtqueue.Virtqueue.pop`, ``chain_at`` and ``_walk``. This plugin finds them; refresh
test.sh's ``RING_TESTS`` with its list when ring tests are added::

    python3 -m pytest -q -p tests.ringwalk_files tests/core tests/security

At the end it prints one line per test file that walked at least one chain (with the calls counted)
and one line naming the files that walked none. It counts calls only; it changes no behaviour.
A child process (``vdm run``, ``vdm vhost-user``) is not seen: those are the real-guest and CLI
tests, which run on the default path.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from vdm import virtqueue

_METHODS = ("pop", "chain_at", "_walk")
#: the test file now running, or None between tests
_current: list[str | None] = [None]
#: test file -> method name -> calls (every file run has an entry, empty when it walked nothing)
_calls: dict[str, dict[str, int]] = {}


def _counting(name: str, method: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(method)
    def counted(self: virtqueue.Virtqueue, *args: Any, **kwargs: Any) -> Any:
        path = _current[0]
        if path is not None:
            per = _calls[path]
            per[name] = per.get(name, 0) + 1
        return method(self, *args, **kwargs)

    return counted


def pytest_configure(config: pytest.Config) -> None:
    for name in _METHODS:
        setattr(virtqueue.Virtqueue, name, _counting(name, getattr(virtqueue.Virtqueue, name)))


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> Iterator[None]:
    path = item.nodeid.split("::", 1)[0]
    _calls.setdefault(path, {})
    _current[0] = path
    try:
        return (yield)
    finally:
        _current[0] = None


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    terminalreporter.write_sep("=", "test files that walk virtqueue chains in-process")
    for path, per in sorted(_calls.items()):
        if per:
            counts = ", ".join(f"{k} {v}" for k, v in sorted(per.items()))
            terminalreporter.write_line(f"walks: {path} ({counts})")
    none = sorted(path for path, per in _calls.items() if not per)
    terminalreporter.write_line(f"walks none: {' '.join(none)}")
