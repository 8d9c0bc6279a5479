"""vdm.testing, which third-party plugin tests rely on: fake guest RAM, its guards, the driver."""

from __future__ import annotations

import subprocess
import sys

import pytest
from vdm.device import F_EVENT_IDX, F_INDIRECT_DESC, F_VERSION_1
from vdm.memory import GuestMemoryError
from vdm.testing import FeaturesRefused, GuestRam, VirtioTestDriver
from vdm.testing.devices import EchoDevice

from tests.core.installed import clean_env


def test_alloc_is_aligned_inside_ram_and_disjoint():
    ram = GuestRam(64 << 10)
    spans = []
    for size, align in ((1, 1), (100, 16), (17, 8), (4096, 4096), (3, 2), (0, 16)):
        addr = ram.alloc(size, align)
        assert addr % align == 0 and ram.base <= addr and addr + max(size, 1) <= ram.end
        spans.append((addr, max(size, 1)))
    spans.sort()
    for (a, n), (b, _) in zip(spans, spans[1:]):
        assert a + n <= b, "two allocations overlap"


def test_alloc_exhaustion_and_free_merges():
    ram = GuestRam(8192)
    a = ram.alloc(4096, 4096)
    b = ram.alloc(4096, 4096)
    with pytest.raises(MemoryError):
        ram.alloc(1)
    ram.free(a, 4096)
    ram.free(b, 4096)
    assert ram.alloc(8192, 4096) == ram.base  # the two halves merged back


def test_guards_catch_writes_outside_guest_ram():
    ram = GuestRam(4096)
    ram.check_guards()
    with pytest.raises(GuestMemoryError):
        ram.write(ram.end - 2, b"four")  # the driver side is bounds-checked too
    ram.check_guards()
    # something that bypassed the checks (a buggy native backend, say) is caught
    ram._host[ram.size + 4096 + 10] ^= 0xFF  # type: ignore[attr-defined]
    with pytest.raises(AssertionError, match="outside guest RAM"):
        ram.check_guards()


def test_driver_negotiates_exactly_what_it_is_told():
    drv = VirtioTestDriver(EchoDevice(), ram_size=1 << 20)
    assert drv.init(features=1 << F_VERSION_1) == 1 << F_VERSION_1
    assert not drv.device.has_feature(F_EVENT_IDX)
    assert drv.init(exclude=1 << F_INDIRECT_DESC) == (1 << F_VERSION_1) | (1 << F_EVENT_IDX)
    with pytest.raises(FeaturesRefused):
        drv.init(features=1 << F_EVENT_IDX)  # no VERSION_1: refused
    drv.device.reset()


def test_fixture_checks_guards_after_the_test(tmp_path):
    """A device that writes outside guest RAM fails the test that used ``virtio_driver``."""
    (tmp_path / "test_rogue.py").write_text(
        "from vdm.device import VirtioDevice\n"
        "\n"
        "class Rogue(VirtioDevice):\n"
        "    queue_max_sizes = (8,)\n"
        "\n"
        "def test_rogue(virtio_driver):\n"
        "    drv = virtio_driver(Rogue(), ram_size=4096)\n"
        "    drv.ram._host[0] = 0  # the canary page below guest RAM\n"
    )
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_rogue.py"],
        cwd=tmp_path, capture_output=True, text=True, env=clean_env(), timeout=120,
    )
    assert proc.returncode == 1, proc.stdout
    assert "1 passed, 1 error" in proc.stdout
    assert "host memory outside guest RAM was written (1 bytes)" in proc.stdout
