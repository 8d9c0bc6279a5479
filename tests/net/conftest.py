"""Fixtures for vdm-net tests: a private network namespace per test."""

from __future__ import annotations

from typing import Iterator

import pytest
from vdm_net.config import NetConfig
from vdm_net.device import VirtioNet

from tests.net.fake_tap import FakeTap
from tests.net.netns import NetNs, netns_unavailable


@pytest.fixture
def netns() -> Iterator[NetNs]:
    """A fresh namespace (deleted afterwards); the test is skipped where namespaces cannot be made."""
    why = netns_unavailable()
    if why:
        pytest.skip(f"network namespace tests: {why}")
    ns = NetNs()
    try:
        yield ns
    finally:
        ns.close()


@pytest.fixture
def fake(virtio_driver):
    """``fake(queues=1, exclude=0, **NetConfig fields)`` -> (FakeTap, VirtioNet, driver), brought up."""
    made = []

    def make(queues: int = 1, exclude: int = 0, **cfg):
        tap = FakeTap(queues)
        dev = VirtioNet(NetConfig(queues=queues, **cfg), tap)  # type: ignore[arg-type]
        drv = virtio_driver(dev)
        drv.init(exclude=exclude)
        made.append(tap)
        return tap, dev, drv

    yield make
    for tap in made:
        tap.close()
