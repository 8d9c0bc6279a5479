"""Session fixtures for the real-guest tests: QEMU, the guest kit, the KVM lab.

Where QEMU or the kit is missing the tests skip with the reason; in CI (``CI`` or
``VDM_REALGUEST_REQUIRED`` set) they fail instead, because CI installs everything they need.
"""

from __future__ import annotations

import functools

import pytest
import vdm_lab
from vdm_lab.pytest_support import unavailable as _unavailable


@pytest.fixture(scope="session")
def qemu() -> str:
    """The path of qemu-system-x86_64."""
    path = vdm_lab.qemu_binary()
    if path is None:
        _unavailable("qemu-system-x86_64 is not installed (apt-get install qemu-system-x86)")
    return path


@functools.cache
def _host_frontend() -> vdm_lab.QemuFrontend | None:
    return vdm_lab.host_qemu()


@functools.cache
def _debian13_frontend() -> vdm_lab.QemuFrontend | str:
    try:
        return vdm_lab.debian13_qemu()
    except vdm_lab.debian13.Debian13Error as e:
        return f"QEMU 10 (Debian 13 root) cannot be built here: {e}"


def _frontend_id(which: str) -> str:
    if which == "host":
        fe = _host_frontend()
        return fe.name if fe else "qemu-host"
    return "qemu10.0"  # Debian 13's QEMU series; the root is only built when a test runs


def on_frontend(which: str) -> pytest.MarkDecorator:
    """Run a test that takes ``qemu_frontend`` against one QEMU only ("host": 7.2, "debian13": 10.0).

    For the tests whose variants split between the two QEMUs (each QEMU and each variant once, where
    the variant is the device's side and the QEMU the frontend's), instead of every pair.
    """
    return pytest.mark.parametrize("qemu_frontend", [which], indirect=True, ids=_frontend_id)


@pytest.fixture(scope="session", params=["host", "debian13"], ids=_frontend_id)
def qemu_frontend(request: pytest.FixtureRequest, qemu: str) -> vdm_lab.QemuFrontend:
    """Each QEMU the real-guest vhost-user tests run against: the host's 7.2, Debian 13's 10.0.

    The Debian 13 root is built on first use (scripts/debian13/build.sh, cached); where it cannot be
    built (no network to Debian's archive, no mmdebstrap) the QEMU 10 cases skip with the reason.
    """
    if request.param == "host":
        fe = _host_frontend()
        assert fe is not None  # the qemu fixture skipped otherwise
        return fe
    got = _debian13_frontend()
    if isinstance(got, str):
        pytest.skip(got)
    return got


@pytest.fixture(scope="session")
def kit(qemu: str) -> vdm_lab.GuestKit:
    """The guest kit, built once per machine (scripts/guestkit/build.sh, cached)."""
    try:
        return vdm_lab.guestkit()
    except vdm_lab.GuestKitError as e:
        first = str(e).strip().splitlines()
        _unavailable(f"the guest kit cannot be built: {first[-1] if first else e}")
        raise  # not reached


@pytest.fixture(scope="session")
def kvm_lab(kit: vdm_lab.GuestKit):
    """``run(script_text, timeout=...) -> LabResult``: run_in_kvm_lab bound to the session's kit."""
    if not kit.lab_initrd.exists():
        _unavailable(f"{kit.lab_initrd} is missing")

    def run(script_text: str, timeout: float = 600, **kw) -> vdm_lab.LabResult:
        return vdm_lab.run_in_kvm_lab(script_text, timeout, kit=kit, **kw)

    return run
