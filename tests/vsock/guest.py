"""A guest's side of virtio-vsock over vdm.testing's driver, for the vsock tests and fuzz target.

It posts rx buffers as Linux 6.1 does (a 44-byte header buffer and a 4 KiB payload buffer in one
chain), sends packets on the tx queue, and keeps a connection's credit as a guest driver would.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from vdm_vsock.packet import HDR, HOST_CID, TYPE_STREAM, Hdr, Op

RX, TX = 0, 1
RX_BUF = 4096


@dataclass
class Packet:
    hdr: Hdr
    data: bytes


class Guest:
    def __init__(self, drv, cid: int, rx_buffers: int = 64, buf_alloc: int = 256 * 1024) -> None:
        self.drv = drv
        self.cid = cid
        self.buf_alloc = buf_alloc
        self.fwd_cnt = 0
        drv.init()
        self.rx_posted = 0
        self.inbox: list[Packet] = []
        self.post_rx(rx_buffers)

    def post_rx(self, n: int) -> None:
        for _ in range(n):
            self.drv.post(RX, [], [HDR.size, RX_BUF])
            self.rx_posted += 1
        self.drv.kick(RX)

    def send(self, op: int, src_port: int, dst_port: int, data: bytes = b"", *, dst_cid: int = HOST_CID,
             length: int | None = None, flags: int = 0, type_: int = TYPE_STREAM, src_cid: int | None = None,
             buf_alloc: int | None = None, split: bool = True) -> None:
        """Send one packet and wait until the device took it."""
        hdr = Hdr(self.cid if src_cid is None else src_cid, dst_cid, src_port, dst_port,
                  len(data) if length is None else length, type_, op, flags,
                  self.buf_alloc if buf_alloc is None else buf_alloc, self.fwd_cnt).pack()
        out = [hdr, data] if split and data else [hdr + data]
        head = self.drv.submit(TX, out, [])
        for u in self.drv.wait(TX, 1):
            assert u.head == head

    def send_raw(self, out: list[bytes]) -> None:
        self.drv.submit(TX, out, [])
        self.drv.wait(TX, 1)

    def poll(self) -> list[Packet]:
        """Packets the device returned since the last call (their buffers posted again)."""
        got = []
        for u in self.drv.collect(RX):
            hdr = Hdr.unpack(u.data[: HDR.size])
            got.append(Packet(hdr, u.data[HDR.size : u.written]))
            self.rx_posted -= 1
        if got:
            self.post_rx(len(got))
        self.inbox += got
        return got

    def expect(self, op: int, *, timeout: float = 5.0, port: int | None = None) -> Packet:
        """Wait for the next packet with ``op`` (to guest ``port`` if given); others stay in the inbox."""
        deadline = time.monotonic() + timeout
        while True:
            self.poll()
            for i, p in enumerate(self.inbox):
                if p.hdr.op == op and (port is None or p.hdr.dst_port == port):
                    return self.inbox.pop(i)
            assert time.monotonic() < deadline, f"no packet with op {op}; got {[p.hdr for p in self.inbox]}"
            time.sleep(0.002)

    def take_data(self, port: int) -> bytes:
        """The RW payloads to ``port`` in the inbox, in order, consumed (fwd_cnt moves on)."""
        self.poll()
        data = b""
        rest = []
        for p in self.inbox:
            if p.hdr.op == Op.RW and p.hdr.dst_port == port:
                data += p.data
            else:
                rest.append(p)
        self.inbox = rest
        self.fwd_cnt += len(data)
        return data
