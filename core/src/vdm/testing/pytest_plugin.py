"""pytest fixtures for device tests (loaded automatically through the ``pytest11`` entry point).

``virtio_driver(device, transport="mmio", **kw)`` returns a :class:`~vdm.testing.VirtioTestDriver`
(with ``transport="pci"``, a :class:`~vdm.testing.VirtioPciTestDriver`) attached to ``device``.
At the end of the test it checks that nothing was written outside the fake guest RAM and resets
the device (stopping its backend threads).
"""

from __future__ import annotations

from typing import Any, Callable, Iterator

import pytest

from ..device import VirtioDevice
from .driver import VirtioTestDriver
from .pci_driver import VirtioPciTestDriver


@pytest.fixture
def virtio_driver() -> Iterator[Callable[..., VirtioTestDriver]]:
    made: list[VirtioTestDriver] = []

    def make(device: VirtioDevice, transport: str = "mmio", **kw: Any) -> VirtioTestDriver:
        cls = {"mmio": VirtioTestDriver, "pci": VirtioPciTestDriver}[transport]
        drv = cls(device, **kw)
        made.append(drv)
        return drv

    yield make
    for drv in made:
        drv.device.reset()
        drv.ram.check_guards()
