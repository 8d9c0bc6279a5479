"""A hostile qcow2 image: refused with DiskError in bounded time, never damaging the file.

Regression for ``fuzz/regressions/qcow2/alloc-loop-timeout``: an image whose refcount table has no
block for the header's range made every cluster allocation create a refcount block at host offset
0 -- over the header -- and, since a table entry of 0 means "no block", loop forever doing so.
"""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
import time
from pathlib import Path

import pytest
from vdm_blk.backends import DiskError, open_disk

REGRESSIONS = Path(__file__).resolve().parents[2] / "fuzz" / "regressions" / "qcow2"

needs_qemu_img = pytest.mark.skipif(shutil.which("qemu-img") is None, reason="qemu-img not installed")


def _write_everywhere(disk) -> None:
    buf = bytearray(b"\x5a" * 4096)
    for off in range(0, disk.size, 4096):
        disk.writev(off, [memoryview(buf)[: min(4096, disk.size - off)]])
    disk.flush()


@needs_qemu_img
def test_refcount_table_without_header_block_is_refused(tmp_path):
    img = tmp_path / "img.qcow2"
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=512", str(img), "128K"], check=True
    )
    raw = bytearray(img.read_bytes())
    (rt_off,) = struct.unpack_from(">Q", raw, 48)
    assert struct.unpack_from(">Q", raw, rt_off)[0], "qemu-img made an image without a first refcount block"
    struct.pack_into(">Q", raw, rt_off, 0)  # the header's range now has no refcount block
    img.write_bytes(bytes(raw))
    header = bytes(raw[:512])
    start = time.monotonic()
    with pytest.raises(DiskError, match="corrupt"):
        disk = open_disk(str(img), format="qcow2")
        try:
            _write_everywhere(disk)
        finally:
            disk.close()
    assert time.monotonic() - start < 10
    assert img.read_bytes()[:512] == header, "the header was overwritten"


@pytest.mark.parametrize("name", sorted(p.name for p in REGRESSIONS.iterdir()))
def test_fuzz_regression_image_finishes(name, tmp_path):
    """Each committed qcow2 crash input is refused or served, in bounded time."""
    img = tmp_path / "img.qcow2"
    shutil.copy(REGRESSIONS / name, img)
    start = time.monotonic()
    try:
        disk = open_disk(str(img), format="qcow2")
    except DiskError:
        return
    try:
        _write_everywhere(disk)
    except DiskError:
        pass
    finally:
        disk.close()
    assert time.monotonic() - start < 10
    assert os.path.getsize(img) < 64 << 20


@needs_qemu_img
def test_host_refusing_the_io_is_an_io_error_for_the_guest(tmp_path):
    """A host write that fails with EFBIG (here: the file may not grow, RLIMIT_FSIZE) is
    VIRTIO_BLK_S_IOERR for that request -- no exception out of the device, no broken device.

    (``fuzz/regressions/qcow2/efbig-data-offset`` found this with an L2 entry far past the end of
    the file; such an image is now refused read-write before anything is written, so the limit
    is what makes the host refuse here.)"""
    import resource
    import signal

    from vdm.testing import VirtioTestDriver
    from vdm_blk.config import BlkConfig
    from vdm_blk.device import BlkDevice

    img = tmp_path / "img.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(img), "4M"], check=True)
    with pytest.raises(DiskError, match="past the end of the file"):
        open_disk(str(REGRESSIONS / "efbig-data-offset"), format="qcow2").close()
    disk = open_disk(str(img), format="qcow2")
    dev = BlkDevice(disk, BlkConfig(path=str(img)))
    drv = VirtioTestDriver(dev, ram_size=1 << 20)
    old_limit = resource.getrlimit(resource.RLIMIT_FSIZE)
    old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    try:
        drv.init()
        resource.setrlimit(resource.RLIMIT_FSIZE, (os.path.getsize(img), old_limit[1]))
        statuses = []
        for sector in range(0, disk.size // 512, 128):
            used = drv.request(0, [struct.pack("<IIQ", 1, 0, sector), b"\x5a" * 4096], [1], timeout=10)
            statuses.append(used.data[-1])
        resource.setrlimit(resource.RLIMIT_FSIZE, old_limit)
        assert set(statuses) == {1}, statuses  # every write needed a new cluster: each refused
        assert dev.broken is None and not drv.needs_reset
        used = drv.request(0, [struct.pack("<IIQ", 1, 0, 0), b"\x5a" * 4096], [1], timeout=10)
        assert used.data[-1] == 0, "the device did not serve a write once the host allowed it again"
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, old_limit)
        signal.signal(signal.SIGXFSZ, old_handler)
        dev.close()
