"""A minimal 9P2000.L client over vdm.testing's in-process virtio driver (what a guest's v9fs does).

Built from the message layouts (Linux's net/9p client), independently of vdm_9p.protocol's
reply builder, so that a mistake in the server's codec is not mirrored here.
"""

from __future__ import annotations

import struct
from typing import Any

from vdm.testing import VirtioTestDriver

T = {
    "statfs": 8,
    "lopen": 12,
    "lcreate": 14,
    "symlink": 16,
    "mknod": 18,
    "rename": 20,
    "readlink": 22,
    "getattr": 24,
    "setattr": 26,
    "xattrwalk": 30,
    "xattrcreate": 32,
    "readdir": 40,
    "fsync": 50,
    "lock": 52,
    "getlock": 54,
    "link": 70,
    "mkdir": 72,
    "renameat": 74,
    "unlinkat": 76,
    "version": 100,
    "attach": 104,
    "flush": 108,
    "walk": 110,
    "read": 116,
    "write": 118,
    "clunk": 120,
}
RLERROR = 7
NOFID = 0xFFFFFFFF


class P9Error(Exception):
    def __init__(self, errno: int) -> None:
        super().__init__(errno)
        self.errno = errno


def s(b: bytes | str) -> bytes:
    b = b.encode() if isinstance(b, str) else b
    return struct.pack("<H", len(b)) + b


class Parser:
    def __init__(self, data: bytes) -> None:
        self.d, self.p = data, 0

    def take(self, fmt: str) -> Any:
        v = struct.unpack_from("<" + fmt, self.d, self.p)
        self.p += struct.calcsize("<" + fmt)
        return v if len(v) > 1 else v[0]

    def str(self) -> bytes:
        n = self.take("H")
        v = self.d[self.p : self.p + n]
        self.p += n
        return v

    def qid(self) -> tuple[int, int, int]:
        return self.take("BIQ")


class Client:
    def __init__(self, drv: VirtioTestDriver, msize: int = 65536) -> None:
        self.drv = drv
        self.msize = msize
        self.tag = 1

    def raw(self, msg: bytes, room: int | None = None) -> bytes:
        """Send ``msg`` as is; return the reply bytes the device wrote."""
        used = self.drv.request(0, out=[msg], in_lens=[room or self.msize + 64])
        return used.data[: used.written]

    def rpc(self, name: str, body: bytes, room: int | None = None) -> Parser:
        self.tag = (self.tag + 1) & 0x7FFF
        mtype = T[name]
        reply = self.raw(struct.pack("<IBH", 7 + len(body), mtype, self.tag) + body, room)
        size, rtype, tag = struct.unpack_from("<IBH", reply)
        assert size == len(reply) and tag == self.tag, (size, len(reply), tag, self.tag)
        p = Parser(reply)
        p.p = 7
        if rtype == RLERROR:
            raise P9Error(p.take("I"))
        assert rtype == mtype + 1, (rtype, mtype)
        return p

    # ---- the calls a client makes ---------------------------------------------------------------

    def version(self, msize: int | None = None, ver: bytes = b"9P2000.L") -> tuple[int, bytes]:
        p = self.rpc("version", struct.pack("<I", msize or self.msize) + s(ver))
        return p.take("I"), p.str()

    def attach(self, fid: int = 0) -> tuple:
        return self.rpc(
            "attach", struct.pack("<II", fid, NOFID) + s("root") + s("") + struct.pack("<I", 0)
        ).qid()

    def walk(self, fid: int, newfid: int, *names: bytes | str) -> list[tuple]:
        p = self.rpc("walk", struct.pack("<IIH", fid, newfid, len(names)) + b"".join(s(n) for n in names))
        return [p.qid() for _ in range(p.take("H"))]

    def getattr(self, fid: int) -> dict[str, int]:
        p = self.rpc("getattr", struct.pack("<IQ", fid, 0x7FF))
        p.take("Q")
        qid = p.qid()
        mode, uid, _gid, nlink, _rdev, size, _blksize, _blocks = p.take("IIIQQQQQ")
        return {"qtype": qid[0], "ino": qid[2], "mode": mode, "nlink": nlink, "size": size, "uid": uid}

    def setattr(self, fid: int, valid: int, mode: int = 0, size: int = 0) -> None:
        self.rpc("setattr", struct.pack("<IIIIIQQQQQ", fid, valid, mode, 0, 0, size, 0, 0, 0, 0))

    def lopen(self, fid: int, flags: int) -> tuple:
        p = self.rpc("lopen", struct.pack("<II", fid, flags))
        return p.qid(), p.take("I")

    def lcreate(self, fid: int, name: bytes | str, flags: int = 2, mode: int = 0o644) -> tuple:
        return self.rpc(
            "lcreate", struct.pack("<I", fid) + s(name) + struct.pack("<III", flags, mode, 0)
        ).qid()

    def read(self, fid: int, offset: int, count: int) -> bytes:
        p = self.rpc("read", struct.pack("<IQI", fid, offset, count))
        n = p.take("I")
        return p.d[p.p : p.p + n]

    def write(self, fid: int, offset: int, data: bytes) -> int:
        return self.rpc("write", struct.pack("<IQI", fid, offset, len(data)) + data).take("I")

    def clunk(self, fid: int) -> None:
        self.rpc("clunk", struct.pack("<I", fid))

    def readdir(self, fid: int, offset: int = 0, count: int = 8192) -> list[tuple[bytes, int, int]]:
        p = self.rpc("readdir", struct.pack("<IQI", fid, offset, count))
        end = p.p + 4 + p.take("I")
        out = []
        while p.p < end:
            p.qid()
            off, typ = p.take("QB")
            out.append((p.str(), off, typ))
        return out

    def listdir(self, fid: int) -> list[bytes]:
        names, off = [], 0
        while True:
            ents = self.readdir(fid, off)
            if not ents:
                return names
            names += [e[0] for e in ents]
            off = ents[-1][1]

    def mkdir(self, fid: int, name: bytes | str, mode: int = 0o755) -> tuple:
        return self.rpc("mkdir", struct.pack("<I", fid) + s(name) + struct.pack("<II", mode, 0)).qid()

    def unlinkat(self, fid: int, name: bytes | str, flags: int = 0) -> None:
        self.rpc("unlinkat", struct.pack("<I", fid) + s(name) + struct.pack("<I", flags))

    def renameat(self, ofid: int, oname: bytes | str, nfid: int, nname: bytes | str) -> None:
        self.rpc("renameat", struct.pack("<I", ofid) + s(oname) + struct.pack("<I", nfid) + s(nname))

    def rename(self, fid: int, dfid: int, name: bytes | str) -> None:
        self.rpc("rename", struct.pack("<II", fid, dfid) + s(name))

    def link(self, dfid: int, fid: int, name: bytes | str) -> None:
        self.rpc("link", struct.pack("<II", dfid, fid) + s(name))

    def symlink(self, fid: int, name: bytes | str, target: bytes | str) -> tuple:
        return self.rpc("symlink", struct.pack("<I", fid) + s(name) + s(target) + struct.pack("<I", 0)).qid()

    def readlink(self, fid: int) -> bytes:
        return self.rpc("readlink", struct.pack("<I", fid)).str()

    def mknod(self, fid: int, name: bytes | str, mode: int, major: int = 0, minor: int = 0) -> tuple:
        return self.rpc(
            "mknod", struct.pack("<I", fid) + s(name) + struct.pack("<IIII", mode, major, minor, 0)
        ).qid()

    def statfs(self, fid: int) -> tuple:
        return self.rpc("statfs", struct.pack("<I", fid)).take("IIQQQQQQI")

    def fsync(self, fid: int) -> None:
        self.rpc("fsync", struct.pack("<II", fid, 0))
