"""Fixtures for vdm-net tests: a private network namespace per test."""

from __future__ import annotations

from typing import Iterator

import pytest

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
