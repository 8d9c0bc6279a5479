"""virtio-blk through the in-process driver: every request type, every status, hostile requests."""

from __future__ import annotations

import os
import struct
import threading
import time

import pytest
from vdm.device import Status
from vdm_blk.config import BlkConfig
from vdm_blk.device import (
    F_DISCARD,
    F_MQ,
    F_RO,
    F_WRITE_ZEROES,
    S_IOERR,
    S_OK,
    S_UNSUPP,
    T_DISCARD,
    T_FLUSH,
    T_GET_ID,
    T_IN,
    T_OUT,
    T_WRITE_ZEROES,
    BlkDevice,
)

from tests.blk.memdisk import MemoryDisk


def hdr(rtype: int, sector: int = 0) -> bytes:
    return struct.pack("<IIQ", rtype, 0, sector)


def seg(sector: int, count: int, flags: int = 0) -> bytes:
    return struct.pack("<QII", sector, count, flags)


@pytest.fixture
def disk() -> MemoryDisk:
    return MemoryDisk(1 << 20)


@pytest.fixture(params=["mmio", "pci"])
def blk(request, virtio_driver, disk):
    """A blk device on a MemoryDisk, brought up by the test driver over each transport."""

    def make(**opts):
        cfg = BlkConfig(path="/images/test-disk.img", **opts)
        dev = BlkDevice(disk, cfg)
        drv = virtio_driver(dev, transport=request.param)
        drv.init()
        return drv

    return make


def write(drv, sector: int, data: bytes, q: int = 0):
    return drv.request(q, [hdr(T_OUT, sector), data], [1])


def read(drv, sector: int, n: int, q: int = 0):
    return drv.request(q, [hdr(T_IN, sector)], [n, 1])


def test_config_space_describes_the_disk(blk, disk):
    drv = blk()
    capacity, _size_max, seg_max = struct.unpack("<QII", drv.config_bytes(0, 16))
    assert capacity == disk.size // 512
    assert seg_max == 254
    assert struct.unpack("<I", drv.config_bytes(20, 4))[0] == 512  # blk_size
    assert drv.config_bytes(24, 1) == bytes([3])  # 4096-byte physical blocks = 2^3 sectors
    assert struct.unpack("<H", drv.config_bytes(34, 2))[0] == 1  # num_queues
    assert drv.config_read(32, 1) == 1  # writeback
    f = drv.features
    assert f >> F_DISCARD & 1 and f >> F_WRITE_ZEROES & 1 and not f >> F_RO & 1 and not f >> F_MQ & 1


def test_write_then_read_back(blk, disk):
    drv = blk()
    data = os.urandom(4096)
    u = write(drv, 8, data)
    assert u.data == bytes([S_OK]) and u.written == 1
    assert disk.data[8 * 512 : 8 * 512 + 4096] == data
    u = read(drv, 8, 4096)
    assert u.written == 4097 and u.data == data + bytes([S_OK])


def test_chains_split_at_odd_boundaries(blk, disk):
    drv = blk()
    data = os.urandom(1024)
    # header in two pieces, data in three odd pieces
    u = drv.request(0, [hdr(T_OUT, 3)[:5], hdr(T_OUT, 3)[5:], data[:100], data[100:613], data[613:]], [1])
    assert u.data == bytes([S_OK])
    assert disk.data[3 * 512 : 3 * 512 + 1024] == data
    # the status byte shares its buffer with the end of the data
    u = drv.request(0, [hdr(T_IN, 3)], [7, 1018])
    assert u.data == data + bytes([S_OK])


def test_indirect_chains(blk, disk):
    drv = blk()
    data = os.urandom(2048)
    assert drv.request(0, [hdr(T_OUT, 100), data], [1], indirect=True).data == bytes([S_OK])
    assert drv.request(0, [hdr(T_IN, 100)], [2048, 1], indirect=True).data == data + bytes([S_OK])


def test_flush_reaches_the_backend(blk, disk):
    drv = blk()
    assert drv.request(0, [hdr(T_FLUSH)], [1]).data == bytes([S_OK])
    assert disk.flushes == 1


def test_get_id_default_serial_and_configured(virtio_driver, disk):
    drv = virtio_driver(BlkDevice(disk, BlkConfig(path="/images/test-disk.img")))
    drv.init()
    assert drv.request(0, [hdr(T_GET_ID)], [20, 1]).data == b"test-disk.img".ljust(20, b"\0") + b"\0"
    drv2 = virtio_driver(BlkDevice(MemoryDisk(), BlkConfig(path="x", serial="SN-42")))
    drv2.init()
    assert drv2.request(0, [hdr(T_GET_ID)], [20, 1]).data[:6] == b"SN-42\0"


def test_get_id_scattered_over_buffers_and_short_buffers(virtio_driver, disk):
    """The id lands across several buffers, a short buffer gets its head, the status stays last."""
    drv = virtio_driver(BlkDevice(disk, BlkConfig(path="x", serial="ABCDEFGHIJKLMNOPQRST")))
    drv.init()
    assert drv.request(0, [hdr(T_GET_ID)], [3, 7, 10, 1]).data == b"ABCDEFGHIJKLMNOPQRST" + bytes([S_OK])
    assert drv.request(0, [hdr(T_GET_ID)], [2, 3, 1]).data == b"ABCDE" + bytes([S_OK])
    # room for more than the id: 20 bytes written over both buffers, the status in the last byte
    used = drv.request(0, [hdr(T_GET_ID)], [4, 21])
    assert used.data[:20] == b"ABCDEFGHIJKLMNOPQRST" and used.data[-1] == S_OK


def test_discard_and_write_zeroes(blk, disk):
    drv = blk()
    write(drv, 0, b"\xff" * 8192)
    assert drv.request(0, [hdr(T_DISCARD), seg(0, 4)], [1]).data == bytes([S_OK])
    assert disk.data[:2048] == bytes(2048) and disk.data[2048:8192] == b"\xff" * 6144
    assert drv.request(0, [hdr(T_WRITE_ZEROES), seg(4, 4, 1), seg(10, 2)], [1]).data == bytes([S_OK])
    assert disk.data[2048:4096] == bytes(2048) and disk.data[5120:6144] == bytes(1024)
    assert disk.data[4096:5120] == b"\xff" * 1024


@pytest.mark.parametrize(
    "payload, status",
    [
        (seg(0, 1, flags=1), S_UNSUPP),  # discard must not carry the unmap flag
        (seg(0, 1, flags=2), S_UNSUPP),  # unknown flag
        (seg(1 << 40, 1), S_IOERR),  # past the end
        (seg(0, 1)[:10], S_IOERR),  # truncated segment
        (b"", S_IOERR),  # no segment
        (seg(0, 1) * 17, S_IOERR),  # more segments than advertised
    ],
    ids=["unmap-flag", "unknown-flag", "past-end", "truncated", "empty", "too-many"],
)
def test_bad_discard_requests(blk, disk, payload, status):
    drv = blk()
    assert drv.request(0, [hdr(T_DISCARD), payload] if payload else [hdr(T_DISCARD)], [1]).data == bytes(
        [status]
    )
    assert not [c for c in disk.calls if c[0] == "discard"]
    assert not drv.needs_reset


def test_discard_not_offered_when_ignored(blk, disk):
    drv = blk(discard="ignore")
    assert not drv.features >> F_DISCARD & 1
    assert drv.request(0, [hdr(T_DISCARD), seg(0, 1)], [1]).data == bytes([S_UNSUPP])


def test_unknown_request_type_is_unsupp(blk):
    drv = blk()
    assert drv.request(0, [hdr(99)], [1]).data == bytes([S_UNSUPP])
    assert drv.request(0, [hdr(10)], [16, 1]).data[-1] == S_UNSUPP  # GET_LIFETIME: not offered


def test_read_only_disk_fails_writes_with_ioerr(blk, disk):
    drv = blk(ro=True)
    assert drv.features >> F_RO & 1
    assert not drv.features >> F_DISCARD & 1
    assert write(drv, 0, b"\x11" * 512).data == bytes([S_IOERR])
    assert drv.request(0, [hdr(T_WRITE_ZEROES), seg(0, 1)], [1]).data[-1] in (S_IOERR, S_UNSUPP)
    assert disk.data[:512] == bytes(512) and not [c for c in disk.calls if c[0] != "read"]
    assert read(drv, 0, 512).data[-1] == S_OK  # reads still work


@pytest.mark.parametrize(
    "out, in_lens",
    [
        ([hdr(T_IN, 2048)], [512, 1]),  # first sector past the end
        ([hdr(T_IN, 2047)], [1024, 1]),  # runs past the end
        ([hdr(T_IN, (1 << 64) - 1)], [512, 1]),  # sector overflow
        ([hdr(T_IN, 0)], [100, 1]),  # not a multiple of 512
        ([hdr(T_OUT, 2048), b"x" * 512], [1]),
        ([hdr(T_OUT, 0), b"x" * 513], [1]),
        ([hdr(T_OUT, 0)[:8]], [1]),  # short header
    ],
    ids=[
        "read-past-end",
        "read-runs-past-end",
        "sector-overflow",
        "read-odd-length",
        "write-past-end",
        "write-odd-length",
        "short-header",
    ],
)
def test_bad_requests_get_ioerr_and_touch_nothing(blk, disk, out, in_lens):
    drv = blk()
    u = drv.request(0, out, in_lens)
    assert u.data[-1:] == bytes([S_IOERR])
    assert disk.calls == [] and disk.data == bytes(disk.size)
    assert not drv.needs_reset
    assert write(drv, 0, b"\x01" * 512).data == bytes([S_OK])  # the device still works


def test_request_without_status_byte_is_returned_unharmed(blk, disk):
    drv = blk()
    u = drv.request(0, [hdr(T_IN, 0)], [])
    assert u.written == 0
    assert not drv.needs_reset and disk.calls == []


def test_backend_error_becomes_ioerr(blk, disk):
    drv = blk()
    disk.fail = True
    assert read(drv, 0, 512).data[-1] == S_IOERR
    assert write(drv, 0, b"a" * 512).data == bytes([S_IOERR])
    assert not drv.needs_reset


def test_many_requests_in_flight_do_not_block_the_queue(blk, disk):
    drv = blk()
    disk.gate = threading.Event()  # every I/O blocks until the gate opens
    heads = {}
    t0 = time.monotonic()
    for i in range(32):
        heads[drv.post(0, [hdr(T_OUT, i * 8), bytes([i]) * 4096], [1])] = i
    drv.kick(0)  # served inline by the queue thread: must return while all I/O is blocked
    assert time.monotonic() - t0 < 5
    assert drv.collect(0) == []
    disk.gate.set()
    done = drv.wait(0, 32)
    assert sorted(u.head for u in done) == sorted(heads) and all(u.data == bytes([S_OK]) for u in done)
    for i in range(32):
        assert disk.data[i * 4096 : (i + 1) * 4096] == bytes([i]) * 4096


def test_writethrough_flushes_every_write_and_wce_switches(blk, disk):
    drv = blk(cache="writethrough")
    assert drv.config_read(32, 1) == 0
    write(drv, 0, b"w" * 512)
    assert disk.flushes == 1
    drv.config_write(32, 1, 1)  # driver switches to writeback
    assert drv.config_read(32, 1) == 1
    write(drv, 1, b"w" * 512)
    assert disk.flushes == 1


def test_multiqueue(blk, disk):
    drv = blk(queues=2)
    assert drv.features >> F_MQ & 1
    assert struct.unpack("<H", drv.config_bytes(34, 2))[0] == 2
    assert write(drv, 5, b"q" * 512, q=1).data == bytes([S_OK])
    assert read(drv, 5, 512, q=0).data == b"q" * 512 + bytes([S_OK])


def test_reset_waits_for_inflight_io_and_device_restarts(blk, disk):
    drv = blk()
    disk.gate = threading.Event()
    drv.post(0, [hdr(T_OUT, 0), b"r" * 512], [1])
    drv.kick(0)
    threading.Timer(0.2, disk.gate.set).start()
    drv.set_status(0)  # reset while a write is in flight
    assert drv.status == 0
    assert disk.data[:512] == b"r" * 512  # the write finished before reset returned
    disk.gate = None
    drv.init()
    assert read(drv, 0, 512).data == b"r" * 512 + bytes([S_OK])
    assert drv.status & Status.DRIVER_OK
