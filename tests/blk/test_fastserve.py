"""vdm-blk's compiled serve step (vdm_blk.fastserve + vdm.fastpath's serve_batch) against the
Python path, the reference.

The same random scripts of requests -- plain reads and writes (direct and through indirect
tables), and everything the step must leave to Python: other types, split headers, 2-byte status
buffers, lengths not a multiple of 512, ranges past the end, empty data, large writes -- run on two
devices over two copies of one raw image, one with the compiled step and one without. A user sees
the same on both: each request's used length and the bytes in its writable buffers, the image's
bytes afterwards, the device's counters (``vdm ctl stats``) and the queue's. Hostile chains (a
buffer outside guest RAM, a loop) after plain ones: the same completions, then the same failure.

qcow2 images (the step's map of clusters the image found allocated): the same scripts plus
discards, write zeroes and flushes -- which change or free mapped clusters, so the map is cleared
under the I/O lock's exclusive side -- on two copies of one qcow2 image; what the guest sees is
compared, and the images read the same and pass ``qemu-img check``. A hand-over (inactivate) stops
the step; a corrupt L2 entry onto metadata is never served by it.
"""

from __future__ import annotations

import os
import random
import struct
import tempfile
import threading
import time
from pathlib import Path

import pytest
import vdm.fastpath as core_fastpath
from vdm.device import F_EVENT_IDX, F_INDIRECT_DESC
from vdm.virtqueue import Virtqueue
from vdm_blk import fastserve
from vdm_blk.backends import open_disk
from vdm_blk.backends.raw import RawDisk
from vdm_blk.config import BlkConfig
from vdm_blk.device import T_DISCARD, T_FLUSH, T_GET_ID, T_IN, T_OUT, T_WRITE_ZEROES, BlkDevice

from tests.blk.backends.helpers import check_image, needs_qemu_img, qemu_img

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


def count_served(monkeypatch) -> list[int]:
    """A list that gets, per call of the compiled step (serve_compiled and serve_compiled_end both),
    the number of requests it served."""
    served: list[int] = []
    real = Virtqueue._serve_compiled

    def spy(self, fn, ctx, end):
        got = real(self, fn, ctx, end)
        served.append(sum(got[0]) if got is not None else 0)
        return got

    monkeypatch.setattr(Virtqueue, "_serve_compiled", spy)
    return served


def _compare(tmp_path, virtio_driver, monkeypatch, seed: int, exclude: int) -> None:
    served = count_served(monkeypatch)
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


# ---- qcow2 --------------------------------------------------------------------------------------


def qcow2_request(rng: random.Random, slot: int, ranges: bool) -> tuple[list[bytes], list[int]]:
    """``request``, or (``ranges``) a discard / write zeroes of part of the slot (clusters of
    4 KiB: whole ones are freed or zeroed, partial ones written)."""
    if ranges and rng.random() < 0.1:
        rtype = rng.choice([T_DISCARD, T_WRITE_ZEROES])
        flags = rng.choice([0, 1]) if rtype == T_WRITE_ZEROES else 0
        seg = struct.pack("<QII", slot * SLOT + rng.randrange(16), rng.choice([8, 16, 24, 40, 3]), flags)
        return [hdr(rtype, 0), seg], [1]
    return request(rng, slot)


def qcow2_device(tmp_path, name: str, virtio_driver, compiled: bool):
    (tmp_path / name).mkdir()
    raw = tmp_path / name / "seed.raw"
    image(raw, 7)
    path = tmp_path / name / "disk.img"
    qemu_img("convert", "-O", "qcow2", "-o", "cluster_size=4096", str(raw), str(path))
    disk = open_disk(str(path), format="qcow2")
    if not compiled:
        disk.serve_step = lambda: None
    dev = BlkDevice(disk, BlkConfig(path=str(path)))
    drv = virtio_driver(dev)
    drv.init()
    return drv, path


def run_qcow2_script(drv, seed: int, batches: int) -> list[tuple[int, bytes]]:
    rng = random.Random(seed)
    results = []
    for i in range(batches):  # (few slots, discards in every 4th batch: the map warms up between)
        reqs = [qcow2_request(rng, s, i % 4 == 3) for s in rng.sample(range(12), rng.randint(1, 12))]
        heads = [drv.post(0, out, ins, indirect=rng.random() < 0.5) for out, ins in reqs]
        drv.kick(0)
        got = {u.head: u for u in drv.wait(0, len(heads))}
        results += [(got[h].written, got[h].data) for h in heads]
    return results


def qcow2_seen(drv, path) -> dict:
    drv.device.close()
    check_image(str(path))
    out = path.with_suffix(".raw")
    qemu_img("convert", "-O", "raw", str(path), str(out))
    q = drv.device.queues[0]
    return {
        "stats": dict(drv.device.stats),
        "queue": (q.requests, q.bytes_read, q.bytes_written, q.errors),
        "image": out.read_bytes(),
        "needs_reset": drv.needs_reset,
    }


@needs_qemu_img
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_qcow2_compiled_step_serves_as_python_does(tmp_path, virtio_driver, monkeypatch, seed):
    served = count_served(monkeypatch)
    py, py_path = qcow2_device(tmp_path, "python", virtio_driver, False)
    want = run_qcow2_script(py, seed, 120)
    assert not served
    c, c_path = qcow2_device(tmp_path, "compiled", virtio_driver, True)
    got = run_qcow2_script(c, seed, 120)
    assert sum(served) > 30, "the compiled step served (almost) nothing: the test compares nothing"
    assert got == want
    assert qcow2_seen(c, c_path) == qcow2_seen(py, py_path)


@needs_qemu_img
def test_qcow2_step_map_is_cleared_by_discard_and_stopped_by_handover(tmp_path, virtio_driver):
    drv, _ = qcow2_device(tmp_path, "d", virtio_driver, True)
    disk = drv.device.backend
    step = drv.device._step
    assert step is not None

    def read(sector: int) -> tuple[int, bytes]:
        drv.post(0, [hdr(T_IN, sector)], [4096, 1])
        drv.kick(0)
        u = drv.wait(0, 1)[0]
        return u.written, u.data

    first = read(8)  # (Python maps it and remembers the cluster)
    before = drv.device.queues[0].requests
    assert read(8) == first
    assert drv.device.stats["in"] == 2 and drv.device.queues[0].requests == before + 1
    drv.post(0, [hdr(T_DISCARD, 0), struct.pack("<QII", 8, 8, 0)], [1])
    drv.kick(0)
    assert drv.wait(0, 1)[0].data[-1] == 0
    assert read(8) == (4097, b"\0" * 4096 + b"\0")  # not the forgotten cluster's old bytes
    disk.inactivate()  # (a hand-over: another process may change the metadata now)
    assert step._data.enabled == 0
    disk.invalidate()
    assert step._data.enabled == 1


@needs_qemu_img
def test_qcow2_step_never_writes_onto_metadata(tmp_path, virtio_driver):
    """An L2 entry that points a guest cluster at the L1 table: the run is never remembered, so
    the step leaves the write to Python, which refuses it (IOERR), and the L1 table is intact."""
    drv, path = qcow2_device(tmp_path, "m", virtio_driver, True)
    disk = drv.device.backend
    with disk._meta:
        l1_off = disk.h.l1_table_offset
        table = disk._l2_for(0, False)
        table.entries[0] = (table.entries[0] & ~((1 << 56) - 1 - 511)) | l1_off
    before = path.read_bytes()[l1_off : l1_off + 4096]
    for _ in range(2):
        drv.post(0, [hdr(T_OUT, 0), b"\xee" * 4096], [1])
        drv.kick(0)
        assert drv.wait(0, 1)[0].data[-1] == 1  # IOERR
    assert path.read_bytes()[l1_off : l1_off + 4096] == before


@needs_qemu_img
def test_qcow2_step_never_reads_a_freed_and_reused_cluster(tmp_path):
    """The step on one thread reading blocks; another discards them, flushes (the freed clusters
    are given back under the exclusive side) and writes elsewhere (reusing them), then restores
    them. Every read the step serves is the block's own bytes or zeros -- never another block's
    data from a reused cluster, which a map not cleared in time (or a step not waited for) gives."""
    from vdm_blk.fastserve import _ffi, _lib

    blocks = 64

    def own(b: int) -> bytes:
        return struct.pack("<I", b + 1) * 1024

    raw = tmp_path / "seed.raw"
    raw.write_bytes(b"".join(own(b) for b in range(blocks)) + bytes(SIZE - blocks * 4096))
    path = tmp_path / "disk.qcow2"
    qemu_img("convert", "-O", "qcow2", "-o", "cluster_size=4096", str(raw), str(path))
    disk = open_disk(str(path), format="qcow2")
    step = disk.serve_step()
    assert step is not None
    ctx = _ffi.cast("void *", step._data)
    header = _ffi.new("uint8_t[16]")
    data = _ffi.new("uint8_t[4096]")
    status = _ffi.new("uint8_t[1]")
    ent = _ffi.new("uint64_t[6]")
    for k, (buf, n) in enumerate([(header, 16), (data, 4096), (status, 1)]):
        ent[2 * k], ent[2 * k + 1] = int(_ffi.cast("uintptr_t", buf)), n
    written = _ffi.new("uint32_t *")
    stop = threading.Event()
    bad: list[str] = []
    counts = {"served": 0, "reused": 0}

    def reader() -> None:
        rng = random.Random(1)
        buf = bytearray(4096)
        while not stop.is_set() and not bad:
            b = rng.randrange(blocks)
            _ffi.memmove(header, struct.pack("<IIQ", T_IN, 0, b * 8), 16)
            if _lib.vdm_blk_serve_qcow2(ctx, ent, 3, 1, written) == 1:
                got = bytes(_ffi.buffer(data))
                counts["served"] += 1
                if got not in (own(b), bytes(4096)):
                    bad.append(f"block {b} read {got[:8].hex()}")
            else:
                disk.readv(b * 4096, [memoryview(buf)])  # (maps it: the step is told)

    t = threading.Thread(target=reader)
    t.start()
    try:
        rng = random.Random(2)
        deadline = time.monotonic() + 2
        while time.monotonic() < deadline and not bad:
            b = rng.randrange(blocks)
            disk.discard(b * 4096, 4096)
            disk.flush()  # (the freed cluster is free again now)
            other = blocks + 8 + rng.randrange(blocks)
            disk.writev(other * 4096, [memoryview(b"\xee" * 4096)])
            disk.discard(other * 4096, 4096)  # (so the next round frees and reuses one again)
            disk.flush()
            disk.writev(b * 4096, [memoryview(bytearray(own(b)))])
            counts["reused"] += 1
    finally:
        stop.set()
        t.join()
        disk.close()
    assert not bad, bad[:3]
    assert counts["served"] > 100 and counts["reused"] > 20, counts


BIG = 512 << 10  # bytes: a read the step hands to its thread pool (>= fastserve.DEFER_MIN)


def big_device(tmp_path, name: str, virtio_driver, compiled: bool, size: int = SIZE):
    (tmp_path / name).mkdir()
    path = tmp_path / name / "disk.img"
    path.write_bytes(random.Random(9).randbytes(size))
    disk = RawDisk(str(path))
    if not compiled:
        disk.serve_step = lambda: None
    drv = virtio_driver(BlkDevice(disk, BlkConfig(path=str(path))))
    drv.init()
    return drv, path, disk


def run_big(drv, rng: random.Random, batches: int, sectors: int = SECTORS) -> list[tuple[int, bytes]]:
    """Batches of large reads (some split over buffers) with small reads and writes and a large
    write among them; the writes in the last quarter of the disk, the reads in the first half
    (the order of requests in flight together is the device's choice: a pooled read may finish
    after a later write)."""
    results = []
    for _ in range(batches):
        reqs = []
        for _ in range(rng.randint(1, 12)):
            if rng.random() < 0.6:
                n = rng.choice([BIG, 1 << 20, BIG + 4096])
                sector = rng.randrange(0, SECTORS // 2 - n // 512 + 1) if rng.random() < 0.9 else sectors - 8
                reqs.append(([hdr(T_IN, sector)], [*split(n, rng), 1]))
            elif rng.random() < 0.5:
                reqs.append(([hdr(T_IN, rng.randrange(SECTORS // 2 - 8))], [4096, 1]))
            elif rng.random() < 0.5:  # (small writes in [6, 6.5) MiB, one large one in [6.5, 8))
                reqs.append(([hdr(T_OUT, rng.randrange(SECTORS * 3 // 4, SECTORS * 13 // 16 - 8)),
                              rng.randbytes(4096)], [1]))  # fmt: skip
            elif not any(len(out) > 1 and len(out[1]) > 4096 for out, _ in reqs):
                data = rng.randbytes(rng.choice([BIG, 1 << 20]))
                at = rng.randrange(SECTORS * 13 // 16, SECTORS - len(data) // 512 + 1)
                cut = rng.randrange(1, len(data) // 512) * 512
                bufs = [data] if rng.random() < 0.5 else [data[:cut], data[cut:]]
                reqs.append(([hdr(T_OUT, at), *bufs], [1]))
        heads = [drv.post(0, out, ins) for out, ins in reqs]
        drv.kick(0)
        got = {u.head: u for u in drv.wait(0, len(heads))}
        results += [(got[h].written, got[h].data) for h in heads]
    return results


@pytest.mark.parametrize("seed", [1, 2])
def test_large_reads_on_the_pool_serve_as_python_does(tmp_path, virtio_driver, monkeypatch, seed):
    """Reads and writes of at least DEFER_MIN bytes are copied by the step's thread pool while the
    queue's thread takes the next chains; what the guest sees is what the Python path gives."""
    served = count_served(monkeypatch)
    py, py_path, _ = big_device(tmp_path, "python", virtio_driver, False)
    want = run_big(py, random.Random(seed), 12)
    c, c_path, disk = big_device(tmp_path, "compiled", virtio_driver, True)
    got = run_big(c, random.Random(seed), 12)
    assert got == want
    assert seen(c, c_path) == seen(py, py_path)
    assert sum(served) > 20
    assert disk.serve_step().deferred > 10, "the pool served no large read: the test compares nothing"


def test_a_large_read_the_pool_cannot_serve_is_left_to_python(tmp_path, virtio_driver, monkeypatch):
    """The file shrinks under the disk: a pooled read past its new end comes back short, so that
    chain and the ones after it in the batch are left untaken for the Python path, which answers
    them as it does without the step."""
    results = {}
    for compiled in (False, True):
        drv, path, disk = big_device(tmp_path, f"c{int(compiled)}", virtio_driver, compiled)
        rng = random.Random(5)
        run_big(drv, rng, 2)  # (the step's reads settle its flags; the pool starts)
        os.truncate(path, SIZE // 2)
        reqs = [
            ([hdr(T_IN, 0)], [BIG, 1]),  # served
            ([hdr(T_IN, SECTORS - 2048)], [1 << 20, 1]),  # past the file's end now: short
            ([hdr(T_IN, 8)], [4096, 1]),  # after it: left to Python as well
            ([hdr(T_IN, 2048)], [BIG, 1]),
        ]
        heads = [drv.post(0, out, ins) for out, ins in reqs]
        drv.kick(0)
        got = {u.head: u for u in drv.wait(0, len(heads))}
        results[compiled] = ([(got[h].written, got[h].data) for h in heads], seen(drv, path))
        if compiled:
            assert disk.serve_step().deferred >= 2
    assert results[True] == results[False]
