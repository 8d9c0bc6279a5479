"""Images vdm must refuse: each gives a DiskError that names the problem, and the file is untouched."""

from __future__ import annotations

import os
import struct

import pytest
from vdm_blk.backends import DiskError, RawDisk, open_disk

from .helpers import create_qcow2, file_bytes, qemu_img, qemu_io

MiB = 1 << 20


def _patch(path: str, offset: int, fmt: str, value: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(struct.pack(fmt, value))


def _refused(path: str, match: str, **kw) -> DiskError:
    before = file_bytes(path)
    with pytest.raises(DiskError, match=match) as info:
        open_disk(path, **kw)
    assert file_bytes(path) == before, "a refused image must not be modified"
    assert str(path) in str(info.value)
    return info.value


@pytest.fixture
def img(tmp_path):
    return create_qcow2(str(tmp_path / "t.qcow2"), 64 * MiB, "cluster_size=65536")


@pytest.mark.parametrize(
    "offset,fmt,value,match",
    [
        (0, ">I", 0x12345678, "bad magic"),
        (4, ">I", 4, "version 4 is not supported"),
        (4, ">I", 1, "version 1 is not supported"),
        (20, ">I", 8, "cluster_bits 8 is outside"),
        (20, ">I", 22, "cluster_bits 22 is outside"),
        (32, ">I", 1, "encryption"),
        (32, ">I", 2, "encryption"),
        (36, ">I", 0, "L1 table has 0 entries"),
        (40, ">Q", 0x10200, "L1 table offset"),
        (40, ">Q", 1 << 40, "L1 table .* past the end of the file"),
        (48, ">Q", 1 << 40, "refcount table .* past the end"),
        (72, ">Q", 1 << 0, "dirty.*qemu-img check -r all"),
        (72, ">Q", 1 << 1, "marked corrupt"),
        (72, ">Q", 1 << 2, "external data files"),
        (72, ">Q", 1 << 3, "compression type"),
        (72, ">Q", 1 << 4, "extended L2"),
        (72, ">Q", 1 << 9, "unknown incompatible features: bit 9"),
        (96, ">I", 7, "refcount_order 7"),
        (100, ">I", 100, "header_length"),
    ],
)
def test_bad_header_field_refused(img, offset, fmt, value, match):
    _patch(img, offset, fmt, value)
    _refused(img, match, format="qcow2")
    _refused(img, match, format="qcow2", read_only=True)


def test_auto_treats_a_file_without_the_magic_as_raw(img):
    _patch(img, 0, ">I", 0)
    disk = open_disk(img, read_only=True)
    assert isinstance(disk, RawDisk)
    disk.close()


def test_truncated_image_refused(img):
    qemu_io(img, "write 0 1M")
    l1_offset = struct.unpack(">Q", file_bytes(img)[40:48])[0]
    os.truncate(img, l1_offset + 8)
    _refused(img, "past the end of the file")


def test_header_cut_right_after_the_v3_fields_refused(img):
    """header_length says 112 but the file ends at byte 104 (a fuzzer found the IndexError this was)."""
    _patch(img, 100, ">I", 112)
    os.truncate(img, 104)
    _refused(img, "the header is truncated", format="qcow2")


def test_l2_table_past_the_end_refused(img):
    qemu_io(img, "write 0 64k")
    l1_offset = struct.unpack(">Q", file_bytes(img)[40:48])[0]
    _patch(img, l1_offset, ">Q", (1 << 63) | (1 << 40))
    _refused(img, "L1 entry 0")


def test_real_extended_l2_and_data_file_images_refused(tmp_path):
    ext = create_qcow2(str(tmp_path / "ext.qcow2"), MiB, "extended_l2=on")
    _refused(ext, "extended L2 entries")
    df = create_qcow2(str(tmp_path / "df.qcow2"), MiB, f"data_file={tmp_path / 'df.raw'}")
    _refused(df, "external data files")


def test_zstd_image_refused(tmp_path):
    p = qemu_img(
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "compression_type=zstd",
        str(tmp_path / "z.qcow2"),
        "1M",
        ok=False,
    )
    if p.returncode != 0:
        pytest.skip(f"this qemu-img has no zstd: {p.stderr.strip()}")
    _refused(str(tmp_path / "z.qcow2"), "compression type 1 is not supported")


def test_read_only_qcow2_rejects_writes_and_stays_unmodified(img):
    qemu_io(img, "write -P 0x10 0 128k")
    before = file_bytes(img)
    disk = open_disk(img, read_only=True)
    with pytest.raises(DiskError, match="read-only"):
        disk.writev(0, [memoryview(bytearray(512))])
    with pytest.raises(DiskError, match="read-only"):
        disk.discard(0, 65536)
    with pytest.raises(DiskError, match="read-only"):
        disk.write_zeroes(0, 65536, True)
    with pytest.raises(DiskError, match="past the end"):
        disk.readv(64 * MiB, [memoryview(bytearray(512))])
    disk.flush()
    disk.close()
    assert file_bytes(img) == before


# ---- backing files ---------------------------------------------------------------------------------


def test_backing_file_outside_the_directory_refused_unless_allowed(tmp_path):
    outside = tmp_path / "elsewhere"
    inside = tmp_path / "vm"
    outside.mkdir()
    inside.mkdir()
    base = str(outside / "base.raw")
    with open(base, "wb") as f:
        f.write(b"\x61" * MiB)
    img = create_qcow2(str(inside / "top.qcow2"), MiB, backing=base)
    err = _refused(img, "not beside the image.*allow_backing=")
    assert os.path.realpath(base) in str(err)
    disk = open_disk(img, allowed_backing=[base])
    out = bytearray(512)
    disk.readv(0, [memoryview(out)])
    assert out == b"\x61" * 512
    disk.close()
    # relative names that climb out are refused too, and so are symbolic links that point out
    rel = create_qcow2(str(inside / "rel.qcow2"), MiB, backing="../elsewhere/base.raw")
    _refused(rel, "not beside the image")
    os.symlink(base, inside / "link.raw")
    link = create_qcow2(str(inside / "link.qcow2"), MiB, backing="link.raw")
    _refused(link, "not beside the image")


def test_backing_file_below_the_directory_is_fine(tmp_path):
    (tmp_path / "bases").mkdir()
    with open(tmp_path / "bases" / "b.raw", "wb") as f:
        f.write(b"\x62" * MiB)
    img = create_qcow2(str(tmp_path / "top.qcow2"), MiB, backing="bases/b.raw")
    disk = open_disk(img)
    out = bytearray(512)
    disk.readv(MiB - 512, [memoryview(out)])
    assert out == b"\x62" * 512
    disk.close()


def test_backing_format_is_never_probed(tmp_path):
    # a raw backing file that happens to start with the qcow2 magic stays raw
    base = str(tmp_path / "base.raw")
    inner = create_qcow2(str(tmp_path / "inner.qcow2"), MiB)
    with open(base, "wb") as f:
        f.write(file_bytes(inner).ljust(MiB, b"\0"))
    img = create_qcow2(str(tmp_path / "top.qcow2"), MiB, backing="base.raw", backing_fmt="raw")
    disk = open_disk(img)
    out = bytearray(512)
    disk.readv(0, [memoryview(out)])
    assert out[:4] == b"QFI\xfb"
    disk.close()
    # an image without a recorded backing format is refused with the fix
    # turn the backing-format extension into an unknown one (what images from old tools look like)
    head = file_bytes(img)[:65536]
    pos = head.find(b"\xe2\x79\x2a\xca")
    assert pos > 0
    _patch(img, pos, ">I", 0x0BADF00D)
    _refused(img, "does not record the format of its backing file.*qemu-img rebase -u")


def test_missing_backing_file(tmp_path):
    base = str(tmp_path / "base.raw")
    with open(base, "wb") as f:
        f.truncate(MiB)
    img = create_qcow2(str(tmp_path / "top.qcow2"), MiB, backing="base.raw")
    os.unlink(base)
    _refused(img, "no such file")


def test_backing_loop_refused(tmp_path):
    a = create_qcow2(str(tmp_path / "a.qcow2"), MiB)
    b = create_qcow2(str(tmp_path / "b.qcow2"), MiB, backing="a.qcow2", backing_fmt="qcow2")
    qemu_img("rebase", "-u", "-b", "b.qcow2", "-F", "qcow2", a)  # a -> b -> a
    _refused(b, "loops back into its own backing chain", read_only=True)
    _refused(b, "loops back into its own backing chain")  # not "in use by another process"


def test_persistent_bitmaps_not_invalidated(img):
    qemu_img("bitmap", "--add", img, "backup0")
    _refused(img, "persistent dirty bitmaps.*qemu-img bitmap --remove")
    disk = open_disk(img, read_only=True)
    disk.close()
    qemu_img("bitmap", "--remove", img, "backup0")
    disk = open_disk(img)
    disk.writev(0, [memoryview(bytearray(4096))])
    disk.close()
