"""What the simulated Xen raises in the guest's thread when real Xen would stop the guest."""

from __future__ import annotations


class GuestCrashed(AssertionError):
    """Real Xen would have crashed the guest (or the vCPU would hang forever)."""


class UnclaimedAccess(AssertionError):
    """The guest touched an address no enabled ioreq server claimed."""
