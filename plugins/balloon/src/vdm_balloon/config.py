"""The options of a balloon: ``--balloon [deflate_on_oom=on][,reporting=on][,stats=on]``."""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["BalloonConfig"]


@dataclass
class BalloonConfig:
    #: offer VIRTIO_BALLOON_F_STATS_VQ: the guest reports its memory statistics
    stats: bool = True
    #: offer VIRTIO_BALLOON_F_DEFLATE_ON_OOM: the guest may take pages back when it runs out
    deflate_on_oom: bool = True
    #: offer VIRTIO_BALLOON_F_REPORTING: the guest reports free pages, which the host releases
    reporting: bool = True
    #: entries of each queue
    queue_size: int = field(default=128, metadata={"choices": (16, 32, 64, 128, 256)})
