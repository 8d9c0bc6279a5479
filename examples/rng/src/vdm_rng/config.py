"""The options of an rng device: ``--rng-example max_bytes=256`` or an ``[[rng-example]]`` table."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class RngConfig:
    max_bytes: int = field(
        default=65536, metadata={"help": "most random bytes given for one request (the rest stays unused)"}
    )
    queue_size: int = field(
        default=256, metadata={"choices": (16, 32, 64, 128, 256, 512, 1024), "help": "requestq entries"}
    )

    def __post_init__(self) -> None:
        if self.max_bytes < 1:
            raise ValueError(f"max_bytes must be at least 1, not {self.max_bytes}")
