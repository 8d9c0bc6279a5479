"""The ring layout names match virtio 1.2 section 2.7's sizes and offsets for real queue sizes."""

from __future__ import annotations

import pytest
from vdm import ring_layout as rl


@pytest.mark.parametrize("size", [1, 2, 256, 32768])
def test_part_sizes_match_the_spec_table(size: int) -> None:
    # 2.7 "Virtqueue Part Sizes/Alignment": 16*(Queue Size), 6 + 2*(Queue Size), 6 + 8*(Queue Size)
    assert rl.desc_table_size(size) == 16 * size
    assert rl.avail_ring_size(size) == 6 + 2 * size
    assert rl.used_ring_size(size) == 6 + 8 * size
    # the event fields are the last two bytes of their rings
    assert rl.used_event_offset(size) == rl.avail_ring_size(size) - 2
    assert rl.avail_event_offset(size) == rl.used_ring_size(size) - 2


def test_descriptor_and_used_element_bytes() -> None:
    raw = rl.DESC.pack(0x1122334455667788, 0x99AABBCC, rl.VIRTQ_DESC_F_NEXT | rl.VIRTQ_DESC_F_WRITE, 7)
    assert raw == bytes.fromhex("8877665544332211ccbbaa9903000700")
    assert rl.USED_ELEM.pack(5, 512) == bytes.fromhex("0500000000020000")
    assert rl.used_elem_offset(3) == 4 + 24 and rl.avail_slot_offset(3) == 4 + 6
    assert rl.VIRTQ_DESC_F_INDIRECT == 4


def test_virtqueue_names_are_the_layout_module_names() -> None:
    from vdm import virtqueue

    for name in (
        "VIRTQ_DESC_F_NEXT",
        "VIRTQ_DESC_F_WRITE",
        "VIRTQ_DESC_F_INDIRECT",
        "VIRTQ_USED_F_NO_NOTIFY",
        "VIRTQ_AVAIL_F_NO_INTERRUPT",
    ):
        assert getattr(virtqueue, name) == getattr(rl, name)
