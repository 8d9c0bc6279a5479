"""The compiled serve step of a qcow2 image: a part of :class:`.qcow2.Qcow2Disk`.

With vdm_blk.fastserve's :class:`~vdm_blk.fastserve.Qcow2Step` (a local buffered file), every run of
data clusters the image finds mapped (allocated, unshared, contiguous on the host, and not on
metadata) while it serves a request is remembered in the step's map, and later reads and small
write-back writes inside remembered clusters are served in C on the queue's thread.

Invariant: a remembered cluster's entry does not change while the step may use it. Whatever may
change one -- the exclusive side of the I/O lock (discard, write zeroes, giving clusters back,
reloading the metadata), a hand-over (:mod:`.qcow2_handover`), close -- first blocks the step
(it stops using the map, waits for the steps in flight and clears it); the map is refilled from
the shared side's lookups only (:meth:`StepMap._remember`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .base import SECTOR, DiskError
from .hostfile import HostFile

if TYPE_CHECKING:
    from ..fastserve import Qcow2Step

__all__ = ["StepMap"]


class StepMap:
    """serve_step and the map's upkeep (mixed into Qcow2Disk; see the module documentation)."""

    def serve_step(self) -> Qcow2Step | None:
        """The compiled serve step for this image (vdm_blk.fastserve, :class:`Qcow2Step`), or None:
        not built or not active, not a local buffered file (O_DIRECT, NBD...), closed, or a disk
        with more clusters than its map can tag. One per image."""
        if self._step is None and not self._closed:
            from .. import fastserve

            f = self.f
            if fastserve.ACTIVE and isinstance(f, HostFile) and f.dfd is None:
                try:
                    step = fastserve.Qcow2Step(
                        f.fd,
                        self.size // SECTOR,
                        cbits=self.cbits,
                        clusters=max(1, -(-self.size // self.cs)),
                        **f.step_options(self.read_only),
                    )
                except ValueError:
                    return None
                with self._meta:
                    if self._inactive or self._io.writer or self._io.waiting:
                        step.block()  # (unblocked by the exclusive holder's release / invalidate)
                    self._step = step
        return self._step

    def _gate_step(self, exclusive: bool) -> None:
        """IOLock.on_exclusive: the exclusive side was taken (the compiled step stops using its map
        and forgets it) or is given back (the step maps afresh, unless the image is closed or
        handed over)."""
        step = self._step
        if step is None:
            return
        if exclusive:
            step.block()
        elif not (self._closed or self._inactive) and step.cbits == self.cbits:
            step.unblock()

    def _remember(self, offset: int, length: int, host: int) -> None:
        """Tell the compiled step that [offset, offset + length) is at ``host`` (a run found by
        :meth:`_mapped`, metadata lock held, the shared side entered); not if it touches metadata."""
        cbits = self.cbits
        gc = offset >> cbits
        n = ((offset + length - 1) >> cbits) - gc + 1
        start = host - (offset & (self.cs - 1))
        try:
            self._check_data_host(start, n << cbits)
        except DiskError:
            return  # (the path that writes there reports it)
        self._step.remember(gc, n, start)
