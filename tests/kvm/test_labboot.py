"""labboot's retry rule: only a boot that fails before the guest's /init is booted again."""

from __future__ import annotations

import pytest

from tests.kvm import labboot


def fake_boots(monkeypatch, outcomes):
    calls = []

    def boot(**kw):
        exit_, serial = outcomes[len(calls)]
        calls.append(kw)
        return {"exit": exit_, "detail": f"attempt {len(calls)}", "run_s": 1.0, "serial": serial}

    monkeypatch.setattr(labboot, "boot", boot)
    return calls


def test_a_failure_before_init_is_booted_again_and_kept(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = fake_boots(monkeypatch, [("shutdown", "Linux version 6.1\ntriple"),
                                     ("poweroff", "VDMTEST INIT x=1\nVDMTEST DONE")])
    r = labboot.boot_with_retries(1, "poweroff", cpus=2)
    assert len(calls) == 2 and calls[0] == {"cpus": 2}
    assert r["exit"] == "poweroff"
    assert r["earlier"] == [{"exit": "shutdown", "detail": "attempt 1", "run_s": 1.0,
                             "serial_tail": "Linux version 6.1\ntriple"}]


def test_a_failure_after_init_is_not_retried(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = fake_boots(monkeypatch, [("timeout", "VDMTEST INIT x=1\n"), ("poweroff", "")])
    r = labboot.boot_with_retries(1, "poweroff")
    assert len(calls) == 1 and r["exit"] == "timeout" and r["earlier"] == []


def test_retries_are_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = fake_boots(monkeypatch, [("shutdown", ""), ("timeout", ""), ("poweroff", "")])
    r = labboot.boot_with_retries(1, "poweroff")
    assert len(calls) == 2 and r["exit"] == "timeout" and len(r["earlier"]) == 1
    assert labboot.boot_with_retries(0, "poweroff")["exit"] == "poweroff"  # the third outcome
