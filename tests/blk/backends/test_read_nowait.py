"""HostFile.read_nowait where the file system refuses RWF_NOWAIT: asked once per file, not per request.

tmpfs refuses ``preadv2(RWF_NOWAIT)`` with EOPNOTSUPP on the kernels here (the KVM lab's 6.1 and the
host's); a disk image there paid one failed system call and a worker hand-off on every read. The
calls are counted by a wrapper around ``os.preadv`` that passes each call to the real one.
"""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
from typing import Any

import pytest
from vdm_blk.backends import open_disk
from vdm_blk.backends.hostfile import HostFile

from .helpers import make_raw, pattern

NOWAIT = getattr(os, "RWF_NOWAIT", 0)
SIZE = 1 << 20

pytestmark = pytest.mark.skipif(not NOWAIT, reason="this Python/kernel has no RWF_NOWAIT")


class Calls:
    """``os.preadv`` counted: how many calls asked RWF_NOWAIT, how many did not."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, refuse_nowait: bool = False) -> None:
        self.nowait = self.plain = 0
        real = os.preadv

        def preadv(fd: int, buffers: Any, offset: int, flags: int = 0) -> int:
            if flags & NOWAIT:
                self.nowait += 1
                if refuse_nowait:
                    raise OSError(errno.EOPNOTSUPP, os.strerror(errno.EOPNOTSUPP))
            else:
                self.plain += 1
            return real(fd, buffers, offset, flags)

        monkeypatch.setattr(os, "preadv", preadv)


def _refuses_nowait(directory: str) -> bool:
    fd, path = tempfile.mkstemp(dir=directory)
    try:
        os.write(fd, b"x" * 4096)
        os.preadv(fd, [bytearray(4096)], 0, NOWAIT)
        return False
    except OSError as e:
        return e.errno in (errno.EOPNOTSUPP, errno.EINVAL)
    finally:
        os.close(fd)
        os.unlink(path)


@pytest.fixture
def tmpfs_dir():
    base = "/dev/shm"
    if not os.path.isdir(base) or not os.access(base, os.W_OK):
        pytest.skip("no writable /dev/shm (tmpfs) here")
    if not _refuses_nowait(base):
        pytest.skip("tmpfs takes RWF_NOWAIT on this kernel (Linux 6.6+): nothing refused to remember")
    d = tempfile.mkdtemp(prefix="vdm-nowait-", dir=base)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def _read(disk: Any, offset: int, lengths: tuple[int, ...]) -> tuple[int | None, bytes]:
    bufs = [bytearray(n) for n in lengths]
    n = disk.readv_nowait(offset, [memoryview(b) for b in bufs])
    return n, b"".join(bufs)


def test_tmpfs_is_asked_once_and_its_reads_are_served_inline(tmpfs_dir, monkeypatch):
    path = make_raw(os.path.join(tmpfs_dir, "disk.raw"), SIZE)
    expected = bytes(pattern(SIZE, 7))
    with open(path, "r+b") as f:
        f.write(expected)
    disk = open_disk(path)
    try:
        calls = Calls(monkeypatch)
        for i in range(20):
            offset = (i * 37 % 200) * 4096
            n, data = _read(disk, offset, (4096, 512, 3584))
            assert n == 8192, f"read {i} at {offset} was not served inline"
            assert data == expected[offset:offset + 8192]
        assert calls.nowait == 1, "RWF_NOWAIT was asked again after tmpfs refused it"
        assert calls.plain == 20
    finally:
        disk.close()


def test_a_file_system_that_takes_nowait_is_asked_every_time(tmp_path, monkeypatch):
    if _refuses_nowait(str(tmp_path)):
        pytest.skip(f"{tmp_path}'s file system refuses RWF_NOWAIT: the other test covers it")
    path = make_raw(str(tmp_path / "disk.raw"), SIZE)
    expected = bytes(pattern(SIZE, 7))
    with open(path, "r+b") as f:
        f.write(expected)  # in the page cache: RWF_NOWAIT reads succeed
    disk = open_disk(path)
    try:
        calls = Calls(monkeypatch)
        for i in range(5):
            n, data = _read(disk, i * 65536, (65536,))
            assert (n, data) == (65536, expected[i * 65536:(i + 1) * 65536])
        assert (calls.nowait, calls.plain) == (5, 0)  # never a read that could block
    finally:
        disk.close()


def test_refusal_on_a_disk_file_system_sends_reads_to_a_worker_without_asking_again(tmp_path, monkeypatch):
    """A file system that refuses RWF_NOWAIT and may block (9p, FUSE, NFS) cannot be mounted here:
    the refusal is the wrapper's, on an ext4 file. read_nowait must not read plainly there (it
    could wait on the network), and must stop asking."""
    path = make_raw(str(tmp_path / "disk.raw"), SIZE)
    expected = bytes(pattern(SIZE, 7))
    with open(path, "r+b") as f:
        f.write(expected)
    f = HostFile(path, read_only=True)
    try:
        calls = Calls(monkeypatch, refuse_nowait=True)
        for i in range(10):
            buf = bytearray(4096)
            assert f.read_nowait([memoryview(buf)], i * 4096) is None  # "use a worker"
        assert (calls.nowait, calls.plain) == (1, 0)
        buf = bytearray(4096)
        assert f.preadv([memoryview(buf)], 8192) == 4096  # what the worker then does
        assert bytes(buf) == expected[8192:12288]
    finally:
        f.close()
