"""Session fixtures for the real-guest tests: QEMU, the guest kit, the KVM lab.

Where QEMU or the kit is missing the tests skip with the reason; in CI (``CI`` or
``VDM_REALGUEST_REQUIRED`` set) they fail instead, because CI installs everything they need.
"""

from __future__ import annotations

import os

import pytest

from tests.realguest import harness


def _required() -> bool:
    return bool(os.environ.get("VDM_REALGUEST_REQUIRED") or os.environ.get("CI"))


def _unavailable(reason: str) -> None:
    if _required():
        pytest.fail(f"{reason} (required here: CI or VDM_REALGUEST_REQUIRED is set)", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def qemu() -> str:
    """The path of qemu-system-x86_64."""
    path = harness.qemu_binary()
    if path is None:
        _unavailable("qemu-system-x86_64 is not installed (apt-get install qemu-system-x86)")
    return path


@pytest.fixture(scope="session")
def kit(qemu: str) -> harness.GuestKit:
    """The guest kit, built once per machine (scripts/guestkit/build.sh, cached)."""
    try:
        return harness.guestkit()
    except harness.GuestKitError as e:
        first = str(e).strip().splitlines()
        _unavailable(f"the guest kit cannot be built: {first[-1] if first else e}")
        raise  # not reached


@pytest.fixture(scope="session")
def kvm_lab(kit: harness.GuestKit):
    """``run(script_text, timeout=...) -> LabResult``: run_in_kvm_lab bound to the session's kit."""
    if not kit.lab_initrd.exists():
        _unavailable(f"{kit.lab_initrd} is missing")

    def run(script_text: str, timeout: float = 600, **kw) -> harness.LabResult:
        return harness.run_in_kvm_lab(script_text, timeout, kit=kit, **kw)

    return run
