"""virtio-net feature bits and the dependencies between them (virtio 1.2, 5.1.3 and 5.1.3.1).

The device offers a set that is closed under the dependencies (:func:`close_offer`: a feature
whose prerequisite is not offered is withdrawn), and refuses a driver selection that breaks them
(:func:`dependency_violation`).
"""

from __future__ import annotations

from typing import Mapping

__all__ = [
    "DEPENDENCIES",
    "F_CSUM",
    "F_CTRL_GUEST_OFFLOADS",
    "F_CTRL_MAC_ADDR",
    "F_CTRL_RX",
    "F_CTRL_RX_EXTRA",
    "F_CTRL_VLAN",
    "F_CTRL_VQ",
    "F_GUEST_ANNOUNCE",
    "F_GUEST_CSUM",
    "F_GUEST_ECN",
    "F_GUEST_TSO4",
    "F_GUEST_TSO6",
    "F_GUEST_UFO",
    "F_GUEST_USO4",
    "F_GUEST_USO6",
    "F_HOST_ECN",
    "F_HOST_TSO4",
    "F_HOST_TSO6",
    "F_HOST_UFO",
    "F_HOST_USO",
    "F_MAC",
    "F_MQ",
    "F_MRG_RXBUF",
    "F_MTU",
    "F_STATUS",
    "GUEST_OFFLOAD_BITS",
    "GUEST_OFFLOAD_MASK",
    "bit",
    "close_offer",
    "dependency_violation",
    "feature_names",
]

F_CSUM = 0
F_GUEST_CSUM = 1
F_CTRL_GUEST_OFFLOADS = 2
F_MTU = 3
F_MAC = 5
F_GUEST_TSO4 = 7
F_GUEST_TSO6 = 8
F_GUEST_ECN = 9
F_GUEST_UFO = 10
F_HOST_TSO4 = 11
F_HOST_TSO6 = 12
F_HOST_ECN = 13
F_HOST_UFO = 14
F_MRG_RXBUF = 15
F_STATUS = 16
F_CTRL_VQ = 17
F_CTRL_RX = 18
F_CTRL_VLAN = 19
F_CTRL_RX_EXTRA = 20
F_GUEST_ANNOUNCE = 21
F_MQ = 22
F_CTRL_MAC_ADDR = 23
F_GUEST_USO4 = 54
F_GUEST_USO6 = 55
F_HOST_USO = 56

_NAMES = {v: k[2:] for k, v in globals().items() if k.startswith("F_") and isinstance(v, int)}

#: feature -> the features of which at least one must be present too (virtio 1.2, 5.1.3.1)
DEPENDENCIES: Mapping[int, tuple[int, ...]] = {
    F_GUEST_TSO4: (F_GUEST_CSUM,),
    F_GUEST_TSO6: (F_GUEST_CSUM,),
    F_GUEST_ECN: (F_GUEST_TSO4, F_GUEST_TSO6),
    F_GUEST_UFO: (F_GUEST_CSUM,),
    F_GUEST_USO4: (F_GUEST_CSUM,),
    F_GUEST_USO6: (F_GUEST_CSUM,),
    F_HOST_TSO4: (F_CSUM,),
    F_HOST_TSO6: (F_CSUM,),
    F_HOST_ECN: (F_HOST_TSO4, F_HOST_TSO6),
    F_HOST_UFO: (F_CSUM,),
    F_HOST_USO: (F_CSUM,),
    F_CTRL_RX: (F_CTRL_VQ,),
    F_CTRL_VLAN: (F_CTRL_VQ,),
    F_GUEST_ANNOUNCE: (F_CTRL_VQ,),
    F_MQ: (F_CTRL_VQ,),
    F_CTRL_MAC_ADDR: (F_CTRL_VQ,),
    # "SHOULD NOT offer CTRL_RX_EXTRA without CTRL_VQ" (5.1.4.1); it extends the rx-mode class
    F_CTRL_RX_EXTRA: (F_CTRL_VQ,),
    # the GUEST_OFFLOADS command travels on the control queue
    F_CTRL_GUEST_OFFLOADS: (F_CTRL_VQ,),
}

#: the receive offloads VIRTIO_NET_CTRL_GUEST_OFFLOADS_SET may switch on and off
GUEST_OFFLOAD_BITS = (F_GUEST_CSUM, F_GUEST_TSO4, F_GUEST_TSO6, F_GUEST_ECN, F_GUEST_UFO,
                      F_GUEST_USO4, F_GUEST_USO6)
#: the receive offloads as one mask (GUEST_OFFLOADS_SET may change only these)
GUEST_OFFLOAD_MASK = sum(1 << b for b in GUEST_OFFLOAD_BITS)


def bit(n: int) -> int:
    """The mask of feature bit ``n``."""
    return 1 << n


def _missing(features: int, feature: int) -> bool:
    needs = DEPENDENCIES.get(feature)
    return bool(needs) and not any(features >> n & 1 for n in needs)


def close_offer(features: int) -> int:
    """``features`` without every feature whose prerequisites are absent (repeated to a fixpoint)."""
    while True:
        drop = 0
        for feature in DEPENDENCIES:
            if features >> feature & 1 and _missing(features, feature):
                drop |= bit(feature)
        if not drop:
            return features
        features &= ~drop


def dependency_violation(features: int) -> str | None:
    """Why ``features`` breaks a dependency of 5.1.3.1, or None if it keeps them all."""
    for feature in sorted(DEPENDENCIES):
        if features >> feature & 1 and _missing(features, feature):
            needs = " or ".join(_NAMES[n] for n in DEPENDENCIES[feature])
            return f"{_NAMES[feature]} requires {needs}"
    return None


def feature_names(features: int) -> list[str]:
    """The names of the virtio-net feature bits set in ``features`` (for logs and errors)."""
    return [_NAMES.get(n, f"bit{n}") for n in range(64) if features >> n & 1]
