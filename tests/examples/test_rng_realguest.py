"""A real Linux guest reads /dev/hwrng from the example plugin's device.

The installed example (``vdm-rng-example``) is served by ``vdm vhost-user --rng-example ""``; QEMU (TCG)
boots the guest kit with a ``vhost-user-rng-pci`` device on that socket, and the kit's ``rng``
workload reads 4 KiB from ``/dev/hwrng`` and reports which hardware RNG the kernel used. No KVM
needed: the device is reached over vhost-user. The body is shared with vdm-rng's test
(tests/realguest/hwrng.py).
"""

from __future__ import annotations

import pytest

from tests.examples.rng_install import install_rng_example
from tests.realguest.conftest import kit, qemu, qemu_frontend  # noqa: F401 - the session fixtures
from tests.realguest.hwrng import guest_reads_hwrng, vhost_user_backend

pytestmark = [pytest.mark.realguest, pytest.mark.slow]


@pytest.fixture
def rng_backend(tmp_path):
    """``vdm vhost-user --rng-example ""`` from a venv where the example is installed; yields
    its vdm_lab.VhostUserBackend."""
    python = install_rng_example(tmp_path)
    with vhost_user_backend(python, ["--rng-example", ""], tmp_path) as b:
        yield b


def test_guest_reads_hwrng_from_the_example_device(kit, qemu_frontend, rng_backend):  # noqa: F811
    """Under QEMU 7.2 (the host's) and 10.0 (Debian 13's); the id and the messages name which."""
    guest_reads_hwrng(kit, qemu_frontend, rng_backend, 4096)
