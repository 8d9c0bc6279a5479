"""Marks shared by the real-guest tests."""

from __future__ import annotations

import pytest

#: For a test that boots one guest in the nested KVM lab and checks it. Lab guests -- QEMU's own
#: as well as vdm's -- now and then triple-fault or stall in early kernel boot, before any device
#: work (their kernels patch their own text on QEMU's multi-threaded TCG; scripts/kvmlab/README.md,
#: "When L2 itself gets stuck"). One rerun, which pytest shows as "R".
LAB_GUEST_RERUN = pytest.mark.flaky(reruns=1)
