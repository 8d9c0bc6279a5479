"""The backends under the real virtio-blk device, driven by the in-process test driver."""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
import tempfile
from pathlib import Path

import pytest
from vdm_blk.backends import open_disk
from vdm_blk.config import BlkConfig
from vdm_blk.device import S_OK, T_DISCARD, T_FLUSH, T_IN, T_OUT, T_WRITE_ZEROES, BlkDevice

from .helpers import check_image, create_qcow2, make_raw, pattern

MiB = 1 << 20


def _hdr(rtype: int, sector: int = 0) -> bytes:
    return struct.pack("<IIQ", rtype, 0, sector)


@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
def test_guest_requests_reach_the_image(tmp_path, virtio_driver, fmt):
    path = str(tmp_path / f"disk.{fmt}")
    if fmt == "raw":
        make_raw(path, 8 * MiB)
    else:
        create_qcow2(path, 8 * MiB, "cluster_size=4096")
    backend = open_disk(path)
    dev = BlkDevice(backend, BlkConfig(path=path))
    drv = virtio_driver(dev)
    drv.init()
    data = bytes(pattern(3 * 4096, 5))
    assert drv.request(0, [_hdr(T_OUT, 7), data], [1]).data == bytes([S_OK])
    u = drv.request(0, [_hdr(T_IN, 7)], [len(data), 1])
    assert u.data == data + bytes([S_OK])
    zero = struct.pack("<QII", 8, 2, 0)
    assert drv.request(0, [_hdr(T_WRITE_ZEROES), zero], [1]).data == bytes([S_OK])
    assert drv.request(0, [_hdr(T_DISCARD), struct.pack("<QII", 14, 8, 0)], [1]).data == bytes([S_OK])
    assert drv.request(0, [_hdr(T_FLUSH)], [1]).data == bytes([S_OK])
    u = drv.request(0, [_hdr(T_IN, 7)], [len(data), 1])
    expect = bytearray(data)
    expect[512 : 3 * 512] = bytes(1024)
    expect[7 * 512 : 15 * 512] = bytes(8 * 512)
    assert u.data == bytes(expect) + bytes([S_OK])
    # a request past the end is refused by the device before the backend sees it
    u = drv.request(0, [_hdr(T_IN, 8 * MiB // 512)], [512, 1])
    assert u.data[-1] != S_OK
    dev.close()
    if fmt == "qcow2":
        check_image(path)


def _raw_device(tmp_path, virtio_driver, **config):
    path = make_raw(str(tmp_path / "disk.raw"), 8 * MiB)
    direct, writethrough = config.get("direct", False), config.get("cache") == "writethrough"
    backend = open_disk(path, direct=direct, writethrough=writethrough)
    dev = BlkDevice(backend, BlkConfig(path=path, **config))
    drv = virtio_driver(dev)
    drv.init()
    return path, backend, dev, drv


def test_small_writes_are_served_on_the_queue_thread_and_land_in_the_file(
    tmp_path, virtio_driver, monkeypatch
):
    path, backend, dev, drv = _raw_device(tmp_path, virtio_driver)
    workers = []
    monkeypatch.setattr(backend, "writev", lambda *a: workers.append(a) or 0)  # a worker would fail
    small, big = bytes(pattern(4096, 1)), bytes(pattern(128 << 10, 2))
    assert drv.request(0, [_hdr(T_OUT, 16), small], [1]).data == bytes([S_OK])
    assert workers == []
    with open(path, "rb") as f:  # no flush asked: the bytes are in the file (page cache) already
        f.seek(16 * 512)
        assert f.read(4096) == small
    # larger than INLINE_WRITE_MAX: the worker's writev, which here writes nothing -> IOERR
    assert drv.request(0, [_hdr(T_OUT, 64), big], [1]).data != bytes([S_OK])
    assert len(workers) == 1
    dev.close()


def test_writes_of_any_size_on_tmpfs_are_served_on_the_queue_thread(virtio_driver, monkeypatch):
    """A memory file system never makes a write wait for a device or for dirty-page throttling
    (its pages are not written back), so a large write is a memory copy there, as a read of any
    size already is: the 1 MiB writes of the KVM lab's dd (a tmpfs image) skip the worker."""
    if not os.path.isdir("/dev/shm") or not os.access("/dev/shm", os.W_OK):
        pytest.skip("no writable /dev/shm (tmpfs) here")
    d = tempfile.mkdtemp(prefix="vdm-wr-", dir="/dev/shm")
    try:
        path, backend, dev, drv = _raw_device(Path(d), virtio_driver)
        workers = []
        monkeypatch.setattr(backend, "writev", lambda *a: workers.append(a) or 0)  # a worker would fail
        big = bytes(pattern(MiB, 5))
        assert drv.request(0, [_hdr(T_OUT, 64), big], [1]).data == bytes([S_OK])
        assert workers == []
        assert drv.request(0, [_hdr(T_FLUSH)], [1]).data == bytes([S_OK])  # flush still served
        with open(path, "rb") as f:
            f.seek(64 * 512)
            assert f.read(MiB) == big
        dev.close()
    finally:
        shutil.rmtree(d, ignore_errors=True)


def test_an_inline_write_that_fails_is_retried_by_a_worker_and_reported(tmp_path, virtio_driver, monkeypatch):
    _path, backend, dev, drv = _raw_device(tmp_path, virtio_driver)
    dev._step = None  # the Python inline path under test (vdm_blk.fastserve does not call these methods)

    def broken(*a):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(backend, "writev_inline", broken)
    dev._writev_inline = broken
    data = bytes(pattern(4096, 3))
    assert drv.request(0, [_hdr(T_OUT, 8), data], [1]).data == bytes([S_OK])  # the worker wrote it
    assert drv.request(0, [_hdr(T_IN, 8)], [4096, 1]).data == data + bytes([S_OK])
    monkeypatch.setattr(backend, "writev", broken)
    assert drv.request(0, [_hdr(T_OUT, 8), data], [1]).data == bytes([1])  # VIRTIO_BLK_S_IOERR
    assert dev.stats["errors"] == 1
    dev.close()


@pytest.mark.parametrize("config", [{"cache": "writethrough"}, {"direct": True}])
def test_writethrough_and_direct_writes_never_take_the_inline_path(
    tmp_path, virtio_driver, monkeypatch, config
):
    _path, backend, dev, drv = _raw_device(tmp_path, virtio_driver, **config)
    inline = []
    real = backend.writev_inline
    monkeypatch.setattr(dev, "_writev_inline", lambda *a: inline.append(real(*a)) or inline[-1])
    data = bytes(pattern(4096, 4))
    assert drv.request(0, [_hdr(T_OUT, 8), data], [1]).data == bytes([S_OK])
    assert drv.request(0, [_hdr(T_IN, 8)], [4096, 1]).data == data + bytes([S_OK])
    # asked (writethrough: not at all; direct: asked, and the backend said "use a worker")
    assert inline in ([], [None])
    dev.close()


def test_qcow2_serves_writes_and_reads_of_allocated_clusters_inline(tmp_path, virtio_driver, monkeypatch):
    path = str(tmp_path / "disk.qcow2")
    create_qcow2(path, 8 * MiB, "cluster_size=65536")
    backend = open_disk(path)
    dev = BlkDevice(backend, BlkConfig(path=path))
    drv = virtio_driver(dev)
    drv.init()
    first, second = bytes(pattern(4096, 6)), bytes(pattern(4096, 7))
    # the first write allocates the cluster: that is the worker's job
    assert drv.request(0, [_hdr(T_OUT, 0), first], [1]).data == bytes([S_OK])
    workers = []
    monkeypatch.setattr(backend, "writev", lambda *a: workers.append(a) or 0)
    monkeypatch.setattr(backend, "readv", lambda *a: workers.append(a) or 0)
    # the same cluster again, and reads of it: inline (the page cache has it)
    assert drv.request(0, [_hdr(T_OUT, 8), second], [1]).data == bytes([S_OK])
    assert drv.request(0, [_hdr(T_IN, 0)], [8192, 1]).data == first + second + bytes([S_OK])
    assert workers == []
    # a write to an unallocated cluster still goes to the worker (which here fails: IOERR)
    assert drv.request(0, [_hdr(T_OUT, 256), second], [1]).data != bytes([S_OK])
    assert len(workers) == 1
    monkeypatch.undo()
    assert drv.request(0, [_hdr(T_FLUSH)], [1]).data == bytes([S_OK])
    dev.close()
    check_image(path)
    flat = str(tmp_path / "flat.raw")
    subprocess.run(["qemu-img", "convert", "-f", "qcow2", "-O", "raw", path, flat], check=True)
    with open(flat, "rb") as f:
        assert f.read(8192) == first + second
