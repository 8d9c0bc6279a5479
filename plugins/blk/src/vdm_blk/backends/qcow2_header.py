"""The qcow2 header: parsing and validation (QEMU's docs/interop/qcow2.txt).

:func:`read_header` reads and checks everything that can be checked before the first request,
and raises :class:`DiskError` naming the problem and the fix. It only reads: a refused image is
never modified.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Optional

from .base import DiskError
from .protocol import Protocol

__all__ = ["MAGIC", "Qcow2Header", "read_header"]

MAGIC = b"QFI\xfb"
# magic, version, backing_file_offset, backing_file_size, cluster_bits, size, crypt_method,
# l1_size, l1_table_offset, refcount_table_offset, refcount_table_clusters, nb_snapshots,
# snapshots_offset
_V2 = struct.Struct(">4sIQIIQIIQQIIQ")
# incompatible, compatible, autoclear features, refcount_order, header_length
_V3 = struct.Struct(">QQQII")

INCOMPAT_DIRTY = 1 << 0
INCOMPAT_CORRUPT = 1 << 1
INCOMPAT_DATA_FILE = 1 << 2
INCOMPAT_COMPRESSION = 1 << 3
INCOMPAT_EXTL2 = 1 << 4
COMPAT_LAZY_REFCOUNTS = 1 << 0

EXT_END = 0
EXT_BACKING_FORMAT = 0xE2792ACA
EXT_FEATURE_TABLE = 0x6803F857
EXT_DATA_FILE = 0x44415441
EXT_CRYPTO = 0x0537BE77

MIN_CLUSTER_BITS = 9
MAX_CLUSTER_BITS = 21  # QEMU's limit: 2 MiB clusters
MAX_L1_BYTES = 32 << 20  # QEMU's limit
MAX_REFTABLE_BYTES = 8 << 20  # QEMU's limit
MAX_SNAPSHOTS = 65536  # QEMU's limit
# L1/L2 entries: bits 9-55 hold an offset
OFFSET_MASK = 0x00FFFFFFFFFFFE00
COPIED = 1 << 63  # refcount 1: may be written in place
COMPRESSED = 1 << 62
ZERO_FLAG = 1
L1_RESERVED = 0x7F000000000001FF
L2_RESERVED = 0x3F000000000001FE  # bits 1-8 and 56-61 of a standard entry
#: bits of an L2 entry that make it anything but a plain data cluster (or corrupt)
NOT_PLAIN = COMPRESSED | L2_RESERVED | ZERO_FLAG
# what a guest range maps to (the kinds of L2 entries)
DATA, UNALLOC, ZERO, COMPRESSED_KIND = range(4)


@dataclass
class Qcow2Header:
    version: int
    backing_file_offset: int
    backing_file_size: int
    cluster_bits: int
    size: int
    crypt_method: int
    l1_size: int
    l1_table_offset: int
    refcount_table_offset: int
    refcount_table_clusters: int
    nb_snapshots: int
    snapshots_offset: int
    incompatible_features: int = 0
    compatible_features: int = 0
    autoclear_features: int = 0
    refcount_order: int = 4
    header_length: int = 72
    compression_type: int = 0
    backing_file: Optional[str] = None
    backing_format: Optional[str] = None
    feature_names: dict = field(default_factory=dict)

    @property
    def cluster_size(self) -> int:
        return 1 << self.cluster_bits

    def feature_name(self, kind: int, bit: int) -> str:
        return self.feature_names.get((kind, bit), f"bit {bit}")


def _fail(path: str, what: str, fix: str = "") -> DiskError:
    return DiskError(f"{path}: not a usable qcow2 image: {what}" + (f"; {fix}" if fix else ""))


def read_header(f: Protocol, file_size: int) -> Qcow2Header:
    """Parse and validate the header of the qcow2 image open in ``f``."""
    path = f.path
    raw = f.pread(_V2.size, 0)
    if len(raw) < _V2.size:
        raise _fail(path, f"the file is {file_size} bytes, shorter than a qcow2 header")
    fields = _V2.unpack(raw)
    if fields[0] != MAGIC:
        raise _fail(path, "bad magic (not a qcow2 file)", "open it with format=raw if it is a raw image")
    h = Qcow2Header(*fields[1:])
    if h.version not in (2, 3):
        raise _fail(
            path,
            f"qcow2 version {h.version} is not supported (only 2 and 3)",
            "convert it with qemu-img convert -O qcow2",
        )
    if not MIN_CLUSTER_BITS <= h.cluster_bits <= MAX_CLUSTER_BITS:
        raise _fail(path, f"cluster_bits {h.cluster_bits} is outside {MIN_CLUSTER_BITS}..{MAX_CLUSTER_BITS}")
    cs = h.cluster_size
    if h.version == 3:
        more = f.pread(_V3.size, _V2.size)
        if len(more) < _V3.size:
            raise _fail(path, "the version 3 header is truncated")
        (
            h.incompatible_features,
            h.compatible_features,
            h.autoclear_features,
            h.refcount_order,
            h.header_length,
        ) = _V3.unpack(more)
        if h.header_length < 104 or h.header_length % 8 or h.header_length > cs:
            raise _fail(
                path,
                f"header_length {h.header_length} is invalid (at least 104, a multiple of 8, "
                "at most a cluster)",
            )
        if h.header_length > 104:
            byte = f.pread(1, 104)
            if not byte:
                raise _fail(
                    path,
                    f"the header is truncated (header_length {h.header_length}, "
                    f"the file is {file_size} bytes)",
                )
            h.compression_type = byte[0]
        if h.refcount_order > 6:
            raise _fail(path, f"refcount_order {h.refcount_order} is over 6")
    _read_extensions(f, h, path)
    incompat = h.incompatible_features
    if incompat & INCOMPAT_CORRUPT:
        raise _fail(path, "the image is marked corrupt", "repair it with qemu-img check -r all")
    if incompat & INCOMPAT_DIRTY:
        raise _fail(
            path,
            "the image is marked dirty (lazy refcounts were not written back)",
            "repair the refcounts with qemu-img check -r all, then open it again",
        )
    if incompat & INCOMPAT_DATA_FILE:
        raise _fail(
            path,
            "external data files are not supported",
            "convert it with qemu-img convert -O qcow2 (without data_file)",
        )
    if incompat & INCOMPAT_COMPRESSION or h.compression_type:
        raise _fail(
            path,
            f"compression type {h.compression_type} is not supported (only zlib)",
            "convert it with qemu-img convert -O qcow2 -o compression_type=zlib",
        )
    if incompat & INCOMPAT_EXTL2:
        raise _fail(
            path,
            "extended L2 entries (subclusters) are not supported",
            "convert it with qemu-img convert -O qcow2 -o extended_l2=off",
        )
    unknown = incompat & ~(
        INCOMPAT_DIRTY | INCOMPAT_CORRUPT | INCOMPAT_DATA_FILE | INCOMPAT_COMPRESSION | INCOMPAT_EXTL2
    )
    if unknown:
        names = ", ".join(h.feature_name(0, b) for b in range(64) if unknown >> b & 1)
        raise _fail(path, f"unknown incompatible features: {names}", "use a newer version of vdm or QEMU")
    if h.crypt_method:
        raise _fail(
            path, f"encryption (method {h.crypt_method}) is not supported", "decrypt it with qemu-img convert"
        )
    if h.size % 512:
        raise _fail(path, f"virtual size {h.size} is not a multiple of 512")
    # tables: alignment, inside the file, big enough
    l2_entries = cs // 8
    need_l1 = -(-h.size // (cs * l2_entries))
    if h.l1_size < need_l1:
        raise _fail(path, f"the L1 table has {h.l1_size} entries, {need_l1} are needed for {h.size} bytes")
    if h.l1_size * 8 > MAX_L1_BYTES:
        raise _fail(path, f"the L1 table of {h.l1_size} entries is larger than {MAX_L1_BYTES} bytes")
    _check_table(path, "L1 table", h.l1_table_offset, h.l1_size * 8, cs, file_size, h.l1_size > 0)
    if not h.refcount_table_clusters or h.refcount_table_clusters * cs > MAX_REFTABLE_BYTES:
        raise _fail(path, f"refcount table of {h.refcount_table_clusters} clusters is empty or too large")
    _check_table(
        path, "refcount table", h.refcount_table_offset, h.refcount_table_clusters * cs, cs, file_size, True
    )
    if h.nb_snapshots > MAX_SNAPSHOTS:
        raise _fail(
            path,
            f"the snapshot table is too large ({h.nb_snapshots} snapshots, QEMU's limit is {MAX_SNAPSHOTS}); "
            "qemu-img cannot open it either",
        )
    if h.nb_snapshots:
        _check_table(path, "snapshot table", h.snapshots_offset, h.nb_snapshots * 40, cs, file_size, True)
    return h


def _check_table(path: str, what: str, offset: int, length: int, cs: int, file_size: int, used: bool) -> None:
    if not used:
        return
    if offset % cs or offset == 0:
        raise _fail(path, f"the {what} offset 0x{offset:x} is not a non-zero multiple of the cluster size")
    if offset + length > file_size:
        raise _fail(
            path,
            f"the {what} (0x{offset:x}+{length}) extends past the end of the file ({file_size})",
            "the file is truncated",
        )


def _read_extensions(f: Protocol, h: Qcow2Header, path: str) -> None:
    cs = h.cluster_size
    first = f.pread(cs, 0)
    if h.backing_file_offset:
        if (
            h.backing_file_size == 0
            or h.backing_file_size > 1023
            or h.backing_file_offset + h.backing_file_size > cs
        ):
            raise _fail(path, "the backing file name is outside the first cluster or longer than 1023 bytes")
        name = first[h.backing_file_offset : h.backing_file_offset + h.backing_file_size]
        if len(name) < h.backing_file_size:
            raise _fail(path, "the backing file name is truncated")
        try:
            h.backing_file = name.decode()
        except UnicodeDecodeError:
            raise _fail(path, "the backing file name is not UTF-8")
        if "\0" in h.backing_file:
            raise _fail(path, "the backing file name contains a NUL byte")
    pos = h.header_length  # 72 for version 2, which may have extensions too
    while pos + 8 <= len(first):
        etype, elen = struct.unpack_from(">II", first, pos)
        if etype == EXT_END:
            return
        data = first[pos + 8 : pos + 8 + elen]
        if len(data) < elen:
            raise _fail(path, f"header extension 0x{etype:08x} extends past the first cluster")
        if etype == EXT_BACKING_FORMAT:
            h.backing_format = data.decode("ascii", "replace")
        elif etype == EXT_FEATURE_TABLE:
            for off in range(0, elen - elen % 48, 48):
                kind, bit = data[off], data[off + 1]
                h.feature_names[(kind, bit)] = (
                    data[off + 2 : off + 48].rstrip(b"\0").decode("ascii", "replace")
                )
        pos += 8 + (elen + 7) // 8 * 8
