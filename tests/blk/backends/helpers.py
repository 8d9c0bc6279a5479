"""Helpers for the disk backend tests: qemu-img/qemu-io wrappers and image checks."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
from typing import Iterator

import pytest

QEMU_IMG = shutil.which("qemu-img")
QEMU_IO = shutil.which("qemu-io")

needs_qemu_img = pytest.mark.skipif(
    QEMU_IMG is None, reason="qemu-img is not installed (apt install qemu-utils)"
)
needs_qemu_io = pytest.mark.skipif(
    QEMU_IO is None, reason="qemu-io is not installed (apt install qemu-utils)"
)


def qemu_img(*args: str, ok: bool = True) -> subprocess.CompletedProcess:
    if QEMU_IMG is None:
        pytest.skip("qemu-img is not installed (apt install qemu-utils)")
    p = subprocess.run([QEMU_IMG, *args], capture_output=True, text=True)
    if ok and p.returncode != 0:
        raise AssertionError(f"qemu-img {' '.join(args)} failed ({p.returncode}): {p.stdout}{p.stderr}")
    return p


def qemu_io(path: str, *commands: str, fmt: str = "qcow2") -> str:
    if QEMU_IO is None:
        pytest.skip("qemu-io is not installed (apt install qemu-utils)")
    args = [QEMU_IO, "-f", fmt]
    for c in commands:
        args += ["-c", c]
    p = subprocess.run([*args, path], capture_output=True, text=True)
    assert p.returncode == 0 and "error" not in p.stdout.lower(), p.stdout + p.stderr
    return p.stdout


def create_qcow2(
    path: str, size: int, *opts: str, backing: str | None = None, backing_fmt: str = "raw"
) -> str:
    args = ["create", "-q", "-f", "qcow2"]
    if opts:
        args += ["-o", ",".join(opts)]
    if backing is not None:
        args += ["-b", backing, "-F", backing_fmt]
    qemu_img(*args, path, str(size))
    return path


def check_image(path: str, allow_leaks: bool = False) -> dict:
    """Run ``qemu-img check``; assert no corruptions (and no leaks unless allowed); return its report."""
    p = qemu_img("check", "--output=json", path, ok=False)
    assert p.returncode in (0, 3), f"qemu-img check failed ({p.returncode}): {p.stdout}{p.stderr}"
    report = json.loads(p.stdout)
    assert report.get("corruptions", 0) == 0, report
    assert report.get("check-errors", 0) == 0, report
    if not allow_leaks:
        assert report.get("leaks", 0) == 0, report
    return report


def assert_same(qcow2: str, raw: str) -> None:
    p = qemu_img("compare", "-f", "qcow2", "-F", "raw", qcow2, raw, ok=False)
    assert p.returncode == 0, f"qemu-img compare: {p.stdout}{p.stderr}"


def file_bytes(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def make_raw(path: str, size: int) -> str:
    with open(path, "wb") as f:
        f.truncate(size)
    return path


def pattern(n: int, seed: int) -> bytearray:
    """n bytes that differ per seed and per 512-byte block (cheaper than os.urandom)."""
    block = (seed.to_bytes(8, "little") * 64)[:512]
    out = bytearray(block * (n // 512))
    for i in range(0, n, 512):
        out[i : i + 8] = (seed * 1000003 + i).to_bytes(8, "little")
    return out


@contextlib.contextmanager
def loop_device(backing_file: str) -> Iterator[str]:
    """A loop block device over ``backing_file``; skips the test without root or loop devices."""
    if os.geteuid() != 0 or not os.path.exists("/dev/loop-control") or shutil.which("losetup") is None:
        pytest.skip("needs root, losetup and loop devices")
    p = subprocess.run(["losetup", "-f", "--show", backing_file], capture_output=True, text=True)
    if p.returncode != 0:
        pytest.skip(f"losetup failed: {p.stderr.strip()}")
    dev = p.stdout.strip()
    try:
        yield dev
    finally:
        subprocess.run(["losetup", "-d", dev], capture_output=True)


__all__ = [
    "QEMU_IMG",
    "assert_same",
    "check_image",
    "create_qcow2",
    "file_bytes",
    "loop_device",
    "make_raw",
    "needs_qemu_img",
    "needs_qemu_io",
    "pattern",
    "qemu_img",
    "qemu_io",
]
