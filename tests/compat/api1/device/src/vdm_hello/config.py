"""The options of a hello device: ``--hello queue_size=128`` or a ``[[hello]]`` table."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class HelloConfig:
    queue_size: int = field(
        default=256, metadata={"choices": (16, 32, 64, 128, 256), "help": "entries in the request queue"}
    )
