"""The options of an rng device: ``--rng [source=]FILE[,rate=BYTES_PER_SEC][,period=MS]``.

As QEMU's ``rng-random`` object (``filename=``) with virtio-rng's ``max-bytes``/``period``: the
guest gets at most ``rate * period / 1000`` bytes in each ``period`` milliseconds (``rate=0``, the
default: no limit).
"""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["MAX_PERIOD_MS", "RngConfig"]

#: the longest rate-limit window (one hour)
MAX_PERIOD_MS = 3_600_000


@dataclass
class RngConfig:
    #: where the random bytes come from: a character device or a regular file (read to its end)
    source: str = "/dev/urandom"
    #: most bytes per second the guest gets (0: no limit)
    rate: int = 0
    #: the rate limit's window in milliseconds: at most rate*period/1000 bytes in each window
    period: int = 1000
    #: requestq entries (a power of two)
    queue_size: int = field(default=256, metadata={"choices": (16, 32, 64, 128, 256, 512, 1024)})

    def __post_init__(self) -> None:
        if not self.source:
            raise ValueError("give the entropy source: --rng /dev/urandom (or source=FILE)")
        if self.rate < 0:
            raise ValueError(f"rate must be 0 (no limit) or a number of bytes per second, not {self.rate}")
        if not 1 <= self.period <= MAX_PERIOD_MS:
            raise ValueError(f"period must be 1 to {MAX_PERIOD_MS} milliseconds, not {self.period}")

    @property
    def quota(self) -> int:
        """Bytes the guest may get in one window (0: no limit); at least 1 when limited."""
        if not self.rate:
            return 0
        return max(1, self.rate * self.period // 1000)
