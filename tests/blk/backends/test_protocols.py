"""Protocol x format: a third party's protocol added through vdm-blk's own hook carries the
built-in formats (qcow2 included); formats written before protocols keep working for files."""

from __future__ import annotations

import types
import warnings

import pytest
from vdm_blk.backends import (
    DiskError,
    Protocol,
    Qcow2Disk,
    RawDisk,
    catalog,
    open_disk,
    register_format,
    unregister_format,
)
from vdm_blk.backends.extend import hookimpl, register_extension

from .helpers import check_image, create_qcow2, make_raw

MiB = 1 << 20


class MemProtocol(Protocol):
    """Bytes in a bytearray: a protocol as a third party would write it (only the abstract methods)."""

    def __init__(self, data: bytearray, read_only: bool) -> None:
        self.data, self.path, self.read_only = data, "memtest:disk", read_only

    def size(self) -> int:
        return len(self.data)

    def preadv(self, views, offset):
        for v in views:
            chunk = self.data[offset : offset + len(v)]
            v[: len(chunk)] = chunk
            v[len(chunk) :] = bytes(len(v) - len(chunk))
            offset += len(v)
        return sum(len(v) for v in views)

    def pwritev(self, views, offset):
        for v in views:
            self.data[offset : offset + len(v)] = v
            offset += len(v)
        return sum(len(v) for v in views)

    def truncate(self, length: int) -> None:
        if length > len(self.data):
            self.data.extend(bytes(length - len(self.data)))

    def sync(self) -> None:
        pass

    def close(self) -> None:
        pass


STORE: dict[str, bytearray] = {}


def _extension() -> types.ModuleType:
    mod = types.ModuleType("vdm_memtest_blk")

    @hookimpl
    def vdm_blk_register_protocols(register_protocol, register_format):
        register_protocol(
            "memtest",
            lambda uri, *, read_only, options: MemProtocol(STORE[uri.split(":", 1)[1]], read_only),
            ["memtest"],
            available=lambda: None,
        )

    mod.vdm_blk_register_protocols = vdm_blk_register_protocols
    return mod


@pytest.fixture(scope="module")
def memtest():
    assert register_extension(_extension(), "memtest") is None
    return STORE


def test_a_third_party_protocol_carries_qcow2_and_raw(tmp_path, memtest):
    image = create_qcow2(str(tmp_path / "d.qcow2"), 8 * MiB, "cluster_size=65536")
    with open(image, "rb") as f:
        memtest["q"] = bytearray(f.read())
    disk = open_disk("memtest:q")
    assert isinstance(disk, Qcow2Disk) and disk.size == 8 * MiB
    data = bytearray(b"\x5a" * 128 * 1024)
    disk.writev(3 * MiB, [memoryview(data)])  # allocates: L2 table, data clusters, refcounts
    disk.flush()
    disk.close()
    with open(image, "wb") as f:
        f.write(memtest["q"])
    check_image(image)
    memtest["r"] = bytearray(MiB)
    raw = open_disk("memtest:r")
    assert isinstance(raw, RawDisk)
    raw.write_zeroes(0, 4096, False)  # the default: written zeros
    raw.discard(0, 4096)  # the default: nothing
    raw.close()
    assert catalog()["protocols"]["memtest"] is None


def test_a_failing_extension_is_skipped_with_its_reason():
    mod = types.ModuleType("broken")

    @hookimpl
    def vdm_blk_register_protocols(register_protocol, register_format):
        raise RuntimeError("no luck")

    mod.vdm_blk_register_protocols = vdm_blk_register_protocols
    assert register_extension(mod, "broken") == "vdm_blk_register_protocols failed: RuntimeError: no luck"


def test_a_format_written_before_protocols_opens_files_and_is_refused_over_others(tmp_path, memtest):
    class Plain(RawDisk):
        pass

    def open_plain(path, *, read_only, direct, writethrough, open_backing):  # API 1: no file=
        return Plain(path, read_only=read_only)

    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        register_format("plaintest", open_plain)
    assert any(issubclass(x.category, DeprecationWarning) and "accept file=" in str(x.message) for x in w)
    try:
        path = make_raw(str(tmp_path / "p.img"), MiB)
        disk = open_disk(path, format="plaintest")
        assert isinstance(disk, Plain)
        disk.close()
        memtest["p"] = bytearray(MiB)
        with pytest.raises(DiskError, match="the plaintest format opens local files only"):
            open_disk("memtest:p", format="plaintest")
    finally:
        unregister_format("plaintest")
