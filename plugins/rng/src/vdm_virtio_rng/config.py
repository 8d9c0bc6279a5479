"""The options of an rng device: ``--rng [source=]FILE[,rate=BYTES_PER_SEC][,period=MS]``.

As QEMU's ``rng-random`` object (``filename=``) with virtio-rng's ``max-bytes``/``period``: the
guest gets at most ``rate * period / 1000`` bytes in each ``period`` milliseconds (``rate=0``, the
default: no limit).
"""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["MAX_PERIOD_MS", "MIN_QUOTA", "RngConfig"]

#: the longest rate-limit window (one hour)
MAX_PERIOD_MS = 3_600_000
#: the least a limited window may give: a Linux guest asks for 64 bytes at a time and its driver
#: stalls on a shorter answer (seen with 6.1 under QEMU 7.2: its /dev/hwrng reader waited until
#: killed; tests/rng/test_rng_realguest.py runs a window of 819 bytes)
MIN_QUOTA = 64


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
        if self.rate and self.quota < MIN_QUOTA:
            raise ValueError(
                f"rate={self.rate} with period={self.period} gives {self.quota} bytes per window; give at "
                f"least {MIN_QUOTA} (a Linux guest asks for {MIN_QUOTA} at a time): raise rate or period"
            )

    @property
    def quota(self) -> int:
        """Bytes the guest may get in one window (0: no limit; at least MIN_QUOTA when limited)."""
        return self.rate * self.period // 1000
