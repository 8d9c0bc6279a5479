"""The ``--network`` options (like kvmtool's): ``mode=tap,tapif=NAME,script=PATH,guest_mac=…,queues=N``.

vdm-core parses the option string or TOML table into :class:`NetConfig`; the field types and
metadata below are what it checks values against.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Optional

__all__ = ["MAX_QUEUE_PAIRS", "NetConfig", "default_mac", "format_mac", "parse_mac"]

#: more pairs than vCPUs buys nothing; the virtio limit is 0x8000, the tun limit 256
MAX_QUEUE_PAIRS = 16


def parse_mac(text: str) -> bytes:
    """``"02:15:15:15:15:15"`` (or with dashes) -> 6 bytes; ValueError if malformed or multicast."""
    parts = text.replace("-", ":").split(":")
    if len(parts) != 6 or not all(1 <= len(p) <= 2 for p in parts):
        raise ValueError(f"'{text}' is not a MAC address (want six hex bytes: 02:15:15:15:15:15)")
    try:
        mac = bytes(int(p, 16) for p in parts)
    except ValueError:
        raise ValueError(f"'{text}' is not a MAC address (want six hex bytes: 02:15:15:15:15:15)") from None
    if mac[0] & 1:
        raise ValueError(f"'{text}' is a multicast address; a NIC needs a unicast one")
    return mac


def format_mac(mac: bytes) -> str:
    return ":".join(f"{b:02x}" for b in mac)


def default_mac(seed: str) -> bytes:
    """A locally administered unicast MAC derived from ``seed`` (stable across runs)."""
    digest = hashlib.sha256(seed.encode()).digest()
    return bytes([0x02]) + digest[:5]


@dataclass
class NetConfig:
    """One virtio-net device."""

    mode: str = field(
        default="tap",
        metadata={
            "choices": ("tap", "none"),
            "help": "tap: a host tap interface; none: no backend (link down)",
        },
    )
    tapif: Optional[str] = field(
        default=None,
        metadata={"help": "tap interface to use or create (default: a new one named by the kernel)"},
    )
    fd: Optional[int] = field(
        default=None, metadata={"help": "an already open tap file descriptor (vdm takes it over)"}
    )
    script: Optional[str] = field(
        default=None,
        metadata={"help": "program run with the tap name as argument once the tap is open ('none': none)"},
    )
    downscript: Optional[str] = field(
        default=None, metadata={"help": "program run with the tap name as argument when the tap is closed"}
    )
    guest_mac: Optional[str] = field(
        default=None, metadata={"help": "the guest's MAC address (default: derived from the tap name)"}
    )
    host_mac: Optional[str] = field(default=None, metadata={"help": "set the tap's own MAC address"})
    host_ip: Optional[str] = field(
        default=None, metadata={"help": "give the tap this IPv4 address/prefix and bring it up (10.0.2.2/24)"}
    )
    queues: int = field(default=1, metadata={"help": f"queue pairs (multi-queue tap), 1..{MAX_QUEUE_PAIRS}"})
    queue_size: int = field(default=256, metadata={"help": "entries per virtqueue (a power of two)"})
    mtu: Optional[int] = field(default=None, metadata={"help": "MTU offered to the guest (68..65535)"})
    offload: bool = field(
        default=True, metadata={"help": "offer checksum/segmentation offloads the tap accepts"}
    )
    mrg_rxbuf: bool = field(default=True, metadata={"help": "offer mergeable receive buffers"})

    def __post_init__(self) -> None:
        if self.mode not in ("tap", "none"):
            raise ValueError(f"mode must be tap or none, not {self.mode!r}")
        if not 1 <= self.queues <= MAX_QUEUE_PAIRS:
            raise ValueError(f"queues must be between 1 and {MAX_QUEUE_PAIRS}, not {self.queues}")
        if self.queue_size < 2 or self.queue_size > 32768 or self.queue_size & (self.queue_size - 1):
            raise ValueError(f"queue_size must be a power of two between 2 and 32768, not {self.queue_size}")
        if self.mtu is not None and not 68 <= self.mtu <= 65535:
            raise ValueError(f"mtu must be between 68 and 65535, not {self.mtu}")
        if self.fd is not None:
            if self.fd < 0:
                raise ValueError(f"fd must be a file descriptor number, not {self.fd}")
            if self.queues != 1:
                raise ValueError("fd= gives one queue; use queues=1 with it")
            if self.tapif is not None:
                raise ValueError("give either fd= or tapif=, not both")
        if self.tapif is not None and not 0 < len(self.tapif.encode()) < 16:
            raise ValueError(f"tapif must be 1 to 15 bytes, not {self.tapif!r}")
        if self.host_ip is not None:
            from .backends.tap import parse_cidr

            parse_cidr(self.host_ip)
        for name in ("guest_mac", "host_mac"):
            value = getattr(self, name)
            if value is not None:
                parse_mac(value)

    @property
    def script_path(self) -> Optional[str]:
        """The up-script to run, or None."""
        return None if self.script in (None, "", "none") else self.script

    @property
    def downscript_path(self) -> Optional[str]:
        return None if self.downscript in (None, "", "none") else self.downscript

    def guest_mac_bytes(self, seed: str) -> bytes:
        """The guest MAC: the configured one, else one derived from ``seed``."""
        return parse_mac(self.guest_mac) if self.guest_mac else default_mac(seed)
