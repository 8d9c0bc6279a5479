"""The raw backend on a regular file: I/O, flush, discard, write zeroes, read-only, ranges, O_DIRECT."""

from __future__ import annotations

import mmap
import os
import threading

import pytest
from vdm_blk.backends import DiskError, RawDisk, open_disk
from vdm_blk.backends.linux import BLKDISCARD, BLKGETSIZE64, BLKPBSZGET, BLKSSZGET, BLKZEROOUT

from .helpers import file_bytes, make_raw, pattern

SIZE = 4 << 20


@pytest.fixture
def raw(tmp_path):
    path = make_raw(str(tmp_path / "disk.raw"), SIZE)
    disk = open_disk(path)
    yield path, disk
    disk.close()


def test_ioctl_numbers_match_the_kernel_abi():
    # x86_64/arm64 values of include/uapi/linux/fs.h, as strace prints them
    assert BLKGETSIZE64 == 0x80081272
    assert (BLKSSZGET, BLKPBSZGET, BLKDISCARD, BLKZEROOUT) == (0x1268, 0x127B, 0x1277, 0x127F)


def test_attributes_of_a_file(raw):
    _, disk = raw
    assert isinstance(disk, RawDisk)
    assert disk.size == SIZE and not disk.read_only
    assert disk.logical_block_size == 512 and disk.physical_block_size in (512, 4096)
    assert disk.supports_discard and disk.supports_write_zeroes


def test_write_then_read_back_through_scattered_buffers(raw):
    path, disk = raw
    data = pattern(3 * 4096, 7)
    views = [memoryview(data)[:512], memoryview(data)[512:4096], memoryview(data)[4096:]]
    assert disk.writev(8192, views) == len(data)
    out = [memoryview(bytearray(1024)), memoryview(bytearray(len(data) - 1024))]
    assert disk.readv(8192, out) == len(data)
    assert bytes(out[0]) + bytes(out[1]) == data
    disk.flush()
    assert file_bytes(path)[8192 : 8192 + len(data)] == data


def test_discard_and_write_zeroes_read_zeros(raw):
    path, disk = raw
    disk.writev(0, [memoryview(pattern(SIZE, 3))])
    disk.discard(4096, 8192)
    disk.write_zeroes(65536, 512, unmap=False)
    disk.write_zeroes(1 << 20, 1 << 20, unmap=True)
    disk.flush()
    content = file_bytes(path)
    expect = bytearray(pattern(SIZE, 3))
    for off, n in ((4096, 8192), (65536, 512), (1 << 20, 1 << 20)):
        expect[off : off + n] = bytes(n)
    assert content == expect
    assert os.stat(path).st_size == SIZE  # KEEP_SIZE


def test_read_only_rejects_every_kind_of_write(tmp_path):
    path = make_raw(str(tmp_path / "ro.raw"), SIZE)
    before = file_bytes(path)
    disk = open_disk(path, read_only=True)
    assert disk.read_only
    buf = memoryview(bytearray(512))
    for call in (
        lambda: disk.writev(0, [buf]),
        lambda: disk.discard(0, 512),
        lambda: disk.write_zeroes(0, 512, False),
    ):
        with pytest.raises(DiskError, match="read-only"):
            call()
    disk.readv(0, [buf])
    disk.flush()
    disk.close()
    assert file_bytes(path) == before


@pytest.mark.parametrize(
    "offset,length",
    [(SIZE, 512), (SIZE - 512, 1024), (-512, 512), (100, 512), (0, 100), (1 << 62, 512)],
)
def test_out_of_range_and_unaligned_requests_raise(raw, offset, length):
    path, disk = raw
    buf = memoryview(bytearray(length))
    with pytest.raises(DiskError):
        disk.readv(offset, [buf])
    with pytest.raises(DiskError):
        disk.writev(offset, [buf])
    with pytest.raises(DiskError):
        disk.discard(offset, length)
    with pytest.raises(DiskError):
        disk.write_zeroes(offset, length, True)
    assert os.stat(path).st_size == SIZE


def test_missing_file_and_directory_are_refused_clearly(tmp_path):
    with pytest.raises(DiskError, match="no such file"):
        open_disk(str(tmp_path / "nope.img"))
    with pytest.raises(DiskError, match="not a regular file or a block device"):
        open_disk(str(tmp_path), format="raw")
    with pytest.raises(DiskError, match="unknown format"):
        open_disk(str(tmp_path / "x"), format="vmdk")


def test_closed_disk_raises(raw):
    _, disk = raw
    disk.close()
    with pytest.raises(DiskError, match="closed"):
        disk.readv(0, [memoryview(bytearray(512))])


def _aligned(n: int) -> mmap.mmap:
    return mmap.mmap(-1, n)  # page aligned


@pytest.mark.parametrize("aligned", [True, False])
def test_o_direct_with_aligned_and_unaligned_buffers(tmp_path, aligned):
    path = make_raw(str(tmp_path / "direct.raw"), SIZE)
    try:
        disk = open_disk(path, direct=True)
    except DiskError as e:
        pytest.skip(f"O_DIRECT unsupported on {tmp_path}: {e}")
    assert disk.file.dfd is not None
    data = pattern(3 * 4096, 11)
    if aligned:
        src = _aligned(len(data))
        src[:] = data
        views = [memoryview(src)[:4096], memoryview(src)[4096:]]
        dst = _aligned(len(data))
        out = [memoryview(dst)]
    else:
        # odd addresses and a 512-byte split that is not page-aligned in memory
        src = bytearray(len(data) + 1)
        src[1:] = data
        views = [memoryview(src)[1:513], memoryview(src)[513:]]
        dst = bytearray(len(data) + 3)
        out = [memoryview(dst)[3:]]
    assert disk.writev(4096, views) == len(data)
    assert disk.readv(4096, out) == len(data)
    assert bytes(out[0]) == data
    disk.flush()
    disk.close()
    assert file_bytes(path)[4096 : 4096 + len(data)] == data


def test_writethrough_and_concurrent_writers(tmp_path):
    path = make_raw(str(tmp_path / "wt.raw"), SIZE)
    disk = open_disk(path, writethrough=True)
    chunks = [pattern(65536, i) for i in range(16)]

    def worker(i):
        disk.writev(i * 65536, [memoryview(chunks[i])])

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    disk.close()
    assert file_bytes(path)[: 16 * 65536] == b"".join(chunks)


def test_block_device_when_available():
    """A loop device exercises BLKGETSIZE64/BLKSSZGET/BLKPBSZGET (root and a free loop device needed)."""
    import subprocess

    if os.geteuid() != 0 or not os.path.exists("/dev/loop-control"):
        pytest.skip("needs root and loop devices")
    import tempfile

    with tempfile.NamedTemporaryFile(dir="/var/tmp") as f:
        f.truncate(SIZE)
        p = subprocess.run(["losetup", "-f", "--show", f.name], capture_output=True, text=True)
        if p.returncode != 0:
            pytest.skip(f"losetup failed: {p.stderr.strip()}")
        dev = p.stdout.strip()
        try:
            disk = open_disk(dev)
            assert disk.size == SIZE and disk.logical_block_size == 512
            disk.writev(0, [memoryview(pattern(4096, 5))])
            disk.write_zeroes(0, 512, False)
            disk.discard(1 << 20, 1 << 20)
            out = bytearray(4096)
            disk.readv(0, [memoryview(out)])
            assert out == bytes(512) + pattern(4096, 5)[512:]
            disk.close()
            direct = open_disk(dev, direct=True)
            odd = bytearray(4096 + 1)
            odd[1:] = pattern(4096, 6)
            direct.writev(8192, [memoryview(odd)[1:]])  # misaligned buffer: bounced
            back = _aligned(4096)
            direct.readv(8192, [memoryview(back)])  # aligned: straight
            assert back[:] == pattern(4096, 6)
            direct.close()
        finally:
            subprocess.run(["losetup", "-d", dev])


def test_o_direct_from_read_only_buffers(tmp_path):
    """Guest memory mapped read-only for a write: its address cannot be checked, the kernel decides."""
    path = make_raw(str(tmp_path / "ro-src.raw"), SIZE)
    try:
        disk = open_disk(path, direct=True)
    except DiskError as e:
        pytest.skip(f"O_DIRECT unsupported on {tmp_path}: {e}")
    page = _aligned(8192)
    page[:] = pattern(8192, 21)
    aligned_ro = memoryview(page).toreadonly()
    odd = memoryview(bytes(1) + bytes(pattern(4096, 22)))[1:]  # read-only and misaligned
    assert disk.writev(0, [aligned_ro]) == 8192
    assert disk.writev(8192, [odd]) == 4096
    out = bytearray(12288)
    disk.readv(0, [memoryview(out)])
    assert out == pattern(8192, 21) + pattern(4096, 22)
    disk.close()
