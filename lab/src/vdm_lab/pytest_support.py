"""For pytest suites that boot the kit: skip (or, in CI, fail) with the reason when it cannot run.

``require_kit()`` returns the built kit, or skips the test with one line saying what is missing
(QEMU, or the kit's build failing: no apt, no network on first use). Where ``CI`` or
``VDM_REALGUEST_REQUIRED`` is set the test fails instead: a CI machine is meant to have both.
Only this module of vdm_lab imports pytest.
"""

from __future__ import annotations

import os

import pytest

from .kit import GuestKit, GuestKitError, guestkit
from .qemu import qemu_binary

__all__ = ["LAB_GUEST_RERUN", "require_kit", "require_qemu", "required", "unavailable"]

#: For a test that boots one guest in the nested KVM lab and checks it. Lab guests -- QEMU's own
#: as well as vdm's -- now and then triple-fault or stall in early kernel boot, before any device
#: work (their kernels patch their own text on QEMU's multi-threaded TCG; scripts/kvmlab/README.md,
#: "When L2 itself gets stuck"). One rerun, which pytest shows as "R" (needs pytest-rerunfailures).
LAB_GUEST_RERUN = pytest.mark.flaky(reruns=1)


def required() -> bool:
    """Whether a missing QEMU or kit is a failure here (``CI`` or ``VDM_REALGUEST_REQUIRED`` set)."""
    return bool(os.environ.get("VDM_REALGUEST_REQUIRED") or os.environ.get("CI"))


def unavailable(reason: str) -> None:
    """Skip the test with ``reason``; fail it instead where real guests are required."""
    if required():
        pytest.fail(f"{reason} (required here: CI or VDM_REALGUEST_REQUIRED is set)", pytrace=False)
    pytest.skip(reason)


def require_qemu() -> str:
    """The path of qemu-system-x86_64, or skip: it is not installed."""
    path = qemu_binary()
    if path is None:
        unavailable("qemu-system-x86_64 is not installed (apt-get install qemu-system-x86)")
    assert path is not None
    return path


def require_kit() -> GuestKit:
    """QEMU and the guest kit (built once per machine), or skip with the reason."""
    require_qemu()
    try:
        return guestkit()
    except GuestKitError as e:
        lines = str(e).strip().splitlines()
        unavailable(f"the guest kit cannot be built: {lines[-1] if lines else e}")
        raise  # not reached
