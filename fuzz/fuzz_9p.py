#!/usr/bin/env python3
"""Fuzz target: vdm_9p -- 9P2000.L requests from a hostile guest against a shared directory.

The input is a series of requests: mostly well-framed messages of the server's types with fuzzed
fids, names (``..``, ``.``, names with ``/`` or NUL, symlinks planted in the share pointing
outside it, random bytes), flags, offsets and counts; sometimes raw bytes, a lying size field or
a cut message, and buffers of any size for the reply. The share is made afresh for each input
next to a directory ``outside``.

Invariants: nothing outside the share changes (``outside`` keeps its names, sizes, modes and
contents, and no file appears beside the share); every absolute path the server opens is the
share itself or one of its own ``/proc/self/fd`` links; every reply is a whole 9P message (its
size field is what was written, its tag the request's, its type the request's + 1 or Rlerror)
written inside the reply buffers; a well-framed request never breaks the device; closing the
device leaves no fd open.
"""

from __future__ import annotations

import os
import shutil
import stat
import struct
import sys
import tempfile

import common

BASE = tempfile.mkdtemp(prefix="vdm-fuzz-9p-")
SHARE = os.path.join(BASE, "share")
OUTSIDE = os.path.join(BASE, "outside")
TYPES = (
    8,
    12,
    14,
    16,
    18,
    20,
    22,
    24,
    26,
    30,
    32,
    40,
    50,
    52,
    54,
    70,
    72,
    74,
    76,
    100,
    102,
    104,
    108,
    110,
    116,
    118,
    120,
)
NAMES = (
    b"..",
    b".",
    b"f",
    b"sub",
    b"up",
    b"abs",
    b"rel",
    b"new",
    b"a/b",
    b"../outside",
    b"x\0y",
    b"",
    b"secret",
    b"outside",
    b"sub2",
    b"x" * 256,
)


def _force_rmtree(path: str) -> None:
    if not os.path.lexists(path):
        return
    for root, dirs, _ in os.walk(path):
        for d in dirs:
            p = os.path.join(root, d)
            if not os.path.islink(p):
                os.chmod(p, 0o700)
    os.chmod(path, 0o700)
    shutil.rmtree(path)


def fresh_share() -> None:
    _force_rmtree(SHARE)
    os.mkdir(SHARE)
    with open(os.path.join(SHARE, "f"), "wb") as f:
        f.write(b"inside")
    os.mkdir(os.path.join(SHARE, "sub"))
    os.symlink("..", os.path.join(SHARE, "up"))
    os.symlink(OUTSIDE, os.path.join(SHARE, "abs"))
    os.symlink("../outside/secret", os.path.join(SHARE, "sub", "rel"))


def outside_state() -> tuple:
    names = tuple(sorted(os.listdir(BASE)))
    out = []
    for n in sorted(os.listdir(OUTSIDE)):
        p = os.path.join(OUTSIDE, n)
        st = os.lstat(p)
        with open(p, "rb") as f:
            out.append((n, stat.S_IMODE(st.st_mode), st.st_size, st.st_nlink, st.st_uid, f.read()))
    return names, tuple(out)


def message(fdp) -> bytes:
    """One request body (after the header) for a type the server knows, fields fuzzed."""
    mtype = TYPES[fdp.ConsumeIntInRange(0, len(TYPES) - 1)]
    parts = []
    for _ in range(fdp.ConsumeIntInRange(0, 8)):
        kind = fdp.ConsumeIntInRange(0, 6)
        if kind == 0:  # a fid (small numbers are the ones in use)
            parts.append(
                struct.pack(
                    "<I", fdp.ConsumeIntInRange(0, 7) if fdp.ConsumeBool() else fdp.ConsumeInt(4) & 0xFFFFFFFF
                )
            )
        elif kind == 1:  # a name
            name = (
                NAMES[fdp.ConsumeIntInRange(0, len(NAMES) - 1)] if fdp.ConsumeBool() else fdp.ConsumeBytes(8)
            )
            parts.append(struct.pack("<H", len(name)) + name)
        elif kind == 2:
            parts.append(struct.pack("<I", fdp.ConsumeIntInRange(0, 0xFFFFFFFF)))
        elif kind == 3:
            parts.append(struct.pack("<Q", fdp.ConsumeIntInRange(0, (1 << 64) - 1)))
        elif kind == 4:
            parts.append(struct.pack("<H", fdp.ConsumeIntInRange(0, 0xFFFF)))
        elif kind == 5:
            parts.append(bytes([fdp.ConsumeIntInRange(0, 255)]))
        else:
            parts.append(fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 64)))
    return bytes([mtype]) + b"".join(parts)


def one_input(data: bytes) -> None:
    import atheris
    from vdm.testing import VirtioTestDriver
    from vdm_9p.config import NinepConfig
    from vdm_9p.device import NinepDevice

    fdp = atheris.FuzzedDataProvider(data)
    fresh_share()
    before = outside_state()
    fds_before = len(os.listdir("/proc/self/fd"))
    dev = NinepDevice(NinepConfig(path=SHARE, tag="fuzz", ro=fdp.ConsumeBool(), max_fids=64))
    drv = VirtioTestDriver(dev, ram_size=4 << 20)
    opened = common.watch_files()
    try:
        drv.init()
        opened.clear()
        tag = 0
        setup = [
            struct.pack("<BH", 100, 0xFFFF) + struct.pack("<I", 65536) + b"\x08\x009P2000.L",
            struct.pack("<BHII", 104, 1, 0, 0xFFFFFFFF) + b"\0\0\0\0" + b"\0\0\0\0",
        ]
        for i in range(fdp.ConsumeIntInRange(1, 24)):
            if i < 2 and fdp.ConsumeIntInRange(0, 7):
                body = setup[i]
                tag = struct.unpack_from("<H", body, 1)[0]
                framed = True
            else:
                tag = fdp.ConsumeIntInRange(0, 0xFFFF)
                m = message(fdp)
                body = m[:1] + struct.pack("<H", tag) + m[1:]
                framed = True
            msg = struct.pack("<I", 4 + len(body)) + body
            how = fdp.ConsumeIntInRange(0, 15)
            if how == 0:  # a size field that lies
                msg = struct.pack("<I", fdp.ConsumeIntInRange(0, 0xFFFFFFFF)) + msg[4:]
            elif how == 1:  # raw bytes
                msg, framed = fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 64)), False
            room = (
                fdp.ConsumeIntInRange(11, 70000)
                if fdp.ConsumeIntInRange(0, 7)
                else fdp.ConsumeIntInRange(0, 11)
            )
            if len(msg) < 7 or room < 11:
                framed = False
            split = fdp.ConsumeIntInRange(0, len(msg)) if fdp.ConsumeBool() else len(msg)
            out = [p for p in (msg[:split], msg[split:]) if p]
            if not out:
                break
            head = drv.submit(0, out, [room])
            if dev.broken is not None:
                assert not framed, f"a framed request broke the device: {dev.broken}"
                break
            (u,) = [x for x in drv.collect(0) if x.head == head]
            size, rtype, rtag = struct.unpack_from("<IBH", u.data)
            assert size == u.written <= room, (size, u.written, room)
            assert rtag == struct.unpack_from("<H", msg, 5)[0] or rtype == 7, (rtag, rtype)
            assert rtype == 7 or rtype == msg[4] + 1, (rtype, msg[4])
            for p in map(os.fsdecode, opened):
                assert not os.path.isabs(p) or p == SHARE or p.startswith("/proc/self/fd/"), p
        assert outside_state() == before, "the guest changed something outside the share"
    finally:
        dev.close()
        drv.ram.check_guards()
    assert len(os.listdir("/proc/self/fd")) <= fds_before, "fds left open after close"


if __name__ == "__main__":
    os.mkdir(OUTSIDE)
    with open(os.path.join(OUTSIDE, "secret"), "wb") as f:
        f.write(b"host secret")
    common.run(one_input, ("vdm_9p.server", "vdm_9p.export", "vdm_9p.protocol", "vdm_9p.device"))
    sys.exit(0)
