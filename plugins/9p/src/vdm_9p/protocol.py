"""The 9P2000.L wire format: message numbers, a bounds-checked reader and a reply builder.

A message is ``size[4] type[1] tag[2] body``, little-endian; strings are ``len[2] bytes`` (kept
as bytes: names go to the host file system unchanged, never through a text codec); a qid is
``type[1] version[4] path[8]``. The message layouts are those of Linux's ``net/9p`` client and
the 9P2000.L description in the diod project; nothing here knows of files or of virtio.

Invariant: :class:`Reader` never reads past the message it was given; a short or malformed
body raises :class:`ProtocolError`, which the server answers with ``Rlerror(EINVAL)``.
"""

from __future__ import annotations

import struct

__all__ = ["HEADER", "Msg", "ProtocolError", "Reader", "Reply", "qid_bytes"]

#: size[4] type[1] tag[2]
HEADER = struct.Struct("<IBH")
_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
_QID = struct.Struct("<BIQ")

#: the tag of Tversion, which answers no earlier request
NOTAG = 0xFFFF
#: "no fid" (Tattach's afid when there is no authentication)
NOFID = 0xFFFFFFFF
#: most names one Twalk may carry
MAXWELEM = 16


class Msg:
    """Message numbers (T = request; its reply R is the T number + 1)."""

    TLERROR = 6
    RLERROR = 7
    TSTATFS = 8
    TLOPEN = 12
    TLCREATE = 14
    TSYMLINK = 16
    TMKNOD = 18
    TRENAME = 20
    TREADLINK = 22
    TGETATTR = 24
    TSETATTR = 26
    TXATTRWALK = 30
    TXATTRCREATE = 32
    TREADDIR = 40
    TFSYNC = 50
    TLOCK = 52
    TGETLOCK = 54
    TLINK = 70
    TMKDIR = 72
    TRENAMEAT = 74
    TUNLINKAT = 76
    TVERSION = 100
    TAUTH = 102
    TATTACH = 104
    TFLUSH = 108
    TWALK = 110
    TREAD = 116
    TWRITE = 118
    TCLUNK = 120


class ProtocolError(Exception):
    """The message is shorter than its fields, or a field is malformed."""


class Reader:
    """Reads the fields of one message body in order; never past ``end``."""

    __slots__ = ("buf", "end", "pos")

    def __init__(self, buf: bytes | memoryview, pos: int = 0, end: int | None = None) -> None:
        self.buf = buf
        self.pos = pos
        self.end = len(buf) if end is None else min(end, len(buf))

    def _take(self, n: int) -> int:
        p = self.pos
        if n < 0 or p + n > self.end:
            raise ProtocolError(f"message too short: need {n} bytes at offset {p}, have {self.end - p}")
        self.pos = p + n
        return p

    def u8(self) -> int:
        return self.buf[self._take(1)]

    def u16(self) -> int:
        return _U16.unpack_from(self.buf, self._take(2))[0]

    def u32(self) -> int:
        return _U32.unpack_from(self.buf, self._take(4))[0]

    def u64(self) -> int:
        return _U64.unpack_from(self.buf, self._take(8))[0]

    def string(self) -> bytes:
        n = self.u16()
        p = self._take(n)
        return bytes(self.buf[p : p + n])

    def data(self, n: int) -> memoryview:
        p = self._take(n)
        return memoryview(self.buf)[p : p + n]

    @property
    def left(self) -> int:
        return self.end - self.pos


def qid_bytes(qtype: int, version: int, path: int) -> bytes:
    return _QID.pack(qtype & 0xFF, version & 0xFFFFFFFF, path & 0xFFFFFFFFFFFFFFFF)


class Reply:
    """Builds the body of one reply; :meth:`message` adds the header."""

    __slots__ = ("parts",)

    def __init__(self) -> None:
        self.parts: list[bytes] = []

    def u8(self, v: int) -> Reply:
        self.parts.append(bytes((v & 0xFF,)))
        return self

    def u16(self, v: int) -> Reply:
        self.parts.append(_U16.pack(v & 0xFFFF))
        return self

    def u32(self, v: int) -> Reply:
        self.parts.append(_U32.pack(v & 0xFFFFFFFF))
        return self

    def u64(self, v: int) -> Reply:
        self.parts.append(_U64.pack(v & 0xFFFFFFFFFFFFFFFF))
        return self

    def string(self, s: bytes) -> Reply:
        if len(s) > 0xFFFF:
            raise ValueError("a 9P string is at most 65535 bytes")
        self.parts.append(_U16.pack(len(s)) + s)
        return self

    def raw(self, b: bytes) -> Reply:
        self.parts.append(b)
        return self

    def message(self, rtype: int, tag: int) -> bytes:
        parts = self.parts
        parts.insert(0, HEADER.pack(HEADER.size + sum(map(len, parts)), rtype, tag))
        return b"".join(parts)


def rlerror(tag: int, errno: int) -> bytes:
    return Reply().u32(errno).message(Msg.RLERROR, tag)
