"""A qcow2 image passed between two processes at device start/stop: a part of :class:`.qcow2.Qcow2Disk`.

With ``--disk PATH,lock=start`` (live migration between two vhost-user backends on one image), the
destination opens the image while the source still writes it, so what it read at open -- header,
L1 table, L2 tables, refcounts -- may be stale by the time its device starts. QEMU's answer is
inactivate / invalidate-cache, and this is the same discipline (the locks' side is in
:mod:`.locking`):

* opened inside :func:`.locking.locks_deferred`, the image is *inactive*: it is parsed (size,
  features), neither checked nor written (the autoclear bits stay), and no request is served;
* :meth:`Handover.invalidate` (the device starts, after the write lock is taken): every piece of
  metadata is read again and checked as a read-write open checks it, the autoclear bits are
  cleared, and the image serves requests;
* :meth:`Handover.inactivate` (the device stops, before the write lock is dropped): a flush
  writes back and syncs every cached L2 table, L1 entry and refcount block and gives back the
  clusters waiting to be freed, so the file alone is the whole image; the image is inactive
  again and its caches are not used any more (a later start reads everything again).

So the process holding the write lock is the only one whose metadata may be newer than the file;
after a stop the file is what ``qemu-img check`` finds clean (no leaks either).
"""

from __future__ import annotations

import struct

from .base import DiskError

__all__ = ["Handover"]

AUTOCLEAR_BITMAPS = 1 << 0


class Handover:
    """invalidate / inactivate (mixed into Qcow2Disk; see the module documentation)."""

    def invalidate(self) -> None:
        """Read all metadata again and serve (DiskError: the image is unusable now, as at open).

        An image still active (its last :meth:`inactivate` failed, so the locks were kept all
        along) keeps what it caches: that is newer than the file."""
        if not self._inactive:
            return
        with self._flush_lock:
            self._io.acquire_exclusive()
            try:
                with self._meta:
                    self._inactive = True
                    self._load(check=not self.read_only)
                    self._check_bitmaps()
                    self._clear_autoclear()
                    self._inactive = False
            finally:
                self._io.release_exclusive()

    def inactivate(self) -> None:
        """Write back and sync every cached piece of metadata; serve nothing until :meth:`invalidate`.

        The caller (the device's reset) has waited for the requests in flight. An OSError or
        DiskError leaves the image active: its metadata is not all in the file.
        """
        if self._inactive or self._closed:
            return
        if not self.read_only:
            self.flush()
            with self._meta:
                if self.refs.write_dirty():
                    self.f.sync()
        with self._meta:
            self._inactive = True
        if self._step is not None:  # (the other side may change the metadata now)
            self._step.block()

    # ---- header bits a writer handles before it writes (at open, or at invalidate) ---------------

    def _check_bitmaps(self) -> None:
        if not self.read_only and self.h.autoclear_features & AUTOCLEAR_BITMAPS:
            raise DiskError(
                f"{self.path}: the image has persistent dirty bitmaps, which vdm does not update; writing "
                "would invalidate them (QEMU then drops them). Open it read-only, or remove them with "
                "qemu-img bitmap --remove"
            )

    def _clear_autoclear(self) -> None:
        h = self.h
        if not self.read_only and h.autoclear_features:
            # the spec: a writer that does not maintain an autoclear feature clears its bit first
            self.f.pwrite(struct.pack(">Q", 0), 88)
            self.f.sync()
            h.autoclear_features = 0
