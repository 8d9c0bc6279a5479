"""The backends under the real virtio-blk device, driven by the in-process test driver."""

from __future__ import annotations

import struct

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
