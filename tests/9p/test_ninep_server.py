"""virtio-9p through vdm.testing's driver: what a guest's v9fs sees for ordinary work."""

from __future__ import annotations

import errno
import hashlib
import os
import struct

import pytest
from ninep_client import Client, P9Error
from vdm.transport.mmio import Reg
from vdm_9p.config import NinepConfig
from vdm_9p.device import NinepDevice

O_RDONLY, O_WRONLY, O_RDWR, O_TRUNC = 0, 1, 2, 0o1000


@pytest.fixture
def share(tmp_path):
    d = tmp_path / "share"
    d.mkdir()
    return d


def connect(virtio_driver, path, **kw) -> Client:
    dev = NinepDevice(NinepConfig(path=str(path), tag=kw.pop("tag", "hostshare"), **kw))
    drv = virtio_driver(dev, ram_size=32 << 20)
    drv.init()
    c = Client(drv)
    assert c.version() == (65536, b"9P2000.L")
    c.attach(0)
    return c


def test_identity_and_mount_tag(virtio_driver, share):
    drv = virtio_driver(NinepDevice(NinepConfig(path=str(share), tag="hostshare")))
    assert drv.reg_read(Reg.DEVICE_ID) == 9
    assert drv.device_features() & 1  # VIRTIO_9P_MOUNT_TAG
    assert drv.config_bytes(0, 11) == struct.pack("<H", 9) + b"hostshare"
    assert drv.queue_max_size(1) == 0


def test_version_negotiation(virtio_driver, share):
    c = connect(virtio_driver, share)
    assert c.version(msize=1 << 30) == (1 << 20, b"9P2000.L")  # the server's limit wins
    assert c.version(ver=b"9P2000") == (c.msize, b"unknown")  # only 9P2000.L is spoken


def test_create_write_read_rename_link_chmod_truncate(virtio_driver, share):
    c = connect(virtio_driver, share)
    c.walk(0, 1)
    c.lcreate(1, "a.txt", O_RDWR)
    data = os.urandom(100_000)
    off = 0
    while off < len(data):
        off += c.write(1, off, data[off : off + 60_000])
    c.fsync(1)
    c.clunk(1)
    assert (share / "a.txt").read_bytes() == data  # what the host sees
    c.walk(0, 2, "a.txt")
    c.lopen(2, O_RDONLY)
    got = b"".join(c.read(2, o, 65_000) for o in range(0, len(data), 65_000))
    assert hashlib.md5(got).digest() == hashlib.md5(data).digest()
    c.clunk(2)
    c.mkdir(0, "sub")
    c.walk(0, 3, "sub")
    c.renameat(0, "a.txt", 3, "b.txt")
    assert (share / "sub" / "b.txt").read_bytes() == data and not (share / "a.txt").exists()
    c.walk(3, 4, "b.txt")
    c.link(0, 4, "hard")
    assert os.stat(share / "hard").st_ino == os.stat(share / "sub" / "b.txt").st_ino
    assert c.getattr(4)["nlink"] == 2
    c.symlink(0, "soft", "sub/b.txt")
    assert os.readlink(share / "soft") == "sub/b.txt"
    c.walk(0, 5, "soft")
    assert c.readlink(5) == b"sub/b.txt"
    c.setattr(4, 0x1, mode=0o600)  # chmod
    assert os.stat(share / "hard").st_mode & 0o7777 == 0o600
    c.setattr(4, 0x8, size=10)  # truncate
    assert (share / "hard").read_bytes() == data[:10]
    c.rename(4, 0, "moved")  # Trename: the fid's own object
    assert (share / "moved").exists() and not (share / "sub" / "b.txt").exists()
    assert c.getattr(4)["size"] == 10
    c.unlinkat(0, "moved")
    c.unlinkat(0, "hard")
    with pytest.raises(P9Error) as e:
        c.unlinkat(0, "sub")  # a directory needs AT_REMOVEDIR
    assert e.value.errno in (errno.EISDIR, errno.EPERM)
    c.unlinkat(0, "sub", 0x200)
    assert sorted(os.listdir(share)) == ["soft"]


def test_readdir_of_a_big_directory(virtio_driver, share):
    names = {f"file-{i:04d}-{'x' * (i % 40)}" for i in range(1000)}
    for n in names:
        (share / n).write_bytes(b"")
    c = connect(virtio_driver, share)
    c.walk(0, 1)
    c.lopen(1, O_RDONLY | 0o200000)
    got = c.listdir(1)
    assert got[:2] == [b".", b".."]
    assert {n.decode() for n in got[2:]} == names and len(got) == 1002


def test_statfs_getattr_and_mknod(virtio_driver, share):
    c = connect(virtio_driver, share)
    st = c.statfs(0)
    assert st[0] == 0x01021997 and st[1] > 0
    attrs = c.getattr(0)
    assert attrs["qtype"] == 0x80 and attrs["ino"] == os.stat(share).st_ino
    c.mknod(0, "plain", 0o100644)
    assert (share / "plain").is_file()
    for mode in (0o020644, 0o060644, 0o010644, 0o140644):  # char, block device, FIFO, socket
        with pytest.raises(P9Error) as e:
            c.mknod(0, "dev", mode, 1, 3)
        assert e.value.errno == errno.EPERM
    assert not (share / "dev").exists()


def test_setuid_bits_are_never_set(virtio_driver, share):
    c = connect(virtio_driver, share)
    c.walk(0, 1)
    c.lcreate(1, "prog", O_RDWR, 0o4755)
    c.setattr(1, 0x1, mode=0o6755)
    assert os.stat(share / "prog").st_mode & 0o7777 == 0o755


def test_read_only_export_refuses_every_change(virtio_driver, share):
    (share / "f").write_bytes(b"keep")
    (share / "d").mkdir()
    c = connect(virtio_driver, share, ro=True)
    c.walk(0, 1, "f")
    c.walk(0, 2, "d")
    c.walk(0, 9)
    attempts = {
        "lcreate": lambda: c.lcreate(9, "new"),
        "open for write": lambda: c.lopen(1, O_WRONLY),
        "open with truncate": lambda: c.lopen(1, O_RDONLY | O_TRUNC),
        "mkdir": lambda: c.mkdir(0, "x"),
        "symlink": lambda: c.symlink(0, "l", "f"),
        "link": lambda: c.link(0, 1, "h"),
        "mknod": lambda: c.mknod(0, "n", 0o100644),
        "unlink": lambda: c.unlinkat(0, "f"),
        "rmdir": lambda: c.unlinkat(0, "d", 0x200),
        "renameat": lambda: c.renameat(0, "f", 0, "g"),
        "rename": lambda: c.rename(1, 0, "g"),
        "chmod": lambda: c.setattr(1, 0x1, mode=0o777),
        "truncate": lambda: c.setattr(1, 0x8, size=0),
        "xattrcreate": lambda: c.rpc(
            "xattrcreate", struct.pack("<I", 1) + b"\x05\x00user.x" + struct.pack("<QI", 1, 0)
        ),
    }
    for what, attempt in attempts.items():
        with pytest.raises(P9Error) as e:
            attempt()
        assert e.value.errno == errno.EROFS, what
    c.lopen(1, O_RDONLY)
    assert c.read(1, 0, 100) == b"keep"
    with pytest.raises(P9Error) as e:
        c.write(1, 0, b"x")
    assert e.value.errno == errno.EROFS
    assert sorted(os.listdir(share)) == ["d", "f"] and (share / "f").read_bytes() == b"keep"
    assert os.stat(share / "f").st_mode & 0o777 != 0o777


def test_reset_closes_every_fid(virtio_driver, share):
    c = connect(virtio_driver, share)
    before = len(os.listdir("/proc/self/fd"))
    for i in range(1, 50):
        c.walk(0, i)
    assert len(os.listdir("/proc/self/fd")) >= before + 49
    c.drv.init()  # the driver resets the device
    assert len(os.listdir("/proc/self/fd")) <= before


def test_getattr_of_a_file_from_before_1970(virtio_driver, share):
    (share / "old").write_bytes(b"x")
    os.utime(share / "old", ns=(-1_500_000_000, -86_400 * 10**9 + 7))
    c = connect(virtio_driver, share)
    c.walk(0, 1, "old")
    p = c.rpc("getattr", struct.pack("<IQ", 1, 0x7FF))
    p.p += 8 + 13 + 12 + 40  # valid, qid, mode uid gid, nlink rdev size blksize blocks
    atime, mtime = p.take("qQ"), p.take("qQ")
    assert atime == (-2, 500_000_000) and mtime == (-86_400, 7)  # seconds as two's complement
