"""Suite-wide: count the real-guest tests, so CI shows how many booted a real Linux guest."""

from __future__ import annotations

import pytest

_REAL_MARKERS = ("realguest", "kvmlab", "xenlab")
_real: set[str] = set()
_outcomes: dict[str, int] = {"passed": 0, "failed": 0, "skipped": 0}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if any(item.get_closest_marker(m) for m in _REAL_MARKERS):
            _real.add(item.nodeid)


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.nodeid not in _real:
        return
    if report.when == "call" or (report.when == "setup" and report.outcome != "passed"):
        _outcomes[report.outcome] = _outcomes.get(report.outcome, 0) + 1


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    terminalreporter.write_line(
        "real-guest tests (QEMU TCG, KVM lab, Xen lab): "
        f"{_outcomes['passed']} passed, {_outcomes['failed']} failed, {_outcomes['skipped']} skipped"
    )
