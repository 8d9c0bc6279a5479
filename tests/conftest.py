"""Suite-wide: count the real-guest tests, let the KVM-lab tests share lab boots, say where time went.

The KVM lab costs 30-140 s of boot. Here every ``run_in_kvm_lab`` (so the ``kvm_lab`` fixture,
``run_vdm(where="kvmlab")`` and ``run_qemu_in_kvm_lab`` too) runs its script in one lab kept
booted for the session (:mod:`vdm_lab.labsession`: each script in namespaces of its own, with
its own result), and the tests marked ``kvmlab`` run one after another at the end of the session
so the lab is not left idle between them. ``VDM_LAB_SHARED=0`` boots a lab per script as before.
A test that needs a lab of its own passes ``fresh=True`` (or ``outdir``) to ``run_in_kvm_lab``.

At the end the 15 test files that took longest (setup, call and teardown of all their tests, reruns
included) are listed with the real-guest and the other tests' totals: ``--durations`` names single
steps, but the budget (the whole suite under 30 minutes on a quiet machine) is spent file by file.
"""

from __future__ import annotations

import pytest
from vdm_lab import labsession

_REAL_MARKERS = ("realguest", "kvmlab", "xenlab")
_real: set[str] = set()
_outcomes: dict[str, int] = {"passed": 0, "failed": 0, "skipped": 0}
#: seconds per test file (setup + call + teardown, reruns included) and per kind of test
_file_s: dict[str, float] = {}
_kind_s: dict[str, float] = {"real-guest": 0.0, "other": 0.0}


def pytest_configure(config: pytest.Config) -> None:
    labsession.enable()


def pytest_unconfigure(config: pytest.Config) -> None:
    labsession.shutdown()


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if any(item.get_closest_marker(m) for m in _REAL_MARKERS):
            _real.add(item.nodeid)
    if labsession.enabled():
        # the KVM-lab tests last, in their collected order, so one lab boot serves them in a row
        lab = [item for item in items if item.get_closest_marker("kvmlab")]
        items[:] = [item for item in items if not item.get_closest_marker("kvmlab")] + lab


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    path = report.nodeid.split("::", 1)[0]
    _file_s[path] = _file_s.get(path, 0.0) + report.duration
    _kind_s["real-guest" if report.nodeid in _real else "other"] += report.duration
    if report.nodeid not in _real:
        return
    if report.when == "call" or (report.when == "setup" and report.outcome != "passed"):
        _outcomes[report.outcome] = _outcomes.get(report.outcome, 0) + 1


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if len(_file_s) > 1:  # where the time went, by file: the budget is the whole suite's
        top = sorted(_file_s.items(), key=lambda kv: -kv[1])[:15]
        terminalreporter.write_sep("=", "slowest 15 test files (setup + call + teardown)")
        for path, seconds in top:
            terminalreporter.write_line(f"{seconds:8.1f}s {path}")
        terminalreporter.write_line(
            f"real-guest tests {_kind_s['real-guest']:.0f} s, the others {_kind_s['other']:.0f} s")
    terminalreporter.write_line(
        "real-guest tests (QEMU TCG, KVM lab, Xen lab): "
        f"{_outcomes['passed']} passed, {_outcomes['failed']} failed, {_outcomes['skipped']} skipped"
    )
