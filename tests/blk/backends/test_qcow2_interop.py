"""qcow2 round trips against QEMU: images made by qemu-img, written by vdm, checked by qemu-img.

Every test that writes ends with ``qemu-img check`` (no corruption, no leaks) and, where a raw
mirror was written with the same data, ``qemu-img compare`` (identical).
"""

from __future__ import annotations

import os

import pytest
from vdm_blk.backends import DiskError, Qcow2Disk, open_disk

from .helpers import (
    assert_same,
    check_image,
    create_qcow2,
    file_bytes,
    loop_device,
    make_raw,
    pattern,
    qemu_img,
    qemu_io,
)

MiB = 1 << 20


class Pair:
    """A qcow2 image opened by vdm and a raw file that gets the same writes."""

    def __init__(self, qcow2_path: str, raw_path: str, **kw) -> None:
        self.qpath, self.rpath = qcow2_path, raw_path
        self.q = open_disk(qcow2_path, **kw)
        self.r = open_disk(raw_path, format="raw")

    def write(self, off: int, data: bytes | bytearray, split: int = 0) -> None:
        v = memoryview(bytearray(data))
        views = [v[:split], v[split:]] if split else [v]
        assert self.q.writev(off, views) == len(data)
        self.r.writev(off, [memoryview(bytearray(data))])

    def zero(self, off: int, n: int, unmap: bool) -> None:
        self.q.write_zeroes(off, n, unmap)
        self.r.write_zeroes(off, n, unmap)

    def discard(self, off: int, n: int) -> None:
        self.q.discard(off, n)
        self.r.write_zeroes(off, n, True)

    def read_equal(self, off: int, n: int) -> None:
        a, b = bytearray(n), bytearray(n)
        self.q.readv(off, [memoryview(a)])
        self.r.readv(off, [memoryview(b)])
        assert a == b, f"differs in {off}+{n}"

    def close_and_check(self) -> None:
        self.q.close()
        self.r.close()
        check_image(self.qpath)
        assert_same(self.qpath, self.rpath)


def _backing_raw(path: str, size: int) -> str:
    with open(path, "wb") as f:
        f.write(pattern(size, 99))
    return path


@pytest.mark.parametrize("compat", ["1.1", "0.10"])
@pytest.mark.parametrize("cluster_size", [512, 4096, 65536, 2 * MiB])
@pytest.mark.parametrize("with_backing", [False, True])
def test_round_trip(tmp_path, compat, cluster_size, with_backing):
    size = max(8 * MiB, 8 * cluster_size)
    raw = str(tmp_path / "mirror.raw")
    backing = None
    if with_backing:
        backing = _backing_raw(str(tmp_path / "base.raw"), size)
        with open(raw, "wb") as f:
            f.write(file_bytes(backing))
    else:
        make_raw(raw, size)
    img = create_qcow2(
        str(tmp_path / "t.qcow2"),
        size,
        f"compat={compat}",
        f"cluster_size={cluster_size}",
        backing=os.path.basename(backing) if backing else None,
    )
    p = Pair(img, raw)
    assert isinstance(p.q, Qcow2Disk) and p.q.size == size and p.q.version == (3 if compat == "1.1" else 2)
    # partial clusters, whole clusters, runs across cluster and L2 boundaries, a split buffer
    p.write(0, pattern(512, 1))
    p.write(3 * 512, pattern(1024, 2), split=512)
    p.write(cluster_size, pattern(cluster_size, 3))
    p.write(5 * cluster_size - 512, pattern(2 * cluster_size + 1024, 4), split=1024)
    p.write(size - 4096, pattern(4096, 5))
    p.write(0, pattern(4096, 6))  # overwrite allocated clusters
    p.q.flush()
    p.write(2 * MiB + 512, pattern(MiB, 7), split=4096)
    for off in range(0, size, MiB):
        p.read_equal(off, MiB)
    p.close_and_check()


def test_growth_across_l2_tables_and_refcount_blocks(tmp_path):
    """A 4 GiB disk with 512-byte clusters written sparsely: many L2 tables, refcount blocks,
    and several refcount table reallocations."""
    size = 4 << 30
    img = create_qcow2(str(tmp_path / "big.qcow2"), size, "cluster_size=512")
    raw = make_raw(str(tmp_path / "big.raw"), size)
    p = Pair(img, raw)
    rt_before = p.q.h.refcount_table_offset
    step = size // 3000
    for i in range(3000):
        off = (i * step) // 512 * 512
        p.write(off, pattern(4096 if i % 7 else 512, i))
        if i % 500 == 0:
            p.q.flush()
    assert p.q.h.refcount_table_offset != rt_before, "the refcount table should have grown"
    assert len(p.q.refs.rt) > 64
    for i in range(0, 3000, 97):
        p.read_equal((i * step) // 512 * 512, 4096)
    p.q.close()
    p.r.close()
    check_image(img)
    info = qemu_img("info", "--output=json", img).stdout
    assert '"virtual-size": 4294967296' in info
    # comparing 4 GiB of mostly holes stays fast: qemu-img skips unallocated ranges
    assert_same(img, raw)


@pytest.mark.parametrize("compat", ["1.1", "0.10"])
@pytest.mark.parametrize("with_backing", [False, True])
def test_discard_and_write_zeroes(tmp_path, compat, with_backing):
    size, cs = 4 * MiB, 4096
    raw = str(tmp_path / "mirror.raw")
    backing = None
    if with_backing:
        backing = _backing_raw(str(tmp_path / "base.raw"), size)
        with open(raw, "wb") as f:
            f.write(file_bytes(backing))
    else:
        make_raw(raw, size)
    img = create_qcow2(
        str(tmp_path / "d.qcow2"),
        size,
        f"compat={compat}",
        f"cluster_size={cs}",
        backing=os.path.basename(backing) if backing else None,
    )
    p = Pair(img, raw)
    p.write(0, pattern(size, 1))
    p.q.flush()
    alloc_before = os.stat(img).st_blocks
    p.zero(cs, 3 * cs, unmap=True)  # whole clusters, freed
    p.zero(10 * cs, 2 * cs, unmap=False)  # whole clusters, kept
    p.zero(20 * cs + 512, 1024, unmap=True)  # inside one cluster
    p.zero(30 * cs - 512, cs + 1024, unmap=False)  # partial + whole + partial
    if not (with_backing and compat == "0.10"):
        # (a v2 image with a backing file shows the backing data after a discard: checked below)
        p.discard(40 * cs, 8 * cs)
        p.discard(60 * cs + 512, 3 * cs)
    p.discard(MiB, MiB)
    if with_backing and compat == "0.10":
        # the raw mirror zeroed; the qcow2 shows the backing file -- make the mirror agree
        p.r.writev(MiB, [memoryview(bytearray(file_bytes(backing)[MiB : 2 * MiB]))])
    for off in range(0, size, MiB):
        p.read_equal(off, MiB)
    p.q.flush()
    # freed clusters are reused by the next allocations instead of growing the file
    end_before = os.path.getsize(img)
    p.write(MiB, pattern(MiB // 2, 9))
    assert os.path.getsize(img) == end_before
    assert alloc_before > 0
    p.close_and_check()


def test_write_zeroes_on_unallocated_with_backing_hides_backing(tmp_path):
    size = 2 * MiB
    backing = _backing_raw(str(tmp_path / "base.raw"), size)
    img = create_qcow2(str(tmp_path / "z.qcow2"), size, "cluster_size=65536", backing="base.raw")
    q = open_disk(img)
    q.write_zeroes(65536, 4 * 65536, unmap=True)
    out = bytearray(6 * 65536)
    q.readv(0, [memoryview(out)])
    base = file_bytes(backing)
    assert out[:65536] == base[:65536]
    assert out[65536 : 5 * 65536] == bytes(4 * 65536)
    assert out[5 * 65536 :] == base[5 * 65536 : 6 * 65536]
    q.close()
    check_image(img)
    assert "zero" in qemu_img("map", "--output=json", img).stdout


def test_reads_compressed_clusters_and_overwrites_them(tmp_path):
    size = 4 * MiB
    src = str(tmp_path / "src.raw")
    data = bytearray(pattern(size, 5))
    data[MiB : 2 * MiB] = bytes(MiB)  # a zero run too
    with open(src, "wb") as f:
        f.write(data)
    img = str(tmp_path / "c.qcow2")
    qemu_img("convert", "-c", "-f", "raw", "-O", "qcow2", "-o", "cluster_size=65536", src, img)
    assert "compressed" in qemu_img("check", img).stdout
    q = open_disk(img)
    out = bytearray(size)
    q.readv(0, [memoryview(out)])
    assert out == data
    # partial overwrite of a compressed cluster (copy-on-write), whole overwrite, discard
    part = pattern(1024, 8)
    q.writev(65536 + 512, [memoryview(bytearray(part))])
    data[65536 + 512 : 65536 + 1536] = part
    q.writev(3 * 65536, [memoryview(bytearray(pattern(65536, 9)))])
    data[3 * 65536 : 4 * 65536] = pattern(65536, 9)
    q.discard(5 * 65536, 65536)
    data[5 * 65536 : 6 * 65536] = bytes(65536)
    q.readv(0, [memoryview(out)])
    assert out == data
    q.close()
    check_image(img)
    mirror = str(tmp_path / "m.raw")
    with open(mirror, "wb") as f:
        f.write(data)
    assert_same(img, mirror)


def test_reads_what_qemu_io_wrote(tmp_path):
    size = 16 * MiB
    img = create_qcow2(str(tmp_path / "qio.qcow2"), size, "cluster_size=65536")
    qemu_io(
        img,
        "write -P 0xab 0 64k",
        "write -P 0xcd 100k 3k",
        "write -z 1M 128k",
        "write -P 0x11 8M 1M",
        "discard 8M 64k",
    )
    q = open_disk(img, read_only=True)
    out = bytearray(size)
    q.readv(0, [memoryview(out)])
    expect = bytearray(size)
    expect[0 : 64 << 10] = b"\xab" * (64 << 10)
    expect[100 << 10 : 103 << 10] = b"\xcd" * (3 << 10)
    expect[8 * MiB + (64 << 10) : 9 * MiB] = b"\x11" * (MiB - (64 << 10))
    assert out == expect
    q.close()


def test_qemu_io_reads_what_vdm_wrote(tmp_path):
    img = create_qcow2(str(tmp_path / "v.qcow2"), 8 * MiB, "cluster_size=4096")
    q = open_disk(img)
    q.writev(12288, [memoryview(bytearray(b"\x5a" * 8192))])
    q.write_zeroes(0, 4096, False)
    q.close()
    out = qemu_io(img, "read -P 0x5a 12k 8k", "read -P 0 0 12k", "read -P 0 20k 1M")
    assert "read 8192/8192" in out
    check_image(img)


def test_zero_clusters_written_by_qemu_read_as_zero_over_backing(tmp_path):
    size = MiB
    _backing_raw(str(tmp_path / "base.raw"), size)
    img = create_qcow2(str(tmp_path / "zc.qcow2"), size, "cluster_size=4096", backing="base.raw")
    qemu_io(img, "write -z 0 64k", "write -z 128k 64k")  # zero flags (v3)
    q = open_disk(img)
    out = bytearray(size)
    q.readv(0, [memoryview(out)])
    base = file_bytes(str(tmp_path / "base.raw"))
    assert out[: 64 << 10] == bytes(64 << 10)
    assert out[64 << 10 : 128 << 10] == base[64 << 10 : 128 << 10]
    assert out[128 << 10 : 192 << 10] == bytes(64 << 10)
    # writing into a zero cluster keeps the rest of it zero
    q.writev(4096 + 512, [memoryview(bytearray(b"\x77" * 512))])
    q.readv(4096, [memoryview(out)[:4096]])
    assert out[:4096] == bytes(512) + b"\x77" * 512 + bytes(3072)
    q.close()
    check_image(img)


@pytest.mark.parametrize("refcount_bits", [1, 2, 8, 32, 64])
def test_other_refcount_widths(tmp_path, refcount_bits):
    size = 4 * MiB
    img = create_qcow2(str(tmp_path / "r.qcow2"), size, f"refcount_bits={refcount_bits}", "cluster_size=512")
    raw = make_raw(str(tmp_path / "r.raw"), size)
    p = Pair(img, raw)
    for i in range(0, size, 6144):
        p.write(i, pattern(1024, i))
    p.discard(MiB, MiB)
    p.q.flush()
    p.write(MiB, pattern(65536, 3))
    p.close_and_check()


def test_qcow2_backing_chain(tmp_path):
    size = 2 * MiB
    base = create_qcow2(str(tmp_path / "base.qcow2"), size, "cluster_size=65536")
    qemu_io(base, "write -P 0x42 0 2M")
    top = create_qcow2(
        str(tmp_path / "top.qcow2"), size, "cluster_size=4096", backing="base.qcow2", backing_fmt="qcow2"
    )
    q = open_disk(top)
    out = bytearray(8192)
    q.readv(65536, [memoryview(out)])
    assert out == b"\x42" * 8192
    q.writev(65536 + 512, [memoryview(bytearray(b"\x01" * 512))])
    q.readv(65536, [memoryview(out)])
    assert out == b"\x42" * 512 + b"\x01" * 512 + b"\x42" * 7168
    q.close()
    check_image(top)
    check_image(base)


@pytest.mark.parametrize("prealloc", ["metadata", "falloc"])
def test_preallocated_image(tmp_path, prealloc):
    img = create_qcow2(
        str(tmp_path / "pre.qcow2"), 4 * MiB, "cluster_size=65536", f"preallocation={prealloc}"
    )
    raw = make_raw(str(tmp_path / "pre.raw"), 4 * MiB)
    p = Pair(img, raw)
    end = os.path.getsize(img)
    p.write(65536 + 512, pattern(1024, 1))
    p.write(MiB, pattern(MiB, 2))
    p.zero(2 * MiB, 65536, unmap=False)
    p.read_equal(0, 4 * MiB)
    assert os.path.getsize(img) == end  # preallocated clusters are written in place
    p.close_and_check()


def test_direct_io_on_qcow2(tmp_path):
    img = create_qcow2(str(tmp_path / "dio.qcow2"), 4 * MiB, "cluster_size=65536")
    raw = make_raw(str(tmp_path / "dio.raw"), 4 * MiB)
    try:
        p = Pair(img, raw, direct=True)
    except DiskError as e:
        pytest.skip(str(e))
    p.write(0, pattern(65536, 1))
    p.write(70000 // 512 * 512, pattern(1536, 2), split=512)
    p.read_equal(0, MiB)
    p.close_and_check()


def test_lazy_refcounts_image_is_written_with_exact_refcounts(tmp_path):
    img = create_qcow2(str(tmp_path / "lazy.qcow2"), 4 * MiB, "lazy_refcounts=on", "cluster_size=4096")
    raw = make_raw(str(tmp_path / "lazy.raw"), 4 * MiB)
    p = Pair(img, raw)
    p.write(0, pattern(65536, 1))
    p.discard(4096, 8192)
    p.q.flush()
    assert file_bytes(img)[72:80] == bytes(8)  # never marked dirty
    p.close_and_check()


@pytest.mark.parametrize("with_backing", [False, True])
def test_size_not_a_multiple_of_the_cluster_size(tmp_path, with_backing):
    size = MiB + 3 * 512
    raw = str(tmp_path / "odd.raw")
    if with_backing:
        with open(tmp_path / "base.raw", "wb") as f:
            f.write(pattern(size, 4))
        with open(raw, "wb") as f:
            f.write(pattern(size, 4))
    else:
        make_raw(raw, size)
    img = create_qcow2(
        str(tmp_path / "odd.qcow2"), size, "cluster_size=65536", backing="base.raw" if with_backing else None
    )
    p = Pair(img, raw)
    assert p.q.size == size
    p.write(size - 1024, pattern(1024, 1))
    p.write(MiB - 512, pattern(1024, 2))
    p.zero(size - 512, 512, unmap=True)
    p.discard(MiB - 65536, 65536)
    with pytest.raises(DiskError, match="past the end"):
        p.q.writev(size - 512, [memoryview(bytearray(1024))])
    p.read_equal(0, size)
    p.close_and_check()


def test_qcow2_on_a_block_device(tmp_path):
    """No file end to extend: clusters, refcount blocks and a grown refcount table stay inside
    the device, and qemu-img reads the device back as a sound image."""
    lo_file = make_raw(str(tmp_path / "lo.bin"), 32 * MiB)
    with loop_device(lo_file) as dev:
        qemu_img("create", "-q", "-f", "qcow2", "-o", "cluster_size=512", dev, str(64 * MiB))
        raw = make_raw(str(tmp_path / "m.raw"), 64 * MiB)
        p = Pair(dev, raw)
        table = p.q.h.refcount_table_offset
        for n, i in enumerate(range(0, 64 * MiB, 24 * 1024)):  # > 8 MiB of clusters: the table grows
            p.write(i, pattern(4096 if n % 3 else 512, i))
        assert p.q.h.refcount_table_offset != table
        p.discard(MiB, MiB)
        p.read_equal(0, 4 * MiB)
        p.q.close()
        p.r.close()
        check_image(dev)
        assert_same(dev, raw)


@pytest.mark.parametrize("cluster_size", [512, 65536])
def test_writing_an_image_with_internal_snapshots_keeps_them(tmp_path, cluster_size):
    size = 2 * MiB
    img = create_qcow2(str(tmp_path / "s.qcow2"), size, f"cluster_size={cluster_size}")
    qemu_io(
        img,
        "write -P 0x33 0 512k",
        "write -c -P 0x55 1M 128k" if cluster_size > 512 else "write -P 0x55 1M 128k",
    )
    qemu_img("snapshot", "-c", "s1", img)
    qemu_io(img, "write -P 0x44 0 4k")  # QEMU's own copy-on-write of one cluster after the snapshot
    qemu_img("snapshot", "-c", "s2", img)
    at_s2 = str(tmp_path / "s2.raw")
    qemu_img("convert", "-f", "qcow2", "-O", "raw", img, at_s2)
    mirror = str(tmp_path / "now.raw")
    with open(mirror, "wb") as f:
        f.write(file_bytes(at_s2))
    p = Pair(img, mirror)
    p.write(512, pattern(1024, 1))  # partial write into a cluster shared by both snapshots
    p.write(256 * 1024, pattern(64 * 1024, 2))  # whole clusters
    p.write(MiB + 4096, pattern(512, 3))  # into (compressed) clusters of the snapshots
    p.discard(384 * 1024, 64 * 1024)
    p.zero(448 * 1024, 32 * 1024, unmap=False)
    p.write(1536 * 1024, pattern(8192, 4))  # never written before
    p.read_equal(0, size)
    p.q.flush()
    p.write(600 * 1024, pattern(4096, 5))
    p.close_and_check()
    # the snapshots still hold what they held
    for name, expect in (("s2", at_s2),):
        out = str(tmp_path / f"{name}.out")
        qemu_img("convert", "-f", "qcow2", "-l", f"snapshot.name={name}", "-O", "raw", img, out)
        assert file_bytes(out) == file_bytes(expect)
    out = str(tmp_path / "s1.out")
    qemu_img("convert", "-f", "qcow2", "-l", "snapshot.name=s1", "-O", "raw", img, out)
    s1 = file_bytes(out)
    assert s1[:4096] == b"\x33" * 4096 and s1[1 << 20 : (1 << 20) + 4096] == b"\x55" * 4096
    # deleting the snapshots leaves a clean image with exactly our data
    qemu_img("snapshot", "-d", "s1", img)
    qemu_img("snapshot", "-d", "s2", img)
    check_image(img)
    assert_same(img, mirror)
