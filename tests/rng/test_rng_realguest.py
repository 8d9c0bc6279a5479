"""A real Linux guest reads /dev/hwrng from vdm-rng served by ``vdm vhost-user`` (QEMU TCG).

``vdm vhost-user --rng rate=...,period=...`` (this checkout's vdm-rng, /dev/urandom, rate-limited)
serves a socket; QEMU boots the guest kit with a ``vhost-user-rng-pci`` device on it, and the kit's
``rng`` workload reads from ``/dev/hwrng`` and reports which hardware RNG the kernel bound. Under
the host's QEMU 7.2 and Debian 13's QEMU 10.0. The guest reads more than one window's quota, so
its read completes only if held requests are served when their window comes (nothing here times
it). No KVM needed: the device is reached over vhost-user. The body is shared with the example
plugin's test (tests/realguest/hwrng.py).
"""

from __future__ import annotations

import sys

import pytest

from tests.realguest.conftest import kit, qemu, qemu_frontend  # noqa: F401 - the session fixtures
from tests.realguest.hwrng import guest_reads_hwrng, vhost_user_backend

pytestmark = [pytest.mark.realguest, pytest.mark.slow]

#: the limit served: 8 KiB/s in 100 ms windows (819 bytes each); the guest reads 4 KiB
RATE, PERIOD, READ = 8192, 100, 4096


@pytest.fixture
def rng_backend(tmp_path):
    """``vdm vhost-user --rng rate=RATE,period=PERIOD``; yields its vdm_lab.VhostUserBackend."""
    with vhost_user_backend(sys.executable, ["--rng", f"rate={RATE},period={PERIOD}"], tmp_path) as b:
        yield b


def test_guest_reads_hwrng_through_the_rate_limit(kit, qemu_frontend, rng_backend):  # noqa: F811
    guest_reads_hwrng(kit, qemu_frontend, rng_backend, READ)
