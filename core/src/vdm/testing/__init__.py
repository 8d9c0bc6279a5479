"""Test support for vdm devices: fake guest RAM, an in-process virtio driver, its split rings
(:mod:`vdm.testing.ring`) and an echo device (:mod:`vdm.testing.devices`).

Installed as a pytest plugin (entry point ``pytest11``), so any project that depends on vdm-core
gets the ``virtio_driver`` fixture; see :mod:`vdm.testing.pytest_plugin`.
"""

from .devices import EchoDevice
from .driver import FeaturesRefused, Used, VirtioTestDriver
from .memory import GuestRam
from .pci_driver import RecordingMsi, VirtioPciTestDriver
from .ring import DriverRing

__all__ = [
    "DriverRing",
    "EchoDevice",
    "FeaturesRefused",
    "GuestRam",
    "RecordingMsi",
    "Used",
    "VirtioPciTestDriver",
    "VirtioTestDriver",
]
