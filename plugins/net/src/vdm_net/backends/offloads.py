"""Which virtio-net offload features a tap can carry, and the TUNSETOFFLOAD flags for a driver's.

The tap accepts a set of ``TUN_F_*`` flags (probed by :func:`vdm_net.backends.tap.open_tap`); each
lets the device offer a feature pair (the host side's and the guest side's). What the driver then
takes for receiving is told back to the tap with :func:`tun_offload_flags`.
"""

from __future__ import annotations

from .. import features as nf
from . import tun

__all__ = ["offered_features", "tun_offload_flags"]

#: negotiated receive feature -> the TUN_F_* flag telling the tap the guest takes it
_GUEST_TO_TUN = (
    (nf.F_GUEST_CSUM, tun.TUN_F_CSUM),
    (nf.F_GUEST_TSO4, tun.TUN_F_TSO4),
    (nf.F_GUEST_TSO6, tun.TUN_F_TSO6),
    (nf.F_GUEST_ECN, tun.TUN_F_TSO_ECN),
    (nf.F_GUEST_UFO, tun.TUN_F_UFO),
)
#: TUN_F_* flag the tap accepted -> the features it lets us offer (both directions)
_TUN_TO_FEATURES = (
    (tun.TUN_F_CSUM, (nf.F_CSUM, nf.F_GUEST_CSUM, nf.F_CTRL_GUEST_OFFLOADS)),
    (tun.TUN_F_TSO4, (nf.F_HOST_TSO4, nf.F_GUEST_TSO4)),
    (tun.TUN_F_TSO6, (nf.F_HOST_TSO6, nf.F_GUEST_TSO6)),
    (tun.TUN_F_TSO_ECN, (nf.F_HOST_ECN, nf.F_GUEST_ECN)),
    (tun.TUN_F_UFO, (nf.F_HOST_UFO, nf.F_GUEST_UFO)),
)


def offered_features(accepted: int) -> int:
    """The feature bits a tap that accepted the TUN_F_* flags ``accepted`` lets the device offer."""
    f = 0
    for flag, feats in _TUN_TO_FEATURES:
        if accepted & flag:
            for n in feats:
                f |= nf.bit(n)
    return f


def tun_offload_flags(features: int) -> int:
    """The TUNSETOFFLOAD flags for the receive offloads in ``features``."""
    flags = 0
    for feature, flag in _GUEST_TO_TUN:
        if features >> feature & 1:
            flags |= flag
    # the tap refuses segmentation without checksum offload
    return flags if flags & tun.TUN_F_CSUM else 0
