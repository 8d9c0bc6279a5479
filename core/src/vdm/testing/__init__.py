"""Test support for vdm devices: fake guest RAM and an in-process virtio driver.

Installed as a pytest plugin (entry point ``pytest11``), so any project that depends on vdm-core
gets the ``virtio_driver`` fixture; see :mod:`vdm.testing.pytest_plugin`.
"""

from .driver import FeaturesRefused, Used, VirtioTestDriver
from .memory import GuestRam
from .pci_driver import RecordingMsi, VirtioPciTestDriver

__all__ = [
    "FeaturesRefused",
    "GuestRam",
    "RecordingMsi",
    "Used",
    "VirtioPciTestDriver",
    "VirtioTestDriver",
]
