#!/usr/bin/env python3
"""Fuzz target: virtio-blk request handling.

The input is a series of requests -- type, sector, header split, data and status buffer layout --
sent by the in-process driver to a blk device over a disk that records every backend call.
Invariants: every request comes back with a status byte of OK, IOERR or UNSUPP (or the device
marks itself broken); the backend is never asked for I/O past the end of the disk or of a length
that is not a multiple of 512; nothing outside guest RAM changes.
"""

from __future__ import annotations

import struct
import sys

import common

DISK = 256 << 10


class CheckingDisk:
    logical_block_size = 512
    physical_block_size = 4096
    optimal_io_size = 0
    supports_discard = True
    supports_write_zeroes = True
    size = DISK
    read_only = False

    def __init__(self, inline: bool = False) -> None:
        self.data = bytearray(DISK)
        self.violations: list[str] = []
        self.inline = inline  # serve the device's inline paths too (page-cache hits, small writes)

    def _check(self, what: str, offset: int, length: int) -> None:
        if offset < 0 or length < 0 or offset + length > DISK or offset % 512 or length % 512:
            self.violations.append(f"{what} {offset}+{length}")

    def readv(self, offset, buffers):
        n = sum(len(b) for b in buffers)
        self._check("read", offset, n)
        return n

    def writev(self, offset, buffers):
        n = sum(len(b) for b in buffers)
        self._check("write", offset, n)
        return n

    def readv_nowait(self, offset, buffers):
        return self.readv(offset, buffers) if self.inline else None

    def writev_inline(self, offset, buffers):
        return self.writev(offset, buffers) if self.inline else None

    def flush(self):
        pass

    def discard(self, offset, length):
        self._check("discard", offset, length)

    def write_zeroes(self, offset, length, unmap):
        self._check("write_zeroes", offset, length)

    def close(self):
        pass


def one_input(data: bytes) -> None:
    import atheris
    from vdm.testing import VirtioTestDriver
    from vdm_blk.config import BlkConfig
    from vdm_blk.device import BlkDevice

    fdp = atheris.FuzzedDataProvider(data)
    disk = CheckingDisk()
    dev = BlkDevice(disk, BlkConfig(path="fuzz.img", ro=fdp.ConsumeBool(), iothreads=2))
    disk.inline = fdp.ConsumeBool()
    drv = VirtioTestDriver(dev, ram_size=1 << 20)
    drv.init(exclude=fdp.ConsumeIntInRange(0, 1) << 13)  # sometimes without DISCARD
    for _ in range(fdp.ConsumeIntInRange(1, 12)):
        rtype = (0, 1, 4, 8, 11, 13, 10, fdp.ConsumeIntInRange(0, 255))[fdp.ConsumeIntInRange(0, 7)]
        sector = (
            fdp.ConsumeIntInRange(0, 600) if fdp.ConsumeBool() else fdp.ConsumeIntInRange(0, (1 << 64) - 1)
        )
        header = struct.pack("<IIQ", rtype, 0, sector)
        cut = fdp.ConsumeIntInRange(0, 16)
        out = [header[:cut], header[cut:]] if fdp.ConsumeBool() else [header[: fdp.ConsumeIntInRange(0, 16)]]
        if rtype in (1, 11, 13) or fdp.ConsumeBool():
            out.append(fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 2048)))
        in_lens = [fdp.ConsumeIntInRange(0, 2048) for _ in range(fdp.ConsumeIntInRange(0, 3))]
        out = [b for b in out if b]
        if not out and not in_lens:
            in_lens = [1]
        try:
            used = drv.request(0, out, in_lens, timeout=5, indirect=fdp.ConsumeBool())
        except TimeoutError:
            assert drv.needs_reset, "request neither completed nor device broken"
            break
        if sum(in_lens) and used.written:
            assert used.data[sum(in_lens) - 1] in (0, 1, 2), f"bad status {used.data[-1]}"
        assert used.written <= sum(in_lens)
    dev.close()
    assert not disk.violations, disk.violations
    drv.ram.check_guards()


if __name__ == "__main__":
    common.run(
        one_input,
        (
            *common.QUEUE_MODULES,
            "vdm.device",
            "vdm.testing",
            "vdm_blk.device",
        ),
    )
    sys.exit(0)
