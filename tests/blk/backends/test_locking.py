"""vdm and QEMU keep each other from writing the same image (QEMU's lock bytes)."""

from __future__ import annotations

import subprocess
import time

import pytest
from vdm_blk.backends import DiskError, open_disk

from .helpers import QEMU_IO, create_qcow2, make_raw, qemu_img


def test_qemu_cannot_open_an_image_vdm_writes(tmp_path):
    img = create_qcow2(str(tmp_path / "l.qcow2"), 1 << 20)
    disk = open_disk(img)
    p = qemu_img("info", img, ok=False)
    assert p.returncode != 0 and "lock" in p.stderr
    qemu_img("info", "-U", img)  # sharing explicitly still works
    disk.close()
    qemu_img("info", img)


def test_two_writers_in_vdm_refused_readers_share(tmp_path):
    path = make_raw(str(tmp_path / "l.raw"), 1 << 20)
    first = open_disk(path)
    with pytest.raises(DiskError, match="in use by another process"):
        open_disk(path)
    with pytest.raises(DiskError, match="in use by another process"):
        open_disk(path, read_only=True)
    first.close()
    a = open_disk(path, read_only=True)
    b = open_disk(path, read_only=True)
    with pytest.raises(DiskError, match=r"keeps writers out.*open it read-only too"):
        open_disk(path)
    a.close()
    b.close()
    open_disk(path).close()


def test_vdm_refuses_an_image_qemu_writes(tmp_path):
    if QEMU_IO is None:
        pytest.skip("qemu-io is not installed (apt install qemu-utils)")
    img = create_qcow2(str(tmp_path / "q.qcow2"), 1 << 20)
    proc = subprocess.Popen(
        [QEMU_IO, "-f", "qcow2", img],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 10
        while True:  # wait until qemu-io holds its locks
            try:
                open_disk(img, read_only=True).close()
            except DiskError as e:
                assert "in use by another process" in str(e)
                break
            assert time.monotonic() < deadline, "qemu-io never locked the image"
            time.sleep(0.05)
        with pytest.raises(DiskError, match="in use by another process that holds its write"):
            open_disk(img)
    finally:
        proc.communicate("quit\n", timeout=10)
    open_disk(img).close()
