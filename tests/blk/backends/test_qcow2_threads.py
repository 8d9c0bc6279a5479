"""Concurrent requests from many threads, as the device's worker pool issues them."""

from __future__ import annotations

import random
import threading

from vdm_blk.backends import open_disk

from .helpers import check_image, create_qcow2, needs_qemu_img, pattern

MiB = 1 << 20


@needs_qemu_img
def test_concurrent_writes_reads_discards_and_flushes(tmp_path):
    size, cs = 16 * MiB, 4096
    img = create_qcow2(str(tmp_path / "mt.qcow2"), size, f"cluster_size={cs}")
    disk = open_disk(img)
    nthreads = 8
    region = size // nthreads
    models = [bytearray(region) for _ in range(nthreads)]
    errors: list[BaseException] = []

    def worker(t: int) -> None:
        rng = random.Random(t)
        base = t * region
        model = models[t]
        try:
            for i in range(300):
                r = rng.random()
                count = rng.choice((1, 3, 8, 16))
                off = rng.randrange(0, region // 512 - count) * 512
                n = count * 512
                if r < 0.6:
                    data = pattern(n, t * 100000 + i)
                    disk.writev(base + off, [memoryview(data)])
                    model[off : off + n] = data
                elif r < 0.75:
                    out = bytearray(n)
                    disk.readv(base + off, [memoryview(out)])
                    assert out == model[off : off + n], f"thread {t} op {i}: read differs"
                elif r < 0.85:
                    disk.discard(base + off, n)
                    model[off : off + n] = bytes(n)
                elif r < 0.95:
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
    out = bytearray(size)
    disk.readv(0, [memoryview(out)])
    assert out == b"".join(models)
    disk.close()
    check_image(img)
    reopened = open_disk(img, read_only=True)
    reopened.readv(0, [memoryview(out)])
    assert out == b"".join(models)
    reopened.close()
