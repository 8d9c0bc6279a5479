"""The qcow2 data path for ranges mapped to one contiguous run of host clusters (issue 18).

A guest read of 1 MiB of an image that ``qemu-img convert`` wrote (every cluster allocated, in
order) is one run on the host: vdm serves it on the caller's thread from the page cache
(``readv_nowait``, as raw does) with one ``preadv``, and a small write that crosses a cluster
boundary inside such a run is made inline too. What only looks contiguous (first and last
clusters in line, one in the middle elsewhere, zero, or corrupt) is not taken as a run: it reads
what the image says, and a corrupt entry still fails the request with a DiskError.
Counted, not timed: which calls serve a request and how many system calls it makes.
"""

from __future__ import annotations

import random
import struct
import threading
from contextlib import closing

import pytest
from vdm_blk.backends import DiskError, open_disk

from .helpers import check_image, create_qcow2, needs_qemu_img, pattern, qemu_img, qemu_io

KiB, MiB = 1 << 10, 1 << 20
CS = 64 * KiB

pytestmark = needs_qemu_img


def _converted(tmp_path, size: int = 4 * MiB) -> tuple[str, bytearray]:
    """A qcow2 image written by ``qemu-img convert`` from ``size`` bytes of data (all allocated)."""
    data = pattern(size, 7)
    raw = tmp_path / "src.raw"
    raw.write_bytes(data)
    img = str(tmp_path / "conv.qcow2")
    qemu_img("convert", "-O", "qcow2", str(raw), img)
    return img, data


def _l2_entry_offset(img: str, gc: int) -> int:
    """File offset of guest cluster ``gc``'s L2 entry (the first L2 table, 64 KiB clusters)."""
    with open(img, "rb") as f:
        head = f.read(48)
        l1_off = struct.unpack(">Q", head[40:48])[0]
        f.seek(l1_off)
        l2_off = struct.unpack(">Q", f.read(8))[0] & 0x00FFFFFFFFFFFE00
    return l2_off + gc * 8


def _entries(img: str, gcs: range) -> list[int]:
    with open(img, "rb") as f:
        out = []
        for gc in gcs:
            f.seek(_l2_entry_offset(img, gc))
            out.append(struct.unpack(">Q", f.read(8))[0])
    return out


def _set_entry(img: str, gc: int, value: int) -> None:
    with open(img, "r+b") as f:
        f.seek(_l2_entry_offset(img, gc))
        f.write(struct.pack(">Q", value))


class _CountReads:
    def __init__(self, f) -> None:
        self.calls = 0
        self._preadv, self._nowait = f.preadv, f.read_nowait
        f.preadv, f.read_nowait = self.preadv, self.read_nowait

    def preadv(self, views, offset):
        self.calls += 1
        return self._preadv(views, offset)

    def read_nowait(self, views, offset, length=None):
        self.calls += 1
        return self._nowait(views, offset, length)


def _segments(n: int, seg: int = 128 * KiB) -> tuple[bytearray, list[memoryview]]:
    buf = bytearray(n)
    mv = memoryview(buf)
    return buf, [mv[i : i + seg] for i in range(0, n, seg)]


def test_a_1mib_read_of_a_converted_image_is_served_inline_with_one_system_call(tmp_path):
    img, data = _converted(tmp_path)
    with closing(open_disk(img, read_only=True)) as disk:
        count = _CountReads(disk.f)
        buf, views = _segments(MiB)
        off = MiB + 3 * CS  # not aligned to the L2 range or to 1 MiB: 16 clusters
        assert disk.readv_nowait(off, views) == MiB, "a page-cached contiguous run must be read inline"
        assert buf == data[off : off + MiB]
        assert count.calls == 1
        buf, views = _segments(MiB)
        assert disk.readv(off + 512, views) == MiB
        assert buf == data[off + 512 : off + 512 + MiB]
        assert count.calls == 2


def test_a_small_write_across_a_cluster_boundary_is_made_inline(tmp_path):
    img, data = _converted(tmp_path)
    new = pattern(64 * KiB, 99)
    off = 5 * CS - 32 * KiB
    with closing(open_disk(img)) as disk:
        assert disk.writev_inline(off, [memoryview(new)]) == len(new)
        big = pattern(MiB, 98)
        assert disk.writev(2 * MiB + 512, [memoryview(big)]) == MiB
    data[off : off + len(new)] = new
    data[2 * MiB + 512 : 3 * MiB + 512] = big
    check_image(img)
    out = tmp_path / "out.raw"
    qemu_img("convert", "-O", "raw", img, str(out))
    assert out.read_bytes() == data


@pytest.mark.parametrize("middle", ["elsewhere", "zero", "unallocated"])
def test_first_and_last_cluster_in_line_with_the_middle_elsewhere_is_not_a_run(tmp_path, middle):
    img, data = _converted(tmp_path)
    e = _entries(img, range(0, 8))
    assert all(e[i] == e[0] + i * CS for i in range(8)), "qemu-img convert laid the clusters out in order"
    expect = bytearray(data[: 3 * CS])
    if middle == "elsewhere":  # guest clusters 1 and 5 swap their host clusters
        _set_entry(img, 1, e[5])
        _set_entry(img, 5, e[1])
        expect[CS : 2 * CS] = data[5 * CS : 6 * CS]
    elif middle == "zero":
        qemu_io(img, f"write -z {CS} {CS}")
        expect[CS : 2 * CS] = bytes(CS)
    else:
        qemu_io(img, f"discard {CS} {CS}")
        expect[CS : 2 * CS] = bytes(CS)
    check_image(img, allow_leaks=True)
    with closing(open_disk(img, read_only=True)) as disk:
        buf = bytearray(3 * CS)
        assert disk.readv(0, [memoryview(buf)]) == 3 * CS
        assert buf == expect
        # in the page cache now: served inline too, extent by extent (zeros filled here)
        buf = bytearray(3 * CS)
        assert disk.readv_nowait(0, [memoryview(buf)[:CS], memoryview(buf)[CS:]]) == 3 * CS
        assert buf == expect


@pytest.mark.parametrize("bad", [1 << 56, 1 << 1])
def test_a_corrupt_entry_inside_a_run_still_fails_the_request(tmp_path, bad):
    img, _ = _converted(tmp_path)
    e = _entries(img, range(0, 4))
    _set_entry(img, 2, e[2] | bad)  # reserved bits of a standard L2 entry
    with closing(open_disk(img, read_only=True)) as disk:
        buf = bytearray(4 * CS)
        assert disk.readv_nowait(0, [memoryview(buf)]) is None
        with pytest.raises(DiskError, match="corrupt"):
            disk.readv(0, [memoryview(buf)])
        # the clusters before it are still served
        assert disk.readv_nowait(0, [memoryview(buf)[: 2 * CS]]) == 2 * CS


def test_inline_requests_beside_discards_and_allocating_writes_keep_every_byte(tmp_path):
    """Many threads use the inline calls (falling back as the device does) while others discard
    and write-zero, which frees clusters that allocating writes reuse at once."""
    size, cs = 8 * MiB, 4096
    img = create_qcow2(str(tmp_path / "mt.qcow2"), size, f"cluster_size={cs}")
    disk = open_disk(img)
    nthreads = 6
    region = size // nthreads // cs * cs
    models = [bytearray(region) for _ in range(nthreads)]
    errors: list[BaseException] = []

    def worker(t: int) -> None:
        rng = random.Random(t)
        base, model = t * region, models[t]
        try:
            for i in range(400):
                r = rng.random()
                n = rng.choice((1, 8, 16, 40)) * 512
                off = rng.randrange(0, (region - n) // 512) * 512
                if r < 0.45:
                    data = pattern(n, t * 100000 + i)
                    if disk.writev_inline(base + off, [memoryview(data)]) is None:
                        disk.writev(base + off, [memoryview(data)])
                    model[off : off + n] = data
                elif r < 0.8:
                    out = bytearray(n)
                    if disk.readv_nowait(base + off, [memoryview(out)]) is None:
                        disk.readv(base + off, [memoryview(out)])
                    assert out == model[off : off + n], f"thread {t} op {i}: read differs"
                elif r < 0.9:
                    disk.discard(base + off, n)
                    model[off : off + n] = bytes(n)
                elif r < 0.97:
                    disk.write_zeroes(base + off, n, rng.random() < 0.5)
                    model[off : off + n] = bytes(n)
                else:
                    disk.flush()
        except BaseException as e:  # reported by the main thread
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(nthreads)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors, errors[0]
    for t in range(nthreads):
        out = bytearray(region)
        disk.readv(t * region, [memoryview(out)])
        assert out == models[t], f"region {t} differs"
    disk.close()
    check_image(img, allow_leaks=True)


def test_a_discard_waits_for_a_read_in_flight_and_inline_requests_step_aside_meanwhile(tmp_path):
    """The I/O lock: a discard (which may free clusters for reuse) waits until a read of those
    clusters in flight has finished; while it waits, inline requests say "use a worker"."""
    img, data = _converted(tmp_path)
    with closing(open_disk(img)) as disk:
        entered, release = threading.Event(), threading.Event()
        real = disk.f.preadv

        def slow_preadv(views, offset):  # a read that is still in the kernel
            entered.set()
            assert release.wait(10)
            return real(views, offset)

        disk.f.preadv = slow_preadv
        buf = bytearray(CS)
        reader = threading.Thread(target=disk.readv, args=(0, [memoryview(buf)]))
        reader.start()
        assert entered.wait(10)
        discarded = threading.Event()
        discarder = threading.Thread(target=lambda: (disk.discard(0, CS), discarded.set()))
        discarder.start()
        for _ in range(200):  # until the discard waits for the shared side
            if disk._io.waiting:
                break
            threading.Event().wait(0.01)
        assert disk._io.waiting, "the discard should be waiting for the read in flight"
        assert not discarded.is_set()
        assert disk.readv_nowait(2 * CS, [memoryview(bytearray(4096))]) is None
        assert disk.writev_inline(2 * CS, [memoryview(bytearray(4096))]) is None
        release.set()
        reader.join(10)
        discarder.join(10)
        assert discarded.is_set()
        disk.f.preadv = real
        assert buf == data[:CS], "the read in flight returned the data from before the discard"
        out = bytearray(CS)
        assert disk.readv_nowait(CS, [memoryview(out)]) == CS and out == data[CS : 2 * CS]
    check_image(img, allow_leaks=True)


def test_compressed_clusters_are_left_to_a_worker(tmp_path):
    data = pattern(MiB, 5)
    raw = tmp_path / "src.raw"
    raw.write_bytes(data)
    img = str(tmp_path / "z.qcow2")
    qemu_img("convert", "-c", "-O", "qcow2", str(raw), img)
    with closing(open_disk(img, read_only=True)) as disk:
        buf = bytearray(2 * CS)
        assert disk.readv_nowait(CS, [memoryview(buf)]) is None
        assert disk.readv(CS, [memoryview(buf)]) == 2 * CS
        assert buf == data[CS : 3 * CS]
