"""The options of a 9p share: ``--9p DIR,TAG[,ro]`` (as kvmtool's) or a ``[[9p]]`` table."""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["NinepConfig"]


@dataclass
class NinepConfig:
    #: the host directory the guest sees
    path: str
    #: the mount tag the guest names (mount -t 9p TAG /mnt); default: the directory's last name
    tag: str = field(default="", metadata={"position": 1})
    #: refuse every change (EROFS)
    ro: bool = False
    #: requestq entries (a power of two)
    queue_size: int = field(default=128, metadata={"choices": (16, 32, 64, 128, 256, 512, 1024)})
    #: most fids (guest handles, each holds a host fd) at one time
    max_fids: int = 8192

    def __post_init__(self) -> None:
        if not self.path:
            raise ValueError("give the directory to share: --9p DIR,tag=TAG")
        if not self.tag:
            import os

            self.tag = os.path.basename(os.path.normpath(self.path)) or "root"
        if not 0 < len(self.tag.encode()) <= 255 or "," in self.tag:
            raise ValueError(f"the mount tag must be 1 to 255 bytes, not {self.tag!r}")
        if not 16 <= self.max_fids <= 1 << 20:
            raise ValueError("max_fids must be between 16 and 1048576")
