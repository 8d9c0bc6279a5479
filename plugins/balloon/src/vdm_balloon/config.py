"""The options of a balloon: ``--balloon [target_mib=N][,deflate_on_oom=on][,reporting=on][,stats=on]``."""

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
    #: the balloon's size the guest is asked for from the start, in MiB (later: set_target_bytes)
    target_mib: int = 0
    #: entries of each queue
    queue_size: int = field(default=128, metadata={"choices": (16, 32, 64, 128, 256)})

    def __post_init__(self) -> None:
        if not 0 <= self.target_mib < 1 << 24:
            raise ValueError(f"target_mib must be 0 to {(1 << 24) - 1}, not {self.target_mib}")
