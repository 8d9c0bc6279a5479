"""vdm-blk's compiled serve step (vdm_blk.fastserve + vdm.fastpath's serve_batch) against the
Python path, the reference.

The same random scripts of requests -- plain reads and writes (direct and through indirect
tables), and everything the step must leave to Python: other types, split headers, 2-byte status
buffers, lengths not a multiple of 512, ranges past the end, empty data, large writes -- run on two
devices over two copies of one raw image, one with the compiled step and one without. A user sees
the same on both: each request's used length and the bytes in its writable buffers, the image's
bytes afterwards, the device's counters (``vdm ctl stats``) and the queue's. Hostile chains (a
buffer outside guest RAM, a loop) after plain ones: the same completions, then the same failure.
"""

from __future__ import annotations

import os
import random
import struct
import tempfile
from pathlib import Path

import pytest
import vdm.fastpath as core_fastpath
from vdm.device import F_EVENT_IDX, F_INDIRECT_DESC
from vdm.virtqueue import Virtqueue
from vdm_blk import fastserve
from vdm_blk.backends.raw import RawDisk
from vdm_blk.config import BlkConfig
from vdm_blk.device import T_FLUSH, T_GET_ID, T_IN, T_OUT, BlkDevice

pytestmark = pytest.mark.skipif(
    not fastserve.ACTIVE, reason=f"vdm-blk's compiled serve step is not active here: {fastserve.STATUS}"
)

SIZE = 8 << 20
SECTORS = SIZE // 512
SLOT = 160  # sectors: the requests of one batch touch disjoint slots (the order of requests in flight
#             together is the device's choice on either path), the largest write is 144 sectors


def hdr(rtype: int, sector: int) -> bytes:
    return struct.pack("<IIQ", rtype, 0, sector)


def split(n: int, rng: random.Random) -> list[int]:
    """``n`` bytes as 1-3 buffers."""
    if n < 2 or rng.random() < 0.5:
        return [n]
    cut = sorted(rng.sample(range(1, n), min(n - 1, rng.randint(1, 2))))
    return [b - a for a, b in zip([0, *cut], [*cut, n])]


def request(rng: random.Random, slot: int) -> tuple[list[bytes], list[int]]:
    """One request in ``slot``: (readable buffers, writable lengths)."""
    kind = rng.random()
    sector = slot * SLOT + rng.randrange(16)
    if rng.random() < 0.2:
        sector = rng.choice([SECTORS - 8, SECTORS - 1, SECTORS, SECTORS + 5])
    n = rng.choice([512, 4096, 4096, 4096, 8192, 1000, 0])
    if kind < 0.4:  # reads, mostly plain
        lens = split(n, rng) if n else []
        return [hdr(T_IN, sector)], [*lens, rng.choice([1, 1, 1, 1, 2])]
    if kind < 0.75:  # writes, mostly plain, some larger than the inline limit
        if rng.random() < 0.05:
            n = 72 << 10
        data = rng.randbytes(n)
        bufs, at = [], 0
        for k in split(n, rng) if n else []:
            bufs.append(data[at : at + k])
            at += k
        h = hdr(T_OUT, sector)
        head = [h] if rng.random() < 0.9 else [h[:8], h[8:]]  # (a split header: Python's)
        return [*head, *bufs], [rng.choice([1, 1, 1, 1, 2])]
    if kind < 0.82:
        return [hdr(T_IN, sector), b"\0" * 512], [512, 1]  # a read with a readable data buffer
    if kind < 0.88:
        return [hdr(T_FLUSH, 0)], [1]
    if kind < 0.94:
        return [hdr(T_GET_ID, 0)], [20, 1]
    return [hdr(99, sector)], [512, 1]  # an unknown type


def image(path, seed: int) -> None:
    path.write_bytes(random.Random(seed).randbytes(SIZE))


def device(tmp_path, name: str, virtio_driver, compiled: bool, features: int):
    (tmp_path / name).mkdir()
    path = tmp_path / name / "disk.img"  # (the same name: GET_ID answers it)
    image(path, 7)
    disk = RawDisk(str(path))
    if not compiled:
        disk.serve_step = lambda: None  # the Python path, as with VDM_FASTPATH=0
    dev = BlkDevice(disk, BlkConfig(path=str(path)))
    drv = virtio_driver(dev)
    drv.init(exclude=features)
    return drv, path


def run_script(drv, seed: int, batches: int) -> list[tuple[int, bytes]]:
    rng = random.Random(seed)
    results = []
    for _ in range(batches):
        reqs = [request(rng, slot) for slot in rng.sample(range(SECTORS // SLOT - 1), rng.randint(1, 40))]
        indirect = drv.features >> F_INDIRECT_DESC & 1
        heads = [drv.post(0, out, ins, indirect=bool(indirect) and rng.random() < 0.5) for out, ins in reqs]
        drv.kick(0)
        got = {u.head: u for u in drv.wait(0, len(heads))}
        results += [(got[h].written, got[h].data) for h in heads]
    return results


def seen(drv, path) -> dict:
    q = drv.device.queues[0]
    return {
        "stats": dict(drv.device.stats),
        "queue": (q.requests, q.bytes_read, q.bytes_written, q.errors, sum(q.latency), q.descriptors_walked),
        "image": path.read_bytes(),
        "needs_reset": drv.needs_reset,
    }


@pytest.mark.parametrize(
    "exclude", [0, 1 << F_EVENT_IDX, 1 << F_INDIRECT_DESC], ids=["all", "no-event-idx", "no-indirect"]
)
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_compiled_step_serves_as_python_does(tmp_path, virtio_driver, monkeypatch, seed, exclude):
    _compare(tmp_path, virtio_driver, monkeypatch, seed, exclude)


def test_on_tmpfs_too(virtio_driver, monkeypatch):
    """A file system that may refuse RWF_NOWAIT (tmpfs before Linux 6.6, and here): the step asks
    once, then reads plainly, as HostFile.read_nowait does."""
    if not os.path.isdir("/dev/shm"):
        pytest.skip("no /dev/shm (tmpfs) here")
    with tempfile.TemporaryDirectory(dir="/dev/shm", prefix="vdm-fastserve-") as tmp:
        _compare(Path(tmp), virtio_driver, monkeypatch, 4, 0)


def _compare(tmp_path, virtio_driver, monkeypatch, seed: int, exclude: int) -> None:
    served = []
    real = Virtqueue._serve_compiled  # (serve_compiled and serve_compiled_end both)

    def spy(self, fn, ctx, end):
        got = real(self, fn, ctx, end)
        served.append(sum(got[0]) if got is not None else 0)
        return got

    monkeypatch.setattr(Virtqueue, "_serve_compiled", spy)
    py, py_path = device(tmp_path, "python.img", virtio_driver, False, exclude)
    want = run_script(py, seed, 20)
    assert not served  # the Python device never asked for the step
    c, c_path = device(tmp_path, "compiled.img", virtio_driver, True, exclude)
    got = run_script(c, seed, 20)
    assert sum(served) > 30, "the compiled step served (almost) nothing: the test compares nothing"
    assert got == want
    assert seen(c, c_path) == seen(py, py_path)


def test_hostile_chain_after_plain_ones_fails_the_device_the_same_way(tmp_path, virtio_driver):
    def run(compiled: bool, name: str):
        drv, path = device(tmp_path, name, virtio_driver, compiled, 0)
        heads = [drv.post(0, [hdr(T_IN, 8 * k)], [4096, 1]) for k in range(3)]
        bad = drv.post(0, [hdr(T_IN, 0)], [4096, 1])
        q = drv.queues[0]
        data_idx = q.read_desc(bad)[3]
        _, dlen, dflags, dnext = q.read_desc(data_idx)
        q.write_desc(data_idx, drv.ram.end + 4096, dlen, dflags, dnext)  # outside guest RAM
        drv.post(0, [hdr(T_IN, 0)], [4096, 1])
        drv.kick(0)
        used = {u.head: (u.written, u.data) for u in drv.wait(0, 3)}
        return [used.get(h) for h in heads], seen(drv, path)

    assert run(True, "c.img") == run(False, "p.img")
    assert run(True, "c2.img")[1]["needs_reset"]


def test_descriptor_loop_is_left_to_the_python_walk(tmp_path, virtio_driver):
    def run(compiled: bool, name: str):
        drv, path = device(tmp_path, name, virtio_driver, compiled, 0)
        first = drv.post(0, [hdr(T_IN, 0)], [512, 1])
        bad = drv.post(0, [hdr(T_IN, 8)], [512, 1])
        q = drv.queues[0]
        nxt = q.read_desc(bad)[3]
        daddr, dn, df, _ = q.read_desc(nxt)
        q.write_desc(nxt, daddr, dn, df | 1, bad)  # data -> header: a loop
        drv.kick(0)
        used = drv.wait(0, 1)
        return [(u.head == first, u.written, u.data) for u in used], seen(drv, path)

    c, p = run(True, "c.img"), run(False, "p.img")
    assert c == p and c[1]["needs_reset"]


def test_status_says_which_path():
    assert fastserve.STATUS == "compiled"
    assert core_fastpath.ACTIVE
