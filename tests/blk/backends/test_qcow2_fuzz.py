"""Damaged images: whatever the bytes, vdm answers with DiskError/OSError, never another exception."""

from __future__ import annotations

import random

import pytest
from vdm_blk.backends import DiskError, open_disk

from .helpers import create_qcow2, qemu_img, qemu_io


@pytest.mark.parametrize("compressed", [False, True])
def test_random_byte_damage(tmp_path, compressed):
    img = create_qcow2(str(tmp_path / "src.qcow2"), 4 << 20, "cluster_size=4096")
    qemu_io(img, "write -P 1 0 1M", "write -z 2M 64k", "write -P 3 3M 100k")
    if compressed:
        qemu_img("convert", "-c", "-O", "qcow2", "-o", "cluster_size=4096", img, str(tmp_path / "c.qcow2"))
        img = str(tmp_path / "c.qcow2")
    with open(img, "rb") as f:
        original = f.read()
    rng = random.Random(1234 + compressed)
    target = str(tmp_path / "damaged.qcow2")
    outcomes = {"refused": 0, "served": 0, "io-error": 0}
    for _ in range(100):
        damaged = bytearray(original)
        for _ in range(rng.choice((1, 2, 8))):
            damaged[rng.randrange(0, min(len(damaged), 40000))] = rng.randrange(256)
        with open(target, "wb") as f:
            f.write(damaged)
        try:
            disk = open_disk(target, format="qcow2")
        except DiskError:
            outcomes["refused"] += 1
            continue
        try:
            buf = bytearray(disk.size)
            disk.readv(0, [memoryview(buf)])
            disk.writev(0, [memoryview(bytearray(8192))])
            disk.writev(2 << 20, [memoryview(bytearray(512))])
            disk.discard(3 << 20, 65536)
            disk.flush()
            outcomes["served"] += 1
        except (DiskError, OSError):
            outcomes["io-error"] += 1
        finally:
            try:
                disk.close()
            except (DiskError, OSError):
                pass
    assert outcomes["refused"] and outcomes["served"], outcomes
