"""The virtio-vsock packet header (virtio 1.2, 5.10.6) and its constants.

Every packet on the rx and tx queues starts with this 44-byte little-endian header; a
``VIRTIO_VSOCK_OP_RW`` packet's ``len`` payload bytes follow it in the same chain. ``buf_alloc``
and ``fwd_cnt`` are the sender's credit: the size of its receive buffer for that connection and
the bytes it has consumed from it so far. A sender may have at most
``peer_buf_alloc - (tx_cnt - peer_fwd_cnt)`` bytes in flight (32-bit wrapping counters).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

__all__ = [
    "HDR",
    "HOST_CID",
    "MAX_PAYLOAD",
    "SHUTDOWN_RCV",
    "SHUTDOWN_SEND",
    "TYPE_STREAM",
    "Hdr",
    "Op",
]

#: src_cid, dst_cid (le64), src_port, dst_port, len (le32), type, op (le16), flags, buf_alloc, fwd_cnt (le32)
HDR = struct.Struct("<QQIIIHHIII")
assert HDR.size == 44

#: the host's context id (VMADDR_CID_HOST)
HOST_CID = 2
#: the one socket type served: a stream (VIRTIO_VSOCK_TYPE_STREAM); SEQPACKET is not offered
TYPE_STREAM = 1
#: the largest payload one packet may carry (Linux's VIRTIO_VSOCK_MAX_PKT_BUF_SIZE)
MAX_PAYLOAD = 64 * 1024
#: SHUTDOWN flags: the sender will receive no more / send no more
SHUTDOWN_RCV = 1
SHUTDOWN_SEND = 2


class Op:
    INVALID = 0
    REQUEST = 1
    RESPONSE = 2
    RST = 3
    SHUTDOWN = 4
    RW = 5
    CREDIT_UPDATE = 6
    CREDIT_REQUEST = 7


@dataclass(frozen=True)
class Hdr:
    src_cid: int
    dst_cid: int
    src_port: int
    dst_port: int
    len: int
    type: int
    op: int
    flags: int = 0
    buf_alloc: int = 0
    fwd_cnt: int = 0

    @classmethod
    def unpack(cls, data: bytes) -> Hdr:
        """The header at the start of ``data`` (which holds at least HDR.size bytes)."""
        return cls(*HDR.unpack_from(data))

    def pack(self) -> bytes:
        return HDR.pack(self.src_cid, self.dst_cid, self.src_port, self.dst_port, self.len, self.type,
                        self.op, self.flags, self.buf_alloc, self.fwd_cnt)
