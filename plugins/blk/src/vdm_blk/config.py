"""The options of a virtio-blk disk (``--disk PATH[,ro][,direct]...`` or a ``[[disk]]`` table).

``path`` is a local image or block device, or a URI of a registered protocol
(``nbd://host:port/export``, ``nbd+unix:///export?socket=PATH``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

__all__ = ["BlkConfig"]


@dataclass
class BlkConfig:
    #: the disk image or block device, or an NBD URI (nbd://host:port/export, nbd+unix:///export?socket=PATH)
    path: str
    #: advertise VIRTIO_BLK_F_RO and fail every write with IOERR
    ro: bool = False
    #: open the image with O_DIRECT (bypass the host page cache)
    direct: bool = False
    #: the serial number GET_ID returns (default: from the image's file name)
    serial: Optional[str] = None
    #: writeback (flush on request), writethrough (every write synced), none (O_DIRECT + writeback)
    cache: str = field(default="writeback", metadata={"choices": ("writeback", "writethrough", "none")})
    #: unmap: DISCARD frees space in the image; ignore: DISCARD is not offered
    discard: str = field(default="unmap", metadata={"choices": ("unmap", "ignore")})
    #: number of request queues (VIRTIO_BLK_F_MQ when more than one)
    queues: int = 1
    #: entries per queue (a power of two)
    queue_size: int = 256
    #: image format; auto reads the qcow2 magic
    format: str = field(default="auto", metadata={"choices": ("auto", "raw", "qcow2")})
    #: a qcow2 backing file that may be opened although it is not beside the image (":"-separated)
    allow_backing: Optional[str] = None
    #: I/O worker threads serving requests in flight
    iothreads: int = 4
    #: open: lock the image when it is opened; start: only while the device runs (live migration
    #: between two vhost-user backends on one raw or qcow2 image; backends/locking.py)
    lock: str = field(default="open", metadata={"choices": ("open", "start")})
    #: nbd: seconds a request waits for a server that went away (reconnecting) before EIO; 0: at once
    reconnect_timeout: float = 10.0
    #: nbd: seconds without a reply after which a connection counts as lost
    request_timeout: float = 30.0
    #: nbd: connections (requests in parallel) where the server allows multi-conn; else one
    connections: int = 4

    def __post_init__(self) -> None:
        if not 1 <= self.queues <= 64:
            raise ValueError("queues must be between 1 and 64")
        if not 2 <= self.queue_size <= 32768 or self.queue_size & (self.queue_size - 1):
            raise ValueError("queue_size must be a power of two between 2 and 32768")
        if not 1 <= self.iothreads <= 256:
            raise ValueError("iothreads must be between 1 and 256")
        if not 0 <= self.reconnect_timeout <= 3600 or not 0.1 <= self.request_timeout <= 3600:
            raise ValueError("reconnect_timeout is 0..3600 seconds, request_timeout 0.1..3600")
        if not 1 <= self.connections <= 64:
            raise ValueError("connections must be between 1 and 64")
        if self.serial is not None and len(self.serial.encode()) > 20:
            raise ValueError("serial is at most 20 bytes")
