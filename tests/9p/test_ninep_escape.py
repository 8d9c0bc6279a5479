"""A hostile guest against the export boundary: nothing outside the shared directory is reachable.

Every test has a directory ``outside`` next to the share holding ``secret``; after each attack the
test checks that nothing outside changed and that no reply carried outside data or an outside
inode. The device is driven through vdm.testing's driver, as a guest would drive it.
"""

from __future__ import annotations

import errno
import logging
import os
import struct

import pytest
from ninep_client import Client, P9Error
from vdm_9p.config import NinepConfig
from vdm_9p.device import NinepDevice

O_RDONLY, O_RDWR = 0, 2
SECRET = b"host secret"


@pytest.fixture(params=["openat2", "fallback"])
def env(request, tmp_path, virtio_driver, monkeypatch):
    """A share, an ``outside`` beside it, and a client attached to the share's root. Run with the
    kernel's openat2 and with the O_NOFOLLOW walk used where openat2 is missing."""
    import vdm_9p.export

    monkeypatch.setattr(vdm_9p.export, "_have_openat2", None if request.param == "openat2" else False)
    share, outside = tmp_path / "share", tmp_path / "outside"
    share.mkdir()
    outside.mkdir()
    (outside / "secret").write_bytes(SECRET)
    (share / "f").write_bytes(b"inside")
    (share / "sub").mkdir()
    drv = virtio_driver(NinepDevice(NinepConfig(path=str(share), tag="t")), ram_size=32 << 20)
    drv.init()
    c = Client(drv)
    c.version()
    c.attach(0)
    before = snapshot(tmp_path / "outside")
    yield c, share, outside
    assert snapshot(tmp_path / "outside") == before, "something outside the share changed"
    assert not drv.needs_reset


def snapshot(d) -> dict:
    out = {}
    for root, dirs, files in os.walk(d):
        for n in dirs + files:
            p = os.path.join(root, n)
            st = os.lstat(p)
            out[p] = (
                st.st_mode,
                st.st_size,
                st.st_nlink,
                open(p, "rb").read() if os.path.isfile(p) else None,
            )
    return out


def errno_of(call, *args, **kw) -> int:
    """The errno of the Rlerror that ``call(*args, **kw)`` gets (it must get one)."""
    with pytest.raises(P9Error) as e:
        call(*args, **kw)
    return e.value.errno


def test_dotdot_walks_stop_at_the_root(env):
    c, share, _outside = env
    root_ino = os.stat(share).st_ino
    assert [q[2] for q in c.walk(0, 1, "..")] == [root_ino]
    assert [q[2] for q in c.walk(0, 2, "sub", "..", "..", "..")] == [os.stat(share / "sub").st_ino] + [
        root_ino
    ] * 3
    # the "outside" next to the share is not reachable by name from its root
    # (a walk that fails after its first name returns the qids it got: here only the root's)
    assert [q[2] for q in c.walk(0, 3, "..", "outside", "secret")] == [root_ino]
    # partial walks: the qids up to the failing name come back, and "outside" is never one
    qids = c.walk(0, 4, "..", "..", "outside", "secret")
    assert [q[2] for q in qids] == [root_ino, root_ino]


def test_absolute_and_dotdot_symlinks_are_never_followed(env):
    c, share, outside = env
    os.symlink(str(outside), share / "abs")
    os.symlink(str(outside / "secret"), share / "abs_file")
    os.symlink("..", share / "up")
    os.symlink("../outside/secret", share / "rel")
    for name in ("abs", "up"):
        qids = c.walk(0, 1, name, "secret")  # stops at the link: only one qid comes back
        assert len(qids) == 1 and qids[0][0] == 0x02  # QTSYMLINK
    for name in ("abs_file", "rel"):
        c.walk(0, 2, name)
        assert errno_of(c.lopen, 2, O_RDONLY) == errno.ELOOP
        assert errno_of(c.read, 2, 0, 100) == errno.EBADF
        assert c.getattr(2)["size"] == len(os.readlink(share / name))  # the link's own size
        assert errno_of(c.setattr, 2, 0x1, mode=0o777) == errno.EOPNOTSUPP
        assert errno_of(c.setattr, 2, 0x8, size=0) == errno.EOPNOTSUPP
        c.link(0, 2, name + ".hard")  # a hard link to the symlink itself, not its target
        assert os.path.islink(share / (name + ".hard"))
        c.clunk(2)
    # a symlink is not a directory to create in, rename into, or list
    c.walk(0, 3, "abs")
    assert errno_of(c.lcreate, 3, "planted") == errno.ENOTDIR
    assert errno_of(c.mkdir, 3, "planted") == errno.ENOTDIR
    assert errno_of(c.renameat, 0, "f", 3, "f") == errno.ENOTDIR
    assert errno_of(c.lopen, 3, 0o200000) == errno.ELOOP


def test_symlinks_made_by_the_guest_then_walked(env):
    c, _share, outside = env
    c.symlink(0, "esc", str(outside))
    c.symlink(0, "esc2", "../outside/secret")
    assert len(c.walk(0, 1, "esc", "secret")) == 1
    # creating a file "through" the link: O_CREAT|O_NOFOLLOW on the link itself
    c.walk(0, 2)
    assert errno_of(c.lcreate, 2, "esc2", O_RDWR) in (errno.ELOOP, errno.EEXIST)
    c.walk(0, 3, "esc2")
    assert errno_of(c.lopen, 3, O_RDWR) == errno.ELOOP


def test_names_with_slash_nul_or_dots(env):
    c, share, _outside = env
    for bad in ("../outside", "/etc", "sub/../..", "a\0b", "", "x" * 256):
        assert errno_of(c.walk, 0, 1, bad) == errno.EINVAL, bad
        c.walk(0, 2)
        assert errno_of(c.lcreate, 2, bad) == errno.EINVAL, bad
        c.clunk(2)
        assert errno_of(c.mkdir, 0, bad) == errno.EINVAL, bad
        assert errno_of(c.symlink, 0, bad, "x") == errno.EINVAL, bad
    for bad in ("..", "."):
        assert errno_of(c.mkdir, 0, bad) == errno.EINVAL
        assert errno_of(c.unlinkat, 0, bad, 0x200) == errno.EINVAL
    assert sorted(os.listdir(share)) == ["f", "sub"]


def test_rename_and_link_out_of_the_tree(env):
    c, share, _outside = env
    c.walk(0, 1, "f")
    for name in ("../outside/f", "../../f", "/tmp/f"):
        assert errno_of(c.renameat, 0, "f", 0, name) == errno.EINVAL
        assert errno_of(c.rename, 1, 0, name) == errno.EINVAL
        assert errno_of(c.link, 0, 1, name) == errno.EINVAL
    assert errno_of(c.renameat, 0, "../outside/secret", 0, "stolen") == errno.EINVAL
    assert errno_of(c.rename, 0, 0, "x") == errno.EBUSY  # the root cannot be renamed
    # a hard link to a file outside: no fid can name one (the walk to it fails), so nothing to link
    assert [q[2] for q in c.walk(0, 2, "..", "outside")] == [os.stat(share).st_ino]
    assert not (share / "stolen").exists()


def test_dotdot_after_a_directory_was_swapped_for_a_symlink(env):
    c, share, outside = env
    (share / "sub" / "deep").mkdir()
    c.walk(0, 1, "sub", "deep")
    c.renameat(0, "sub", 0, "gone")  # the fid's remembered path follows the rename
    assert c.walk(1, 2, "..")[0][2] == os.stat(share / "gone").st_ino
    os.rename(share / "gone", share / "moved")  # the host moves it: the path goes stale
    os.symlink(str(outside), share / "gone")  # ... and puts a symlink where it was
    assert errno_of(c.walk, 1, 3, "..") in (errno.ELOOP, errno.ENOTDIR)


def test_host_fifos_and_devices_are_not_opened(env):
    c, share, _outside = env
    os.mkfifo(share / "fifo")
    c.walk(0, 1, "fifo")
    assert errno_of(c.lopen, 1, O_RDONLY) == errno.EPERM  # and it did not block


def test_huge_counts_and_lengths(env):
    c, share, _outside = env
    c.walk(0, 1, "f")
    c.lopen(1, O_RDWR)
    assert c.read(1, 0, 0xFFFFFFFF) == b"inside"
    assert c.read(1, 1 << 62, 100) == b""
    c.walk(0, 2)
    c.lopen(2, 0o200000)
    assert [e[0] for e in c.readdir(2, 0, 0xFFFFFFFF)][:2] == [b".", b".."]
    assert c.readdir(2, 0xFFFFFFFFFFFFFFFF, 100) == []
    # Twrite claiming more data than the message holds
    assert errno_of(lambda: c.rpc("write", struct.pack("<IQI", 1, 0, 0xFFFFFFFF) + b"abc")) == errno.EINVAL
    # Twalk with 65535 names / a string longer than the message
    assert errno_of(lambda: c.rpc("walk", struct.pack("<IIH", 0, 5, 0xFFFF))) == errno.EINVAL
    assert errno_of(lambda: c.rpc("walk", struct.pack("<IIHH", 0, 5, 1, 0xFFFF) + b"ab")) == errno.EINVAL
    assert errno_of(lambda: c.rpc("write", struct.pack("<IQI", 1, 1 << 63, 1) + b"x")) in (
        errno.EINVAL,
        errno.EFBIG,
    )
    assert (share / "f").read_bytes() == b"inside"


def test_fid_table_is_bounded(env, tmp_path, virtio_driver):
    _c, share, _outside = env
    dev = NinepDevice(NinepConfig(path=str(share), tag="t", max_fids=16))
    drv = virtio_driver(dev)
    drv.init()
    c2 = Client(drv)
    c2.version()
    c2.attach(0)
    for i in range(1, 16):
        c2.walk(0, i)
    assert errno_of(c2.walk, 0, 99) == errno.ENFILE
    assert errno_of(c2.walk, 0, 1) == errno.EEXIST
    assert errno_of(c2.clunk, 12345) == errno.EBADF


def test_malformed_messages_get_rlerror(env, caplog):
    c, _share, _outside = env

    def reply(msg: bytes) -> tuple:
        r = c.raw(msg)
        return struct.unpack_from("<IBHI", r)

    assert reply(struct.pack("<IBH", 100, 110, 7) + b"\0" * 4) == (11, 7, 7, errno.EINVAL)  # size lies
    assert reply(struct.pack("<IBH", 7, 250, 8)) == (11, 7, 8, errno.EOPNOTSUPP)  # unknown type
    assert reply(struct.pack("<IBH", 7, 110, 9)) == (11, 7, 9, errno.EINVAL)  # no body
    assert reply(struct.pack("<IBH", 9, 6, 9) + b"ab") == (11, 7, 9, errno.EOPNOTSUPP)  # a Tlerror
    with caplog.at_level(logging.WARNING):
        assert c.walk(0, 1, "f")  # the server still works
    assert not [r for r in caplog.records if r.exc_info]


@pytest.mark.parametrize("what", ["short header", "no reply room"])
def test_unframed_requests_fail_the_device_with_one_line(tmp_path, virtio_driver, caplog, what):
    (tmp_path / "s").mkdir()
    drv = virtio_driver(NinepDevice(NinepConfig(path=str(tmp_path / "s"), tag="t")))
    drv.init()
    with caplog.at_level(logging.WARNING):
        if what == "short header":
            drv.submit(0, out=[b"\x07\0\0"], in_lens=[64])
        else:
            drv.submit(0, out=[struct.pack("<IBH", 7, 120, 1)], in_lens=[4])
    assert drv.needs_reset
    lines = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(lines) == 1 and not lines[0].exc_info
