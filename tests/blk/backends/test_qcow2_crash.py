"""Crash safety: a writer killed with SIGKILL at random points leaves no corruption behind.

After each kill: ``qemu-img check`` finds no corruption (leaks are allowed: clusters allocated
or freed since the last flush, as documented in ``vdm_blk.backends.qcow2``), and everything
written before the last completed flush reads back; what was begun after it reads either as
before or as written.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
import time

import pytest
from vdm_blk.backends import open_disk

from .crash_child import pattern
from .helpers import check_image, create_qcow2, needs_qemu_img, qemu_img, qemu_io

CHILD = os.path.join(os.path.dirname(__file__), "crash_child.py")
SIZE = 32 << 20


def _read_all(path: str) -> bytearray:
    disk = open_disk(path, read_only=True)
    buf = bytearray(disk.size)
    disk.readv(0, [memoryview(buf)])
    disk.close()
    return buf


def _run_and_kill(path: str, seed: int, delay: float, tiny_caches: bool) -> list[str]:
    proc = subprocess.Popen(
        [sys.executable, CHILD, path, str(seed), "tiny-caches" if tiny_caches else "normal"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)  # type: ignore[arg-type]
    reader.start()
    deadline = time.monotonic() + 20
    while not lines and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.01)
    assert lines and lines[0] == "READY\n", (
        f"child did not start: {proc.stderr.read() if proc.stderr else ''}"
    )
    time.sleep(delay)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    reader.join(10)
    err = proc.stderr.read() if proc.stderr else ""
    assert proc.returncode == -signal.SIGKILL, f"child died on its own: {err}"
    return [ln.strip() for ln in lines[1:] if ln.endswith("\n")]


@needs_qemu_img
@pytest.mark.parametrize(
    "cluster_size,tiny_caches,snapshot", [(512, False, False), (512, True, False), (65536, False, True)]
)
def test_sigkill_at_random_points(tmp_path, cluster_size, tiny_caches, snapshot):
    img = create_qcow2(str(tmp_path / "crash.qcow2"), SIZE, f"cluster_size={cluster_size}")
    # a new seed each run covers new kill points; VDM_CRASH_SEED replays one
    seed = int(os.environ.get("VDM_CRASH_SEED", time.time_ns() % 1_000_000))
    rng = random.Random(seed)
    state = bytearray(SIZE)  # what the image held after the previous round
    if snapshot:
        # an internal snapshot shares every cluster written so far; it must come through intact
        qemu_io(img, f"write -P 0x6b 0 {SIZE // 4}")
        qemu_img("snapshot", "-c", "keep", img)
        state[: SIZE // 4] = b"\x6b" * (SIZE // 4)
        snap_raw = str(tmp_path / "snap.raw")
    flushes_seen = 0
    for rnd in range(3 if tiny_caches else 4):
        lines = _run_and_kill(img, seed * 10 + rnd, rng.uniform(0.1, 0.5), tiny_caches)
        last_f = max((i for i, ln in enumerate(lines) if ln == "F"), default=-1)
        flushes_seen += last_f >= 0
        expected = bytearray(state)
        uncertain: dict[int, list[bytes]] = {}  # sector -> acceptable contents
        for i, ln in enumerate(lines):
            if not ln.startswith("B "):
                continue
            _, kind, off_s, n_s, seed_s = ln.split()
            off, n = int(off_s), int(n_s)
            data = pattern(n, int(seed_s)) if kind == "W" else bytes(n)
            if i < last_f:
                expected[off : off + n] = data
                continue
            for s in range(off // 512, (off + n) // 512):
                uncertain.setdefault(s, [bytes(expected[s * 512 : s * 512 + 512])]).append(
                    bytes(data[s * 512 - off : s * 512 - off + 512])
                )
        try:
            report = check_image(img, allow_leaks=True)
        except AssertionError as e:
            raise AssertionError(f"seed {seed} round {rnd}: {e}") from None
        actual = _read_all(img)
        for s, choices in uncertain.items():
            got = bytes(actual[s * 512 : s * 512 + 512])
            assert got in choices, (
                f"seed {seed} round {rnd}: sector {s} holds neither the old nor a new content"
            )
            expected[s * 512 : s * 512 + 512] = got
        assert actual == expected, (
            f"seed {seed} round {rnd}: data acknowledged before the last flush was lost"
        )
        state = actual
        if snapshot:
            qemu_img("convert", "-f", "qcow2", "-l", "snapshot.name=keep", "-O", "raw", img, snap_raw)
            with open(snap_raw, "rb") as f:
                snap = f.read()
            assert snap[: SIZE // 4] == b"\x6b" * (SIZE // 4) and snap[SIZE // 4 :] == bytes(
                SIZE - SIZE // 4
            ), f"seed {seed} round {rnd}: the snapshot changed"
        if report.get("leaks"):
            # leaks are harmless; reclaim them now and then so later rounds start from a clean image
            if rnd % 2:
                qemu_img("check", "-q", "-r", "leaks", img, ok=False)
                check_image(img)
    assert flushes_seen >= 2, "the child should have completed flushes in most rounds"
