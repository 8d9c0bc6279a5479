"""Random sequences of writes, discards, write-zeroes, flushes and reopens, against a byte model.

After each sequence the image reads exactly like the model, ``qemu-img check`` finds no errors
and no leaks, and ``qemu-img compare`` finds it identical to a raw file holding the model.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from unittest import mock

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from vdm_blk.backends import open_disk, qcow2, qcow2_refcounts

from .helpers import (
    QEMU_IMG,
    assert_same,
    check_image,
    create_qcow2,
    needs_qemu_img,
    pattern,
    qemu_img,
    qemu_io,
)

SIZE = 1 << 20
SECTORS = SIZE // 512

ops = st.lists(
    st.one_of(
        st.tuples(
            st.just("write"),
            st.integers(0, SECTORS - 1),
            st.integers(1, 160),
            st.integers(0, 1 << 30),
            st.integers(0, 3),
        ),
        st.tuples(st.just("discard"), st.integers(0, SECTORS - 1), st.integers(1, 400)),
        st.tuples(st.just("zeroes"), st.integers(0, SECTORS - 1), st.integers(1, 400), st.booleans()),
        st.tuples(st.just("flush")),
        st.tuples(st.just("reopen")),
    ),
    min_size=1,
    max_size=30,
)


@needs_qemu_img
@settings(
    max_examples=int(os.environ.get("VDM_QCOW2_EXAMPLES", "30")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(
    cluster_size=st.sampled_from([512, 4096, 65536]),
    compat=st.sampled_from(["1.1", "0.10"]),
    with_backing=st.booleans(),
    direct=st.booleans(),
    tiny_caches=st.booleans(),
    snapshot=st.booleans(),
    small_pieces=st.booleans(),
    sequence=ops,
)
def test_sequences_match_a_model(
    cluster_size, compat, with_backing, direct, tiny_caches, snapshot, small_pieces, sequence
):
    assert QEMU_IMG
    # tiny caches: two L2 tables and two refcount blocks, so write-back on eviction is exercised
    caches = (
        mock.patch.multiple(qcow2, MIN_CACHE_TABLES=2, L2_CACHE_BYTES=0, REFBLOCK_CACHE_BYTES=0)
        if tiny_caches
        else contextlib.nullcontext()
    )
    # small pieces: tables are written back in 64-byte pieces, so that stale-piece tracking is
    # exercised with many pieces per table even in a 1 MiB image
    pieces = contextlib.ExitStack()
    if small_pieces:
        pieces.enter_context(mock.patch.object(qcow2, "CHUNK", 64))
        pieces.enter_context(mock.patch.object(qcow2_refcounts, "CHUNK", 64))
    with tempfile.TemporaryDirectory() as d, caches, pieces:
        backing = None
        model = bytearray(SIZE)
        if with_backing:
            backing = os.path.join(d, "base.raw")
            base_data = pattern(SIZE - 4096, 424242)  # shorter than the image: the tail reads zeros
            with open(backing, "wb") as f:
                f.write(base_data)
            model[: len(base_data)] = base_data
        img = create_qcow2(
            os.path.join(d, "t.qcow2"),
            SIZE,
            f"cluster_size={cluster_size}",
            f"compat={compat}",
            backing="base.raw" if backing else None,
        )
        if snapshot:
            # QEMU writes half the disk and takes an internal snapshot, which must survive
            qemu_io(img, f"write -P 0x5a 0 {SIZE // 2}")
            model[: SIZE // 2] = b"\x5a" * (SIZE // 2)
            qemu_img("snapshot", "-c", "before", img)
            snap_content = bytes(model)
        disk = open_disk(img, direct=direct)
        for op in sequence:
            if op[0] == "write":
                _, sector, count, seed, split = op
                count = min(count, SECTORS - sector)
                data = pattern(count * 512, seed)
                v = memoryview(bytearray(data))
                cut = min(split * 512, len(data))
                disk.writev(sector * 512, [v[:cut], v[cut:]] if cut else [v])
                model[sector * 512 : (sector + count) * 512] = data
            elif op[0] in ("discard", "zeroes"):
                sector, count = op[1], min(op[2], SECTORS - op[1])
                off, n = sector * 512, count * 512
                if op[0] == "discard":
                    disk.discard(off, n)
                else:
                    disk.write_zeroes(off, n, op[3])
                if op[0] == "discard" and compat == "0.10" and backing:
                    # documented: v2 + backing -- whole clusters show the backing data, the rest is kept
                    first = -(-off // cluster_size) * cluster_size
                    last = (off + n) // cluster_size * cluster_size
                    if first < last:
                        with open(backing, "rb") as f:
                            f.seek(first)
                            chunk = f.read(last - first)
                        model[first:last] = chunk.ljust(last - first, b"\0")
                else:
                    model[off : off + n] = bytes(n)
            elif op[0] == "flush":
                disk.flush()
            else:
                disk.close()
                disk = open_disk(img, direct=direct)
        out = bytearray(SIZE)
        disk.readv(0, [memoryview(out)])
        assert out == model
        disk.close()
        check_image(img)
        mirror = os.path.join(d, "m.raw")
        with open(mirror, "wb") as f:
            f.write(model)
        assert_same(img, mirror)
        if snapshot:
            out = os.path.join(d, "snap.raw")
            qemu_img("convert", "-f", "qcow2", "-l", "snapshot.name=before", "-O", "raw", img, out)
            with open(out, "rb") as f:
                assert f.read() == snap_content
            qemu_img("snapshot", "-d", "before", img)
            check_image(img)
