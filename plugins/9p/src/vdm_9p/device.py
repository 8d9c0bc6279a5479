"""virtio-9p (virtio 1.2, section 5.16 of the 1.3 draft; device id 9): a host directory for the guest.

Top to bottom like kvmtool's ``virtio/9p.c``: identity, features and configuration space, then
the request queue, then the backend lifecycle. The 9P2000.L server itself is
:class:`vdm_9p.server.Server` (the wire format is :mod:`vdm_9p.protocol`, the confinement to the
shared directory :mod:`vdm_9p.export`).

* One queue, ``requestq``. A request is a chain whose device-readable part is one T-message and
  whose device-writable part receives the R-message; the used length is the reply's size. File
  data goes between the file and those buffers without copies (:meth:`Server.serve`).
* Feature ``VIRTIO_9P_MOUNT_TAG`` (bit 0): the configuration space is ``tag_len[2] tag[tag_len]``,
  the name the guest mounts (``mount -t 9p -o trans=virtio TAG /mnt``).
* A chain with no room for an ``Rlerror`` (11 bytes) or shorter than a 9P header breaks the
  driver's contract: the device fails (one log line, DEVICE_NEEDS_RESET). A message whose size
  field disagrees with its buffers, or that is larger than the negotiated msize, gets
  ``Rlerror(EINVAL)``; everything inside a well-framed message is the server's business.
* Reset (or a device failure) clunks every fid, closing its host fds.
* The tag ``/dev/root`` (kvmtool's sandbox: ``vdm run --9p DIR,/dev/root``) makes the share the
  guest's root: :attr:`NinepDevice.guest_params` is what ``vdm run`` adds to the kernel command
  line (``root=/dev/root rootfstype=9p rootflags=...``); a kernel with 9p built in mounts it, an
  initramfs (the guest kit's /init) mounts it and switches to it.
"""

from __future__ import annotations

import errno
import logging
import resource
import struct

from vdm.device import VirtioDevice
from vdm.sg import scatter
from vdm.virtqueue import Virtqueue

from .config import NinepConfig
from .export import Export
from .protocol import HEADER, rlerror
from .server import MAX_MSIZE, Server

__all__ = ["ROOT_TAG", "VIRTIO_ID_9P", "NinepDevice"]

log = logging.getLogger(__name__)

VIRTIO_ID_9P = 9
VIRTIO_9P_MOUNT_TAG = 0
#: the mount tag that makes a share the guest's root (kvmtool's name for it)
ROOT_TAG = "/dev/root"
#: msize of a root share: 256 KiB (the guest's default is 128 KiB at most; the server takes 1 MiB)
ROOT_MSIZE = 262144
#: fds kept for the rest of the process (disks, sockets, eventfds) when fids are sized
_RESERVED_FDS = 512


def _fid_limit(wanted: int) -> int:
    """Raise the soft RLIMIT_NOFILE to the hard limit and size the fid table to fit in it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        try:
            target = hard if hard != resource.RLIM_INFINITY else max(soft, wanted + _RESERVED_FDS)
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    # a fid may hold two fds (its node and, while open, the open file)
    return max(16, min(wanted, (soft - _RESERVED_FDS) // 2))


class NinepDevice(VirtioDevice):
    device_id = VIRTIO_ID_9P
    name = "9p"

    def __init__(self, config: NinepConfig) -> None:
        self.config = config
        self.queue_max_sizes = (config.queue_size,)
        super().__init__()
        self.name = f"9p:{config.tag}"
        self.export = Export(config.path, readonly=config.ro)
        self.server = Server(self.export, max_fids=_fid_limit(config.max_fids))
        #: requests answered so far
        self.requests = 0

    @property
    def guest_params(self) -> str | None:
        """Kernel parameters that make this share the guest's root (tag ``/dev/root``), else None.

        ``vdm run`` puts them before the user's ``--params`` (a later ``root=`` or ``init=`` wins).
        """
        if self.config.tag != ROOT_TAG:
            return None
        mode = "ro" if self.config.ro else "rw"
        return (f"root={ROOT_TAG} rootfstype=9p {mode} "
                f"rootflags=trans=virtio,version=9p2000.L,msize={ROOT_MSIZE}")

    # ---- identity and configuration -------------------------------------------------------------

    def device_features(self) -> int:
        return 1 << VIRTIO_9P_MOUNT_TAG

    def config_space(self) -> bytes:
        tag = self.config.tag.encode()
        return struct.pack("<H", len(tag)) + tag

    # ---- the request queue ----------------------------------------------------------------------

    def process_queue(self, queue: Virtqueue) -> None:
        server = self.server
        while True:
            chain = queue.pop()
            if chain is None:
                break
            readable, writable = chain.readable, chain.writable
            room = chain.writable_len
            first = readable[0] if readable else b""
            head = first if len(first) >= HEADER.size else chain.read(0, HEADER.size)
            if len(head) < HEADER.size or room < HEADER.size + 4:
                queue.discard(chain)
                self.fail(
                    f"request of {chain.readable_len} bytes with {room} bytes for the reply "
                    "(a 9P request needs a 7-byte header and room for an 11-byte Rlerror)"
                )
                return
            size, _mtype, tag = HEADER.unpack_from(head)
            limit = min(chain.readable_len, MAX_MSIZE, max(server.msize, 8192))
            if not HEADER.size <= size <= limit:
                written = scatter(rlerror(tag, errno.EINVAL), writable)
            else:
                written = server.serve(readable, size, writable, room)
            self.requests += 1
            queue.push(chain, written)
        self.signal_used(queue)

    # ---- backend lifecycle ----------------------------------------------------------------------

    def on_reset(self) -> None:
        self.server.reset()

    def close(self) -> None:
        """Clunk every fid and close the shared directory (the VM is going away)."""
        self.server.reset()
        self.export.close()
