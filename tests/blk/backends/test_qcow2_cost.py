"""Metadata cost follows what changed (issue 20 item 9).

A normal qemu-img image with ``refcount_bits=1,cluster_size=2M`` has 2 MiB L2 tables and 2 MiB
refcount blocks of 16 Mi one-bit entries. vdm used to expand a refcount block into a list of
16 Mi ints (167 MiB) and re-encode and rewrite both whole tables on every flush (seconds of CPU
under the metadata lock). Counted here, not timed: the bytes each flush writes, and the memory
Python allocates for one allocating write.
"""

from __future__ import annotations

import tracemalloc

import pytest
from vdm_blk.backends import open_disk

from .helpers import check_image, create_qcow2, needs_qemu_img, qemu_io

MiB = 1 << 20
GiB = 1 << 30

pytestmark = needs_qemu_img


class _Counting:
    """Counts the bytes written to an image file (metadata and data alike)."""

    def __init__(self, f) -> None:
        self.calls = 0
        self.bytes = 0
        self._pwrite, self._pwritev = f.pwrite, f.pwritev
        f.pwrite, f.pwritev = self.pwrite, self.pwritev

    def pwrite(self, data, offset):
        self.calls += 1
        self.bytes += len(data)
        return self._pwrite(data, offset)

    def pwritev(self, views, offset):
        self.calls += 1
        self.bytes += sum(len(v) for v in views)
        return self._pwritev(views, offset)

    def reset(self) -> None:
        self.calls = self.bytes = 0


@pytest.mark.parametrize(
    "opts", ["refcount_bits=1,cluster_size=2M", "refcount_bits=16,cluster_size=2M", "cluster_size=65536"]
)
def test_a_flush_writes_only_the_metadata_that_changed(tmp_path, opts):
    img = create_qcow2(str(tmp_path / "img.qcow2"), 10 * GiB, *opts.split(","))
    disk = open_disk(img, format="qcow2")
    counter = _Counting(disk.f)
    buf = memoryview(bytearray(b"\x5a" * 4096))
    try:
        for i in range(4):
            disk.writev(i * GiB + 3 * 4096, [buf])  # a new data cluster, in a new L2 table
            counter.reset()
            disk.flush()
            # a refcount block piece, an L2 table piece, an L1 entry (a page each at most);
            # and a second refcount piece when the new L2 table lands elsewhere in the block
            assert counter.bytes <= 4 * 4096 + 8, (i, counter.calls, counter.bytes)
        counter.reset()
        disk.writev(3 * GiB + 5 * 4096, [buf])  # inside the last cluster: no metadata at all
        disk.flush()
        assert counter.bytes == 4096, counter.bytes
    finally:
        disk.close()
    check_image(img)
    for i in range(4):
        qemu_io(img, f"read -P 0x5a {i * GiB + 3 * 4096} 4096", f"read -P 0 {i * GiB} 4096")


def test_one_bit_refcounts_are_not_expanded_in_memory(tmp_path):
    img = create_qcow2(str(tmp_path / "img.qcow2"), 10 * GiB, "refcount_bits=1", "cluster_size=2M")
    tracemalloc.start()
    try:
        disk = open_disk(img, format="qcow2")
        try:
            disk.writev(0, [memoryview(bytearray(4096))[:512]])
            disk.writev(5 * GiB, [memoryview(bytearray(b"\x01" * 4096))])
            disk.flush()
        finally:
            disk.close()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # an L2 table and a refcount block are 2 MiB each; a few copies of them at most
    assert peak < 16 * MiB, f"peak {peak >> 20} MiB of Python allocations"
    check_image(img)
