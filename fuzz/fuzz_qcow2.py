#!/usr/bin/env python3
"""Fuzz target: qcow2 header, L1/L2 and refcount parsing -- a hostile image file.

The input is a whole image file (seeds: small images made by qemu-img, see make_seeds). vdm opens
it as qcow2, reads, writes, discards and flushes a little, and closes it. Invariants: a bad image
is refused with DiskError (never another exception; a request may also fail with the host's own
OSError, e.g. EFBIG, which the device reports as an I/O error); no file is opened but the image and what sits
beside it in its own folder (so a backing-file name like /etc/shadow is never opened); I/O stays
inside the virtual disk; each input finishes within the libFuzzer timeout. An image refused
read-write by the metadata check is read read-only; one that passed the check still passes it
after vdm wrote into it.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile

import common

WORK = tempfile.mkdtemp(prefix="vdm-fuzz-qcow2-")
IMAGE = os.path.join(WORK, "img.qcow2")


def make_seeds(corpus: str) -> None:
    """Small qcow2 images of several shapes (needs qemu-img)."""
    os.makedirs(corpus, exist_ok=True)
    tmp = tempfile.mkdtemp()
    base = os.path.join(tmp, "base.raw")
    with open(base, "wb") as f:
        f.write(os.urandom(64 << 10))
    shapes = {
        "v3-512": ["-o", "cluster_size=512"],
        "v2-512": ["-o", "cluster_size=512,compat=0.10"],
        "v3-backing": ["-o", "cluster_size=512", "-b", "base.raw", "-F", "raw"],
    }
    for name, opts in shapes.items():
        out = os.path.join(tmp, name)
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", *opts, out, "128K"], check=True, cwd=tmp)
        subprocess.run(
            ["qemu-io", "-c", "write -P 0x5a 0 4k", "-c", "write -z 8k 4k", out],
            check=True,
            cwd=tmp,
            capture_output=True,
        )
        with open(out, "rb") as f, open(os.path.join(corpus, name), "wb") as g:
            g.write(f.read())


def one_input(data: bytes) -> None:
    from vdm_blk.backends import DiskError, open_disk
    from vdm_blk.backends.extend import load_extensions

    load_extensions()  # third-party protocols/formats load once, on first use: not the image's doing
    opened = common.watch_files()
    with open(IMAGE, "wb") as f:
        f.write(data)
    opened.clear()
    try:
        disk = open_disk(IMAGE, format="qcow2")
    except DiskError:
        disk = None
    passed_check = disk is not None
    if disk is None:  # refused read-write (the metadata check): reads must still be safe
        try:
            disk = open_disk(IMAGE, format="qcow2", read_only=True)
        except DiskError:
            disk = None
    if disk is not None:
        try:
            h = hashlib.sha256(data).digest()
            size = disk.size
            for i in range(4):
                if size < 512:
                    break
                off = int.from_bytes(h[4 * i : 4 * i + 4], "little") % (size // 512) * 512
                n = min(4096, size - off)
                buf = bytearray(n)
                try:
                    if i % 2 and not disk.read_only:
                        disk.writev(off, [memoryview(buf)])
                    else:
                        disk.readv(off, [memoryview(buf)])
                    if i == 3 and disk.supports_discard:
                        disk.discard(off, n - n % 512)
                    disk.flush()
                except DiskError:
                    break
                except OSError as e:
                    # the host refused the I/O (e.g. EFBIG: a data cluster at an offset past what the
                    # file system allows); vdm_blk's device turns it into VIRTIO_BLK_S_IOERR
                    assert e.errno is not None, e
                    break
        finally:
            disk.close()
    if passed_check:
        # what vdm wrote into an image that passed the check still passes it: vdm never damages
        # the metadata it found consistent (leaks from failed writes are allowed by the check)
        try:
            open_disk(IMAGE, format="qcow2").close()
        except DiskError as e:
            raise AssertionError(f"vdm damaged an image that passed its check: {e}") from None
    outside = [p for p in opened if not os.path.realpath(p).startswith(WORK + os.sep)]
    assert not outside, f"opened files outside the image's folder: {outside}"


if __name__ == "__main__":
    if sys.argv[1:2] == ["--make-seeds"]:
        make_seeds(sys.argv[2])
        sys.exit(0)
    common.run(one_input, ("vdm_blk.backends",))
    sys.exit(0)
