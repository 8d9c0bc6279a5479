"""Tread and Twrite across the guest's buffers as a guest lays them out, and as a hostile one does.

A Linux guest's zero-copy path puts the 9P header in a buffer of its own and the data in pages;
the device reads from the file straight into the reply's buffers and writes to it straight from
the request's. What the guest sees must not depend on where its buffers are cut: the count field
is the bytes read (a short read at the end of the file included), the used length is the reply's
size, no byte past the reply is touched, and every count, offset and fid is checked.
"""

from __future__ import annotations

import errno
import os
import struct

import pytest
from ninep_client import Client
from vdm_9p.config import NinepConfig
from vdm_9p.device import NinepDevice

O_RDONLY, O_RDWR = 0, 2
POISON = 0xEE  # what vdm.testing's driver fills its writable buffers with


@pytest.fixture
def env(tmp_path, virtio_driver):
    share = tmp_path / "share"
    share.mkdir()
    data = os.urandom(300_000)
    (share / "f").write_bytes(data)
    dev = NinepDevice(NinepConfig(path=str(share), tag="t", queue_size=256))
    drv = virtio_driver(dev, ram_size=32 << 20)
    drv.init()
    c = Client(drv, msize=1 << 20)
    c.version()
    c.attach(0)
    c.walk(0, 1, "f")
    c.lopen(1, O_RDWR)
    return c, share, data


def request(c: Client, mtype: int, body: bytes, out_cuts=(), in_lens=(4096,)) -> tuple[int, bytes]:
    """One message, its readable part cut at ``out_cuts``; returns (used length, whole reply area)."""
    msg = struct.pack("<IBH", 7 + len(body), mtype, 77) + body
    edges = [0, *out_cuts, len(msg)]
    out = [msg[a:b] for a, b in zip(edges, edges[1:]) if b > a]
    used = c.drv.request(0, out=out, in_lens=list(in_lens))
    return used.written, used.data


def tread(c: Client, fid: int, offset: int, count: int, in_lens) -> tuple[int, bytes]:
    return request(c, 116, struct.pack("<IQI", fid, offset, count), in_lens=in_lens)


def rlerror_of(written: int, data: bytes) -> int:
    size, rtype, tag, err = struct.unpack_from("<IBHI", data)
    assert (size, rtype, tag) == (11, 7, 77) and written == 11
    return err


@pytest.mark.parametrize(
    "in_lens",
    [
        [11 + 256 * 1024],
        [11] + [4096] * 64,
        [3, 5, 7] + [4096] * 64,
        [1] * 11 + [100_000] * 3,
        [12, 1, 1 << 18],
    ],
    ids=["one buffer", "header then pages", "header cut in three", "bytes then big", "header+1"],
)
def test_tread_into_any_buffer_layout(env, in_lens):
    c, _share, data = env
    for offset, count in ((0, 256 * 1024), (4095, 200_000), (len(data) - 1000, 256 * 1024)):
        written, area = tread(c, 1, offset, count, in_lens)
        size, rtype, tag, n = struct.unpack_from("<IBHI", area)
        want = data[offset : offset + count]
        assert (rtype, tag) == (117, 77)
        assert n == len(want) and size == written == 11 + n  # a short read at EOF says so
        assert area[11 : 11 + n] == want
        assert set(area[written:]) <= {POISON}  # nothing past the reply was written


def test_tread_is_bounded_by_the_reply_room_and_msize(env):
    c, _share, data = env
    written, area = tread(c, 1, 0, 0xFFFFFFFF, [11, 1000, 24])
    assert written == 11 + 1024 and struct.unpack_from("<I", area, 7)[0] == 1024
    assert area[11:written] == data[:1024]
    c.version(msize=8192)
    c.attach(0)
    c.walk(0, 1, "f")
    c.lopen(1, O_RDONLY)
    written, area = tread(c, 1, 0, 1 << 20, [1 << 20])
    assert written == 8192 and area[11:written] == data[: 8192 - 11]


def test_tread_refusals(env):
    c, _share, _data = env
    assert rlerror_of(*tread(c, 99, 0, 10, [11, 4096])) == errno.EBADF  # unknown fid
    c.walk(0, 2, "f")
    assert rlerror_of(*tread(c, 2, 0, 10, [11, 4096])) == errno.EBADF  # not open
    c.walk(0, 3)
    c.lopen(3, 0o200000)
    assert rlerror_of(*tread(c, 3, 0, 10, [11, 4096])) == errno.EISDIR
    assert rlerror_of(*tread(c, 1, 1 << 63, 10, [11, 4096])) == errno.EINVAL  # offset past off_t
    written, area = tread(c, 1, 1 << 62, 10, [11, 4096])  # past the end: nothing
    assert written == 11 and struct.unpack_from("<I", area, 7)[0] == 0
    written, area = request(c, 116, struct.pack("<IQ", 1, 0), in_lens=[64])  # no count field
    assert rlerror_of(written, area) == errno.EINVAL


@pytest.mark.parametrize(
    "cuts",
    [(), (23,), (23, *range(4096 + 23, 256 * 1024, 4096)), (2, 9, 17, 30), (22, 24, 25)],
    ids=["one buffer", "header then data", "header then pages", "header cut up", "odd cuts"],
)
def test_twrite_from_any_buffer_layout(env, cuts):
    c, share, data = env
    new = os.urandom(256 * 1024)
    written, area = request(c, 118, struct.pack("<IQI", 1, 1000, len(new)) + new, cuts)
    assert written == 11 and struct.unpack_from("<IBHI", area) == (11, 119, 77, len(new))
    assert (share / "f").read_bytes() == data[:1000] + new + data[1000 + len(new) :]


def test_twrite_refusals_leave_the_file_alone(env, virtio_driver):
    c, share, data = env
    # a count beyond the message, with the data split over buffers
    body = struct.pack("<IQI", 1, 0, 5000) + b"x" * 4000
    assert rlerror_of(*request(c, 118, body, (23, 1023))) == errno.EINVAL
    assert rlerror_of(*request(c, 118, struct.pack("<IQI", 99, 0, 3) + b"abc")) == errno.EBADF
    c.walk(0, 2, "f")
    assert rlerror_of(*request(c, 118, struct.pack("<IQI", 2, 0, 3) + b"abc", (23,))) == errno.EBADF
    c.lopen(2, O_RDONLY)
    assert rlerror_of(*request(c, 118, struct.pack("<IQI", 2, 0, 3) + b"abc", (23,))) == errno.EBADF
    assert rlerror_of(*request(c, 118, struct.pack("<IQI", 1, 1 << 63, 1) + b"z", (23,))) in (
        errno.EINVAL, errno.EFBIG,
    )
    # the message's size field shorter than its buffers: only ``size`` bytes are the message
    msg = struct.pack("<IBHIQI", 23 + 2, 118, 77, 1, 0, 3) + b"abc"
    used = c.drv.request(0, out=[msg[:23], msg[23:]], in_lens=[64])
    assert struct.unpack_from("<IBHI", used.data) == (11, 7, 77, errno.EINVAL)
    assert (share / "f").read_bytes() == data
    # a read-only export refuses the write whatever the layout
    ro = NinepDevice(NinepConfig(path=str(share), tag="ro", ro=True))
    drv = virtio_driver(ro, ram_size=4 << 20)
    drv.init()
    c2 = Client(drv)
    c2.version()
    c2.attach(0)
    c2.walk(0, 1, "f")
    c2.lopen(1, O_RDONLY)
    assert rlerror_of(*request(c2, 118, struct.pack("<IQI", 1, 0, 3) + b"abc", (23,))) == errno.EROFS
    assert (share / "f").read_bytes() == data
    ro.close()


def test_zero_length_read_and_write(env):
    c, share, data = env
    written, area = tread(c, 1, 0, 0, [11])
    assert written == 11 and struct.unpack_from("<IBHI", area) == (11, 117, 77, 0)
    written, area = request(c, 118, struct.pack("<IQI", 1, 5, 0))
    assert written == 11 and struct.unpack_from("<IBHI", area) == (11, 119, 77, 0)
    assert (share / "f").read_bytes() == data


def test_more_buffers_than_one_system_call_takes(env):
    """An indirect table may hold more buffers than IOV_MAX (1024): the data still arrives whole."""
    c, share, data = env
    n = 1500
    used = c.drv.request(0, out=[struct.pack("<IBHIQI", 23, 116, 77, 1, 10, 8 * n)], in_lens=[11] + [8] * n,
                         indirect=True)
    assert used.written == 11 + 8 * n and struct.unpack_from("<I", used.data, 7)[0] == 8 * n
    assert used.data[11 : 11 + 8 * n] == data[10 : 10 + 8 * n]
    new = os.urandom(8 * n)
    msg = struct.pack("<IBHIQI", 23 + len(new), 118, 77, 1, 20, len(new)) + new
    used = c.drv.request(0, out=[msg[:23]] + [msg[i : i + 8] for i in range(23, len(msg), 8)], in_lens=[64],
                         indirect=True)
    assert struct.unpack_from("<IBHI", used.data) == (11, 119, 77, len(new))
    assert (share / "f").read_bytes() == data[:20] + new + data[20 + len(new) :]
