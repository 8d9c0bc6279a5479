"""Transport feature bits a frontend may ack without the backend offering them (issue 16 item 5).

A vhost-user frontend owns the transport (virtio-pci in QEMU) and builds the feature set it offers
the guest from its own device model, masked only by the bits it knows the backend must support.
QEMU 7.2 does not mask VIRTIO_F_RING_RESET (bit 40) for vhost-user-blk, -input, ...: the guest
acks it, QEMU sends it in SET_FEATURES, and a backend that refuses every bit it did not offer
leaves the guest's device dead. The spec's transport range (bits 24 to 41; virtio 1.3 section 6)
is therefore judged bit by bit:

* **accepted** (logged once per connection): bits that change nothing the backend does --
  ANY_LAYOUT (27; virtio 1.x drivers lay out buffers freely anyway, vdm's devices parse any
  layout), ORDER_PLATFORM (36; a memory-ordering promise for hardware, vdm is software and uses
  full barriers), SR_IOV (37; PCI, the frontend's), NOTIFICATION_DATA (38) and NOTIF_CONFIG_DATA
  (39; what the driver writes to the notify register, which the frontend turns into a kick
  eventfd), RING_RESET (40; a queue reset reaches the backend as the usual GET_VRING_BASE and
  SET_VRING_* messages, which vdm serves per ring).
* **refused**, closing the connection with one line naming the bit and the QEMU property that
  turns it off: bits that change the ring format or promises the device must keep --
  NOTIFY_ON_EMPTY (24), INDIRECT_DESC (28) and EVENT_IDX (29) when the device did not offer them,
  ACCESS_PLATFORM (33; addresses would be IOVAs, and vdm has no IOTLB), RING_PACKED (34),
  IN_ORDER (35; vdm's devices complete out of order), ADMIN_VQ (41), and any other bit.

VHOST_F_LOG_ALL (26) is the vhost protocol's own (migration logging, :mod:`.dirtylog`) and
VHOST_USER_F_PROTOCOL_FEATURES (30) is the protocol-feature handshake; both are taken out before
the rest is judged.
"""

from __future__ import annotations

from .protocol import F_LOG_ALL, F_PROTOCOL_FEATURES, ProtocolError

__all__ = ["ACCEPTED", "REFUSED", "Acked", "split_features"]

#: bit -> name, for transport bits accepted without being offered
ACCEPTED: dict[int, str] = {
    27: "VIRTIO_F_ANY_LAYOUT",
    36: "VIRTIO_F_ORDER_PLATFORM",
    37: "VIRTIO_F_SR_IOV",
    38: "VIRTIO_F_NOTIFICATION_DATA",
    39: "VIRTIO_F_NOTIF_CONFIG_DATA",
    40: "VIRTIO_F_RING_RESET",
}

#: bit -> (name, the QEMU device property that turns it off), for bits refused unless offered
REFUSED: dict[int, tuple[str, str]] = {
    24: ("VIRTIO_F_NOTIFY_ON_EMPTY", "notify_on_empty=off"),
    28: ("VIRTIO_RING_F_INDIRECT_DESC", "indirect_desc=off"),
    29: ("VIRTIO_RING_F_EVENT_IDX", "event_idx=off"),
    33: ("VIRTIO_F_ACCESS_PLATFORM", "iommu_platform=off"),
    34: ("VIRTIO_F_RING_PACKED", "packed=off"),
    35: ("VIRTIO_F_IN_ORDER", "in_order=off"),
    41: ("VIRTIO_F_ADMIN_VQ", "no property: use a QEMU without it"),
}


class Acked:
    """SET_FEATURES split up: what goes to the device, what the transport took, and logging."""

    __slots__ = ("device", "log_all", "protocol", "transport")

    def __init__(self, device: int, transport: int, log_all: bool, protocol: bool) -> None:
        #: bits the device offered: handed to its set_driver_features
        self.device = device
        #: transport bits accepted without being offered (module doc)
        self.transport = transport
        #: VHOST_F_LOG_ALL: the frontend is migrating and wants writes logged
        self.log_all = log_all
        #: VHOST_USER_F_PROTOCOL_FEATURES
        self.protocol = protocol

    def names(self) -> str:
        return ", ".join(f"{ACCEPTED[b]} (bit {b})" for b in sorted(ACCEPTED) if self.transport >> b & 1)


def split_features(value: int, offered: int, log_offered: bool) -> Acked:
    """Judge the features of a SET_FEATURES against those ``offered`` (the device's, as offered).

    Raises ProtocolError naming the first bit that cannot be accepted and how to turn it off.
    """
    log_all = bool(value >> F_LOG_ALL & 1)
    if log_all and not log_offered:
        raise ProtocolError(f"SET_FEATURES: VHOST_F_LOG_ALL (bit {F_LOG_ALL}) was not offered")
    protocol = bool(value >> F_PROTOCOL_FEATURES & 1)
    virtio = value & ~(1 << F_PROTOCOL_FEATURES | 1 << F_LOG_ALL)
    device = virtio & offered
    transport = 0
    for bit in range(64):
        if not (virtio & ~offered) >> bit & 1:
            continue
        if bit in ACCEPTED:
            transport |= 1 << bit
            continue
        name, prop = REFUSED.get(bit, (f"feature bit {bit}", ""))
        how = (
            f"; turn it off on the QEMU device with {prop}"
            if prop and not prop.startswith("no property")
            else ""
        )
        kind = "transport feature" if 24 <= bit <= 41 else "device feature"
        raise ProtocolError(
            f"SET_FEATURES: the frontend acked {name} (bit {bit}), a {kind} vdm did not offer "
            f"and cannot serve{how}"
        )
    return Acked(device, transport, log_all, protocol)
