"""The split virtqueue's memory layout (virtio 1.2, section 2.7), one declaration for all of vdm.

This module only *names* the layout: the byte format of a descriptor, its flags, and where each
field of the available and used rings sits relative to the ring's start, for a queue of ``size``
entries. Reading and writing the fields is left to the callers: the device side
(:mod:`vdm.virtqueue`) and the driver side (:mod:`vdm.testing`), the fuzz targets and tests.

All fields are little-endian (virtio 1.x, 2.7: "le16", "le32", "le64"). Offsets are in bytes
from the start of the area; "slot" arguments are ring positions already reduced modulo ``size``.

The three areas (2.7, "Virtqueue Part Sizes/Alignment")::

    descriptor table  size * 16 bytes, 16-aligned
        struct virtq_desc { le64 addr; le32 len; le16 flags; le16 next; }
    available ring    6 + 2 * size bytes, 2-aligned
        le16 flags; le16 idx; le16 ring[size]; le16 used_event  (used_event: only with EVENT_IDX)
    used ring         6 + 8 * size bytes, 4-aligned
        le16 flags; le16 idx; struct virtq_used_elem { le32 id; le32 len; } ring[size];
        le16 avail_event                                         (avail_event: only with EVENT_IDX)

Invariant: nothing here depends on negotiated features; the event fields are always laid out
(a driver without EVENT_IDX simply does not use them), as the spec's sizes include them.
"""

from __future__ import annotations

import struct

__all__ = [
    "AVAIL_ALIGN",
    "AVAIL_FLAGS",
    "AVAIL_IDX",
    "AVAIL_RING",
    "DESC",
    "DESC_ALIGN",
    "DESC_SIZE",
    "USED_ALIGN",
    "USED_ELEM",
    "USED_ELEM_SIZE",
    "USED_FLAGS",
    "USED_IDX",
    "USED_RING",
    "VIRTQ_AVAIL_F_NO_INTERRUPT",
    "VIRTQ_DESC_F_INDIRECT",
    "VIRTQ_DESC_F_NEXT",
    "VIRTQ_DESC_F_WRITE",
    "VIRTQ_USED_F_NO_NOTIFY",
    "avail_event_offset",
    "avail_ring_size",
    "avail_slot_offset",
    "desc_offset",
    "desc_table_size",
    "used_elem_offset",
    "used_event_offset",
    "used_ring_size",
]

# ---- descriptors (2.7.5) ---------------------------------------------------------------------

#: struct virtq_desc: addr (u64), len (u32), flags (u16), next (u16)
DESC = struct.Struct("<QIHH")
DESC_SIZE = DESC.size  # 16
#: alignment of the descriptor table (and of an indirect table: 2.7.5.3 asks for none, 16 is usual)
DESC_ALIGN = 16

#: the buffer continues via the ``next`` field
VIRTQ_DESC_F_NEXT = 1
#: the buffer is device-writable (otherwise device-readable)
VIRTQ_DESC_F_WRITE = 2
#: the buffer holds a table of descriptors (2.7.5.3, VIRTIO_F_INDIRECT_DESC)
VIRTQ_DESC_F_INDIRECT = 4

# ---- available ring (2.7.6), written by the driver ---------------------------------------------

#: the driver does not want an interrupt (ignored by the device with EVENT_IDX)
VIRTQ_AVAIL_F_NO_INTERRUPT = 1
AVAIL_FLAGS = 0
AVAIL_IDX = 2
AVAIL_RING = 4
AVAIL_ALIGN = 2

# ---- used ring (2.7.8), written by the device -------------------------------------------------

#: the device does not want kicks (ignored by the driver with EVENT_IDX)
VIRTQ_USED_F_NO_NOTIFY = 1
#: struct virtq_used_elem: id (u32, the chain's head), len (u32, bytes written)
USED_ELEM = struct.Struct("<II")
USED_ELEM_SIZE = USED_ELEM.size  # 8
USED_FLAGS = 0
USED_IDX = 2
USED_RING = 4
USED_ALIGN = 4


def desc_offset(index: int) -> int:
    """Byte offset of descriptor ``index`` in a descriptor (or indirect) table."""
    return DESC_SIZE * index


def desc_table_size(size: int) -> int:
    """Bytes of the descriptor table of a queue of ``size`` entries."""
    return DESC_SIZE * size


def avail_slot_offset(slot: int) -> int:
    """Byte offset of ``ring[slot]`` in the available ring."""
    return AVAIL_RING + 2 * slot


def used_event_offset(size: int) -> int:
    """Byte offset of ``used_event`` (after the ring's ``size`` entries) in the available ring."""
    return AVAIL_RING + 2 * size


def avail_ring_size(size: int) -> int:
    """Bytes of the available ring, ``used_event`` included."""
    return AVAIL_RING + 2 * size + 2


def used_elem_offset(slot: int) -> int:
    """Byte offset of ``ring[slot]`` (a :data:`USED_ELEM`) in the used ring."""
    return USED_RING + USED_ELEM_SIZE * slot


def avail_event_offset(size: int) -> int:
    """Byte offset of ``avail_event`` (after the ring's ``size`` elements) in the used ring."""
    return USED_RING + USED_ELEM_SIZE * size


def used_ring_size(size: int) -> int:
    """Bytes of the used ring, ``avail_event`` included."""
    return USED_RING + USED_ELEM_SIZE * size + 2
