"""Images ``qemu-img check`` calls corrupt: refused read-write before vdm writes anything.

Each image is made by qemu-img (with data in it), then one piece of metadata is damaged the way
issue 20 item 8 found vdm writing into its own metadata. vdm must refuse to open it read-write
with one message that names the problem and ``qemu-img check -r all``; the file must be byte for
byte what it was, and ``qemu-img check`` must report exactly what it reported before vdm saw it.
Where the image is usable read-only, reads of its intact parts work.
"""

from __future__ import annotations

import json
import struct

import pytest
from vdm_blk.backends import DiskError, open_disk

from .helpers import create_qcow2, file_bytes, needs_qemu_img, qemu_img, qemu_io

MiB = 1 << 20
CS = 65536
COPIED = 1 << 63

pytestmark = needs_qemu_img


def _u64(path: str, off: int) -> int:
    with open(path, "rb") as f:
        f.seek(off)
        return struct.unpack(">Q", f.read(8))[0]


def _put(path: str, off: int, fmt: str, value: int) -> None:
    with open(path, "r+b") as f:
        f.seek(off)
        f.write(struct.pack(fmt, value))


def _layout(path: str) -> dict:
    l1 = _u64(path, 40)
    rt = _u64(path, 48)
    return {"l1": l1, "rt": rt, "rb": _u64(path, rt), "l2": _u64(path, l1) & 0x00FFFFFFFFFFFE00}


def _check_report(path: str) -> dict:
    p = qemu_img("check", "--output=json", path, ok=False)
    try:
        report = json.loads(p.stdout)
    except ValueError:
        report = {}
    return {"rc": p.returncode, "corruptions": report.get("corruptions"), "stderr": p.stderr.strip()}


@pytest.fixture
def img(tmp_path):
    path = create_qcow2(str(tmp_path / "img.qcow2"), 16 * MiB, f"cluster_size={CS}")
    qemu_io(path, "write -P 0x11 0 1M", "write -P 0x22 8M 64k")
    return path


def _damage_zero_refblock(path: str) -> None:
    lay = _layout(path)
    with open(path, "r+b") as f:
        f.seek(lay["rb"])
        f.write(bytes(CS))


def _damage_l1_on_reftable(path: str) -> None:
    _put(path, 40, ">Q", _layout(path)["rt"])


def _damage_l1_entry_into_reftable(path: str) -> None:
    lay = _layout(path)
    _put(path, lay["l1"], ">Q", lay["rt"] | COPIED)


def _damage_l2_entry_past_eof(path: str) -> None:
    lay = _layout(path)
    _put(path, lay["l2"] + 8 * 4, ">Q", (1 << 40) | COPIED)  # guest cluster 4 (inside the first 1M)


def _damage_data_on_l2_table(path: str) -> None:
    lay = _layout(path)
    _put(path, lay["l2"] + 8 * 5, ">Q", lay["l2"] | COPIED)  # guest cluster 5 is the L2 table itself


def _damage_data_on_refblock_counted_twice(path: str) -> None:
    """Guest cluster 6 maps onto the refcount block, whose refcount says 2: the counts add up,
    but one cluster is both a refcount block and data."""
    lay = _layout(path)
    _put(path, lay["l2"] + 8 * 6, ">Q", lay["rb"] | COPIED)
    _put(path, lay["rb"] + 2 * (lay["rb"] // CS), ">H", 2)


def _damage_too_many_snapshots(path: str) -> None:
    size = len(file_bytes(path))
    with open(path, "r+b") as f:
        f.truncate(size + CS)
    _put(path, 64, ">Q", size)  # snapshots_offset: a cluster of zeros at the end
    _put(path, 60, ">I", 65537)  # nb_snapshots: more than QEMU's 65536


CASES = {
    "zero-refcount-block": (_damage_zero_refblock, "refcount", False),
    "l1-on-refcount-table": (_damage_l1_on_reftable, "refcount table", False),
    "l1-entry-into-refcount-table": (_damage_l1_entry_into_reftable, "refcount table", False),
    "l2-entry-1tib-past-eof": (_damage_l2_entry_past_eof, "past the end of the file", True),
    "data-on-l2-table": (_damage_data_on_l2_table, "L2 table", True),
    "data-on-refcount-block": (_damage_data_on_refblock_counted_twice, "refcount block", True),
    "too-many-snapshots": (_damage_too_many_snapshots, "snapshot", False),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_corrupt_image_refused_read_write_and_left_untouched(img, case):
    damage, match, _ = CASES[case]
    damage(img)
    before = _check_report(img)
    assert before["rc"] != 0, f"qemu-img check does not call the damaged image corrupt: {before}"
    content = file_bytes(img)
    with pytest.raises(DiskError) as info:
        disk = open_disk(img, format="qcow2")
        try:  # today's code opens it: show what a guest's writes then do
            buf = memoryview(bytearray(b"\x5a" * CS))
            for off in range(0, 16 * MiB, CS):
                disk.writev(off, [buf])
            disk.flush()
        finally:
            disk.close()
    msg = str(info.value)
    assert img in msg and match in msg, msg
    hint = "qemu-img cannot open it either" if case == "too-many-snapshots" else "qemu-img check -r all"
    assert hint in msg, msg
    assert "\n" not in msg, msg
    assert file_bytes(img) == content, "vdm wrote into an image it refused"
    assert _check_report(img) == before


@pytest.mark.parametrize("case", sorted(c for c, (_, _, ro) in CASES.items() if ro))
def test_corrupt_image_still_reads_read_only(img, case):
    """Damage confined to one L2 entry leaves the rest of the image readable (read-only)."""
    CASES[case][0](img)
    content = file_bytes(img)
    disk = open_disk(img, format="qcow2", read_only=True)
    try:
        buf = bytearray(CS)
        disk.readv(0, [memoryview(buf)])
        assert buf == b"\x11" * CS
        disk.readv(8 * MiB, [memoryview(buf)])
        assert buf == b"\x22" * CS
    finally:
        disk.close()
    assert file_bytes(img) == content


def test_honest_images_with_snapshots_and_compressed_clusters_open_read_write(tmp_path):
    """The check accepts what qemu-img makes: internal snapshots (shared L2 tables and data) and
    compressed clusters; vdm then writes and qemu-img check stays clean."""
    from .helpers import check_image

    src = create_qcow2(str(tmp_path / "src.qcow2"), 8 * MiB, "cluster_size=4096")
    qemu_io(src, "write -P 0x33 0 3M")
    comp = str(tmp_path / "comp.qcow2")
    qemu_img("convert", "-c", "-O", "qcow2", "-o", "cluster_size=4096", src, comp)
    qemu_img("snapshot", "-c", "one", comp)
    qemu_io(comp, "write -P 0x44 1M 64k")
    qemu_img("snapshot", "-c", "two", comp)
    check_image(comp)
    disk = open_disk(comp, format="qcow2")
    try:
        disk.writev(0, [memoryview(bytearray(b"\x55" * 8192))])
        disk.writev(2 * MiB, [memoryview(bytearray(b"\x66" * 512))])
        disk.flush()
    finally:
        disk.close()
    check_image(comp, allow_leaks=True)
    out = qemu_io(comp, "read -P 0x55 0 8k", "read -P 0x44 1M 64k", f"read -P 0x33 {3 * MiB - 512} 512")
    assert "verification failed" not in out.lower(), out


def test_no_data_cluster_is_allocated_on_an_l2_table_even_if_its_refcount_drops(img):
    """Defence in depth: the allocation guard knows every metadata cluster, not only the header,
    the L1 table and the refcount table. A refcount that drops to 0 in memory under an L2 table
    (a bug, not an image) makes the allocator offer that cluster; the guard refuses it."""
    lay = _layout(img)
    disk = open_disk(img, format="qcow2")
    try:
        block, j = disk.refs._block_for(lay["l2"] // CS)
        block.entries[j] = 0  # what a refcount bug would do; nothing of it reaches the disk
        disk.refs.free_hint = 0
        with pytest.raises(DiskError, match="maps onto metadata"):
            disk.writev(12 * MiB, [memoryview(bytearray(b"\x77" * CS))])
        buf = bytearray(CS)
        disk.readv(0, [memoryview(buf)])
        assert buf == b"\x11" * CS, "the L2 table was overwritten"
    finally:
        disk.refs.cache.tables.clear()  # drop the falsified block unwritten
        disk.close()
