"""A small AML (ACPI Machine Language) encoder: just what a vdm DSDT needs.

Encodings from the ACPI specification, chapter 20 (AML) and 6.4 (resource descriptors):
``PkgLength`` (1-4 bytes, counting itself), ``NameString`` (4-character segments, ``\\`` root
prefix, dual/multi-name prefixes), integers (Zero/One/Byte/Word/DWord/QWord prefixes), strings,
buffers, packages, ``Name``, ``Scope``, ``Device``; resource templates with Memory32Fixed, IO,
IRQNoFlags and Extended Interrupt descriptors, closed by an End Tag.
"""

from __future__ import annotations

import struct
from typing import Iterable, Protocol, Union

__all__ = [
    "Device", "EisaId", "ExtendedInterrupt", "IoPort", "IrqNoFlags", "Memory32Fixed", "Name", "Package",
    "ResourceTemplate", "Scope", "encode", "name_string", "pkg_length",
]

ZERO_OP, ONE_OP, ONES_OP = 0x00, 0x01, 0xFF
BYTE_PREFIX, WORD_PREFIX, DWORD_PREFIX, STRING_PREFIX, QWORD_PREFIX = 0x0A, 0x0B, 0x0C, 0x0D, 0x0E
NAME_OP, SCOPE_OP, BUFFER_OP, PACKAGE_OP = 0x08, 0x10, 0x11, 0x12
EXT_OP_PREFIX, DEVICE_OP = 0x5B, 0x82
ROOT_CHAR, PARENT_PREFIX, DUAL_NAME_PREFIX, MULTI_NAME_PREFIX = 0x5C, 0x5E, 0x2E, 0x2F


class EisaId(int):
    """A compressed EISA id such as ``EisaId("PNP0501")``, encoded as a DWord integer."""

    def __new__(cls, text: str) -> EisaId:
        if len(text) != 7 or not text[:3].isalpha() or not text[:3].isupper():
            raise ValueError(f"bad EISA id {text!r}")
        c = [ord(ch) - 0x40 for ch in text[:3]]
        vendor = (c[0] << 10) | (c[1] << 5) | c[2]
        product = int(text[3:], 16)
        # stored big-endian in the 32-bit little-endian value
        value = ((vendor >> 8) & 0xFF) | ((vendor & 0xFF) << 8) | (((product >> 8) & 0xFF) << 16) | (
            (product & 0xFF) << 24
        )
        return super().__new__(cls, value)


Term = Union[int, str, bytes, "Node", list]


class Node:
    """An encodable AML object."""

    def encode(self) -> bytes:
        raise NotImplementedError


def pkg_length(body_len: int) -> bytes:
    """The PkgLength encoding for a package whose contents (after the PkgLength) are ``body_len`` bytes."""
    for n in range(1, 5):
        total = body_len + n
        if n == 1 and total < 0x40:
            return bytes([total])
        if n > 1 and total < 1 << (4 + 8 * (n - 1)):
            out = [((n - 1) << 6) | (total & 0xF)]
            total >>= 4
            for _ in range(n - 1):
                out.append(total & 0xFF)
                total >>= 8
            return bytes(out)
    raise ValueError("AML package too large")


def _seg(seg: str) -> bytes:
    if not 1 <= len(seg) <= 4 or not (seg[0].isupper() or seg[0] == "_") or not all(
        c.isupper() or c.isdigit() or c == "_" for c in seg
    ):
        raise ValueError(f"bad AML name segment {seg!r}")
    return seg.ljust(4, "_").encode()


def name_string(path: str) -> bytes:
    """Encode ``\\_SB_.COM1``, ``_HID``, ``^PARENT`` ... as an AML NameString."""
    out = bytearray()
    if path.startswith("\\"):
        out.append(ROOT_CHAR)
        path = path[1:]
    while path.startswith("^"):
        out.append(PARENT_PREFIX)
        path = path[1:]
    segs = [s for s in path.split(".") if s] if path else []
    if not segs:
        out.append(0)  # NullName
    elif len(segs) == 1:
        out += _seg(segs[0])
    elif len(segs) == 2:
        out.append(DUAL_NAME_PREFIX)
        out += _seg(segs[0]) + _seg(segs[1])
    else:
        out += bytes([MULTI_NAME_PREFIX, len(segs)])
        for s in segs:
            out += _seg(s)
    return bytes(out)


def encode_integer(value: int) -> bytes:
    if value < 0 or value >= 1 << 64:
        raise ValueError("AML integers are unsigned 64-bit")
    if value == 0:
        return bytes([ZERO_OP])
    if value == 1:
        return bytes([ONE_OP])
    if value <= 0xFF:
        return bytes([BYTE_PREFIX, value])
    if value <= 0xFFFF:
        return bytes([WORD_PREFIX]) + struct.pack("<H", value)
    if value <= 0xFFFFFFFF:
        return bytes([DWORD_PREFIX]) + struct.pack("<I", value)
    return bytes([QWORD_PREFIX]) + struct.pack("<Q", value)


def encode(term: Term) -> bytes:
    """Encode a data term: int, str (String), bytes (raw, already AML), Node, or list (Package)."""
    if isinstance(term, Node):
        return term.encode()
    if isinstance(term, bool):
        return encode_integer(int(term))
    if isinstance(term, int):
        if isinstance(term, EisaId):
            return bytes([DWORD_PREFIX]) + struct.pack("<I", int(term))
        return encode_integer(term)
    if isinstance(term, str):
        data = term.encode("ascii")
        if b"\0" in data or any(b > 0x7F for b in data):
            raise ValueError("AML strings are 7-bit ASCII without NUL")
        return bytes([STRING_PREFIX]) + data + b"\0"
    if isinstance(term, (bytes, bytearray)):
        return bytes(term)
    if isinstance(term, list):
        return Package(term).encode()
    raise TypeError(f"cannot encode {term!r} as AML")


class Name(Node):
    def __init__(self, name: str, value: Term) -> None:
        self.name, self.value = name, value

    def encode(self) -> bytes:
        return bytes([NAME_OP]) + name_string(self.name) + encode(self.value)


class Package(Node):
    def __init__(self, elements: Iterable[Term]) -> None:
        self.elements = list(elements)
        if len(self.elements) > 255:
            raise ValueError("Package with more than 255 elements")

    def encode(self) -> bytes:
        body = bytes([len(self.elements)]) + b"".join(encode(e) for e in self.elements)
        return bytes([PACKAGE_OP]) + pkg_length(len(body)) + body


class Buffer(Node):
    def __init__(self, data: bytes) -> None:
        self.data = bytes(data)

    def encode(self) -> bytes:
        body = encode_integer(len(self.data)) + self.data
        return bytes([BUFFER_OP]) + pkg_length(len(body)) + body


class _Container(Node):
    opcode: bytes = b""

    def __init__(self, name: str, children: Iterable[Node]) -> None:
        self.name, self.children = name, list(children)

    def encode(self) -> bytes:
        body = name_string(self.name) + b"".join(c.encode() for c in self.children)
        return self.opcode + pkg_length(len(body)) + body


class Scope(_Container):
    opcode = bytes([SCOPE_OP])


class Device(_Container):
    opcode = bytes([EXT_OP_PREFIX, DEVICE_OP])


# ---- resource descriptors (ACPI 6.4) ------------------------------------------------------------


class ResourceDescriptor(Protocol):
    """A resource descriptor a :class:`ResourceTemplate` holds (Memory32Fixed, IoPort, ...)."""

    def encode(self) -> bytes: ...


class Memory32Fixed:
    """Large descriptor 0x86: a fixed 32-bit memory range."""

    def __init__(self, base: int, length: int, writable: bool = True) -> None:
        if base < 0 or length <= 0 or base + length > 1 << 32:
            raise ValueError("Memory32Fixed range outside 32 bits")
        self.base, self.length, self.writable = base, length, writable

    def encode(self) -> bytes:
        return struct.pack("<BHBII", 0x86, 9, 1 if self.writable else 0, self.base, self.length)


class ExtendedInterrupt:
    """Large descriptor 0x89: interrupt numbers (GSIs), with mode/polarity/sharing flags."""

    def __init__(self, interrupts: Iterable[int], *, edge: bool = False, active_low: bool = False,
                 shared: bool = False, consumer: bool = True) -> None:
        self.interrupts = list(interrupts)
        if not 1 <= len(self.interrupts) <= 255:
            raise ValueError("1 to 255 interrupts")
        self.flags = (1 if consumer else 0) | (2 if edge else 0) | (4 if active_low else 0)
        self.flags |= 8 if shared else 0

    def encode(self) -> bytes:
        n = len(self.interrupts)
        return struct.pack(f"<BHBB{n}I", 0x89, 2 + 4 * n, self.flags, n, *self.interrupts)


class IoPort:
    """Small descriptor 0x47 (IO, 16-bit decode): a fixed port range."""

    def __init__(self, base: int, length: int) -> None:
        if not 0 <= base <= 0xFFFF or not 0 < length <= 0xFF:
            raise ValueError("bad IO range")
        self.base, self.length = base, length

    def encode(self) -> bytes:
        return struct.pack("<BBHHBB", 0x47, 1, self.base, self.base, 1, self.length)


class IrqNoFlags:
    """Small descriptor 0x22 (IRQNoFlags): ISA IRQs as a 16-bit mask (edge, active high)."""

    def __init__(self, irqs: Iterable[int]) -> None:
        self.mask = 0
        for irq in irqs:
            if not 0 <= irq < 16:
                raise ValueError("ISA IRQs are 0-15")
            self.mask |= 1 << irq

    def encode(self) -> bytes:
        return struct.pack("<BH", 0x22, self.mask)


class AddressSpace:
    """Large descriptors 0x88 (Word) / 0x87 (DWord) Address Space: a bridge's bus, I/O or memory
    window, as a resource producer with fixed minimum and maximum."""

    BUS, IO, MEMORY = 2, 1, 0

    def __init__(self, kind: int, minimum: int, maximum: int, *, dword: bool = False) -> None:
        limit = 0xFFFFFFFF if dword else 0xFFFF
        if not 0 <= minimum <= maximum <= limit:
            raise ValueError("bad address space range")
        self.kind, self.minimum, self.maximum, self.dword = kind, minimum, maximum, dword

    def encode(self) -> bytes:
        general = 0x0C  # MinFixed | MaxFixed, producer, positive decode
        specific = {self.MEMORY: 0x01, self.IO: 0x03, self.BUS: 0x00}[self.kind]  # RW / entire range
        length = self.maximum - self.minimum + 1
        if self.dword:
            return struct.pack("<BHBBBIIIII", 0x87, 23, self.kind, general, specific, 0,
                               self.minimum, self.maximum, 0, length)
        return struct.pack("<BHBBBHHHHH", 0x88, 13, self.kind, general, specific, 0,
                           self.minimum, self.maximum, 0, length)


class ResourceTemplate(Buffer):
    """A Buffer of resource descriptors ended by an End Tag (0x79, checksum 0 = "not computed")."""

    def __init__(self, descriptors: Iterable[ResourceDescriptor]) -> None:
        body = b"".join(d.encode() for d in descriptors)
        super().__init__(body + bytes([0x79, 0x00]))
