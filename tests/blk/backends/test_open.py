"""open_disk: format choice, the format registry for third-party backends."""

from __future__ import annotations

from typing import Sequence

import pytest
from vdm_blk.backends import (
    DiskBackend,
    DiskError,
    Qcow2Disk,
    RawDisk,
    formats,
    open_disk,
    probe_format,
    register_format,
)

from .helpers import create_qcow2, make_raw


class ZeroDisk(DiskBackend):
    """A read-only disk of zeros whose 'image' is a text file holding its size (a test format)."""

    supports_discard = False
    supports_write_zeroes = False

    def __init__(self, path: str, read_only: bool) -> None:
        with open(path) as f:
            self.size = int(f.read().split()[1])
        self.read_only = True

    def readv(self, offset: int, buffers: Sequence[memoryview]) -> int:
        self.check_range(offset, sum(len(b) for b in buffers))
        for b in buffers:
            b[:] = bytes(len(b))
        return sum(len(b) for b in buffers)

    def writev(self, offset, buffers):
        self.check_range(offset, sum(len(b) for b in buffers), write=True)
        return 0

    def flush(self):
        pass

    def discard(self, offset, length):
        self.check_range(offset, length, write=True)

    def write_zeroes(self, offset, length, unmap):
        self.check_range(offset, length, write=True)

    def close(self):
        pass


def test_auto_picks_qcow2_by_magic_and_raw_otherwise(tmp_path):
    q = create_qcow2(str(tmp_path / "a.img"), 1 << 20)  # the name says nothing
    r = make_raw(str(tmp_path / "b.qcow2"), 1 << 20)
    assert probe_format(q) == "qcow2" and probe_format(r) == "raw"
    dq, dr = open_disk(q), open_disk(r)
    assert isinstance(dq, Qcow2Disk) and isinstance(dr, RawDisk)
    dq.close()
    dr.close()
    # explicit raw on a qcow2 file shows its bytes
    d = open_disk(q, format="raw", read_only=True)
    out = bytearray(512)
    d.readv(0, [memoryview(out)])
    assert out[:4] == b"QFI\xfb"
    d.close()


def test_a_registered_format_is_probed_and_opened(tmp_path):
    if "zero" not in formats():
        register_format(
            "zero",
            lambda path, *, read_only, direct, writethrough, open_backing: ZeroDisk(path, read_only),
            probe=lambda head: head.startswith(b"ZERODISK "),
        )
    with pytest.raises(ValueError, match="already registered"):
        register_format("zero", lambda *a, **k: None)
    path = tmp_path / "z.img"
    path.write_text("ZERODISK 1048576\n")
    disk = open_disk(str(path))
    assert isinstance(disk, ZeroDisk) and disk.size == 1 << 20
    buf = bytearray(b"x" * 1024)
    disk.readv(4096, [memoryview(buf)])
    assert buf == bytes(1024)
    with pytest.raises(DiskError, match="read-only"):
        disk.writev(0, [memoryview(buf)])
    with pytest.raises(DiskError, match="unknown format 'vmdk'; use one of auto, raw, qcow2, zero"):
        open_disk(str(path), format="vmdk")
