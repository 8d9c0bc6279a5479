"""cache=none on guest memory the kernel cannot pin for DMA (issue 15's EFAULT on real Xen).

On Xen, ``vdm dm-only`` sees guest RAM as privcmd foreign mappings: the CPU reads and writes them,
but get_user_pages() refuses them, so an O_DIRECT read or write straight into/out of them fails
with EFAULT. Here the same refusal comes from a real kernel mapping made on this machine:
memfd_secret(2) memory, which the owning process reads and writes like any other but which GUP
refuses by design (mm/gup.c: secretmem is never pinned). No Xen and no mock: the EFAULT in these
tests is the kernel's own. The tests skip (saying why) where memfd_secret is unavailable.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import mmap
import os
import struct

import pytest
from vdm.memory import FlatGuestMemory, MemoryRegion
from vdm.testing.memory import CANARY, GUARD, GuestRam
from vdm_blk.backends import DiskError, open_disk
from vdm_blk.config import BlkConfig
from vdm_blk.device import S_OK, T_IN, T_OUT, BlkDevice

from .helpers import create_qcow2, file_bytes, make_raw, pattern

SIZE = 4 << 20
_SYS_MEMFD_SECRET = 447  # the same number on x86_64 and arm64 (the generic syscall table)


def secret_memory(size: int) -> mmap.mmap:
    """``size`` bytes of memfd_secret memory (skips the test where the kernel has none)."""
    libc = ctypes.CDLL(None, use_errno=True)
    fd = libc.syscall(_SYS_MEMFD_SECRET, os.O_CLOEXEC)
    if fd < 0:
        err = ctypes.get_errno()
        pytest.skip(f"memfd_secret(2) unavailable here ({os.strerror(err)}): no mapping GUP refuses")
    try:
        os.ftruncate(fd, size)
        return mmap.mmap(fd, size)
    except OSError as e:  # RLIMIT_MEMLOCK counts secret memory
        pytest.skip(f"memfd_secret memory of {size} bytes refused ({e.strerror})")
    finally:
        os.close(fd)


def _open_direct(path: str):
    try:
        return open_disk(path, direct=True)
    except DiskError as e:
        pytest.skip(f"O_DIRECT unsupported here: {e}")


def test_the_kernel_refuses_direct_io_on_secret_memory(tmp_path):
    """The premise: this machine really has a mapping that O_DIRECT cannot use (else the other
    tests would prove nothing)."""
    path = str(tmp_path / "premise.raw")
    with open(path, "wb") as f:
        f.write(pattern(1 << 16, 30))  # written blocks: a hole would be zero-filled by a CPU copy
    mem = secret_memory(1 << 16)
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    try:
        with pytest.raises(OSError) as e:
            os.preadv(fd, [memoryview(mem)[:4096]], 0)
        assert e.value.errno == errno.EFAULT
    finally:
        os.close(fd)


@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
def test_direct_disk_reads_and_writes_unpinnable_memory(tmp_path, caplog, fmt):
    path = str(tmp_path / f"disk.{fmt}")
    if fmt == "raw":
        make_raw(path, SIZE)
    else:
        create_qcow2(path, SIZE, "cluster_size=65536")
    disk = _open_direct(path)
    mem = secret_memory(1 << 18)
    view = memoryview(mem)
    data = pattern(3 * 4096, 31)
    view[: len(data)] = data
    with caplog.at_level(logging.INFO):
        # page-aligned buffers: the backend tries them straight with O_DIRECT first
        assert disk.writev(8192, [view[:4096], view[4096 : len(data)]]) == len(data)
        assert disk.readv(8192, [view[65536 : 65536 + len(data)]]) == len(data)
        assert bytes(view[65536 : 65536 + len(data)]) == data
        # later requests keep working (and say nothing more)
        more = pattern(65536, 32)
        view[131072 : 131072 + len(more)] = more
        assert disk.writev(1 << 20, [view[131072 : 131072 + len(more)]]) == len(more)
        assert disk.readv(1 << 20, [view[:65536]]) == 65536
        assert bytes(view[:65536]) == more
        disk.flush()
    lines = [r.getMessage() for r in caplog.records if "bounce" in r.getMessage()]
    assert len(lines) == 1, lines
    assert path in lines[0]
    disk.close()
    if fmt == "raw":
        assert file_bytes(path)[8192 : 8192 + len(data)] == data
        assert file_bytes(path)[1 << 20 : (1 << 20) + len(more)] == more


class SecretGuestRam(GuestRam):
    """The test driver's guest RAM, placed in memfd_secret memory (guest pages the host kernel
    cannot pin, as a Xen domU's pages are to dom0's vdm)."""

    def __init__(self, size: int, base: int = 0x4000_0000) -> None:
        self.base = base
        self.size = size
        self._host = secret_memory(size + 2 * GUARD)
        self._host[:GUARD] = bytes([CANARY]) * GUARD
        self._host[GUARD + size :] = bytes([CANARY]) * GUARD
        self.region = MemoryRegion(base, memoryview(self._host)[GUARD : GUARD + size])
        self.memory = FlatGuestMemory([self.region])
        self._free = [(base, size)]


def _hdr(rtype: int, sector: int) -> bytes:
    return struct.pack("<IIQ", rtype, 0, sector)


def test_cache_none_guest_requests_on_unpinnable_guest_memory(tmp_path, virtio_driver, caplog):
    """What the Xen user saw: every request of a cache=none disk failed (IOERR). Now the guest's
    writes land in the image and its reads return them."""
    path = make_raw(str(tmp_path / "disk.raw"), SIZE)
    backend = _open_direct(path)
    dev = BlkDevice(backend, BlkConfig(path=path, cache="none"))
    drv = virtio_driver(dev, ram=SecretGuestRam(1 << 20))
    drv.init()
    q = drv.queues[0]
    results = []
    with caplog.at_level(logging.INFO):
        for i in range(3):
            data = bytes(pattern(8192, 40 + i))
            # page-aligned data buffers in guest memory, as a guest's block layer sends them
            head = q.add([_hdr(T_OUT, 16 * i), data], [1], out_align=4096, in_align=4096)
            drv.kick(0)
            results.append(next(u for u in drv.wait(0) if u.head == head).data)
            head = q.add([_hdr(T_IN, 16 * i)], [8192, 1], out_align=4096, in_align=4096)
            drv.kick(0)
            results.append(next(u for u in drv.wait(0) if u.head == head).data)
            assert results[-2:] == [bytes([S_OK]), data + bytes([S_OK])]
    assert dev.stats["errors"] == 0
    assert len([r for r in caplog.records if "bounce" in r.getMessage()]) == 1
    dev.close()
    for i in range(3):
        assert file_bytes(path)[16 * i * 512 : 16 * i * 512 + 8192] == pattern(8192, 40 + i)
