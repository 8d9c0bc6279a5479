"""The options of a vsock device: ``--vsock cid=3,path=/tmp/v.sock[,buf_size=N][,max_conns=N]``.

The host side follows firecracker's / cloud-hypervisor's / rust-vmm vhost-device-vsock's
convention: a guest connecting to host port P reaches the Unix socket ``PATH_P`` (something on
the host listens there); a host program connects to ``PATH`` (vdm listens there), sends
``CONNECT P\\n``, gets ``OK <hostport>\\n`` and then talks to the guest's port P.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

__all__ = ["MAX_BUF_SIZE", "MAX_CONNS", "MIN_BUF_SIZE", "VsockConfig"]

#: the smallest and largest per-connection buffer (the credit the guest gets, buf_alloc)
MIN_BUF_SIZE = 4096
MAX_BUF_SIZE = 16 << 20
#: the most connections one device may hold
MAX_CONNS = 4096
#: the longest PATH: PATH_4294967295 must fit sun_path (107 bytes and the final NUL)
MAX_PATH = 107 - len("_4294967295")


@dataclass
class VsockConfig:
    #: the guest's context id (3 to 0xfffffffe: 0-2 are the hypervisor's, local and the host's)
    cid: int = 0
    #: the Unix socket vdm listens on for host->guest connections; PATH_P is dialled for guest->host
    path: str = ""
    #: bytes vdm buffers per connection towards a host socket (the credit the guest gets)
    buf_size: int = 256 * 1024
    #: connections held at once (guest->host and host->guest together); more are refused (RST)
    max_conns: int = 256
    #: entries of each queue
    queue_size: int = field(default=256, metadata={"choices": (16, 32, 64, 128, 256, 512, 1024)})

    def __post_init__(self) -> None:
        if not 3 <= self.cid <= 0xFFFF_FFFE:
            raise ValueError(f"give the guest's context id, cid=3 to 4294967294 (not {self.cid})")
        if not self.path:
            raise ValueError("give the host socket: path=/run/vm.vsock (guest port P dials path_P)")
        if len(os.fsencode(self.path)) > MAX_PATH:
            raise ValueError(f"path {self.path} is longer than {MAX_PATH} bytes (path_PORT must fit a "
                             "Unix socket address): use a shorter or relative path")
        if not MIN_BUF_SIZE <= self.buf_size <= MAX_BUF_SIZE:
            raise ValueError(f"buf_size must be {MIN_BUF_SIZE} to {MAX_BUF_SIZE} bytes, not {self.buf_size}")
        if not 1 <= self.max_conns <= MAX_CONNS:
            raise ValueError(f"max_conns must be 1 to {MAX_CONNS}, not {self.max_conns}")
