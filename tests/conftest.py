"""Suite-wide: count the real-guest tests, and let the KVM-lab tests share lab boots.

The KVM lab costs 30-140 s of boot. Here every ``run_in_kvm_lab`` (so the ``kvm_lab`` fixture,
``run_vdm(where="kvmlab")`` and ``run_qemu_in_kvm_lab`` too) runs its script in one lab kept
booted for the session (:mod:`vdm_lab.labsession`: each script in namespaces of its own, with
its own result), and the tests marked ``kvmlab`` run one after another at the end of the session
so the lab is not left idle between them. ``VDM_LAB_SHARED=0`` boots a lab per script as before.
A test that needs a lab of its own passes ``fresh=True`` (or ``outdir``) to ``run_in_kvm_lab``.
"""

from __future__ import annotations

import pytest
from vdm_lab import labsession

_REAL_MARKERS = ("realguest", "kvmlab", "xenlab")
_real: set[str] = set()
_outcomes: dict[str, int] = {"passed": 0, "failed": 0, "skipped": 0}


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
    if report.nodeid not in _real:
        return
    if report.when == "call" or (report.when == "setup" and report.outcome != "passed"):
        _outcomes[report.outcome] = _outcomes.get(report.outcome, 0) + 1


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    terminalreporter.write_line(
        "real-guest tests (QEMU TCG, KVM lab, Xen lab): "
        f"{_outcomes['passed']} passed, {_outcomes['failed']} failed, {_outcomes['skipped']} skipped"
    )
