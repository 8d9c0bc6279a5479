"""The console's options: ``--console serial|virtio[,backend=...][,port=com1]`` or a ``[console]`` table."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

__all__ = ["ConsoleConfig", "parse_extra_ports"]

_BACKEND_KINDS = ("stdio", "pty", "null", "socket", "unix", "file")


def _check_backend(spec: str, what: str) -> None:
    kind, _, arg = spec.partition(":")
    if kind not in _BACKEND_KINDS:
        raise ValueError(f"{what}: unknown backend '{spec}' (stdio, pty, socket:PATH, file:PATH, null)")
    if kind in ("socket", "unix", "file") and not arg:
        raise ValueError(f"{what}: backend '{kind}' needs a path ({kind}:/path)")


def parse_extra_ports(text: Optional[str]) -> list[tuple[str, str]]:
    """``"org.qemu.guest_agent.0=socket:/run/qga.sock;log=file:/tmp/x"`` -> [(name, backend)]."""
    out: list[tuple[str, str]] = []
    if not text:
        return out
    for item in text.split(";"):
        item = item.strip()
        if not item:
            continue
        name, sep, spec = item.partition("=")
        if not sep or not name:
            raise ValueError(f"extra port '{item}' must be NAME=BACKEND")
        if len(name.encode()) > 255 or any(c in name for c in "\0\n"):
            raise ValueError(f"extra port name '{name[:40]}' is too long or has control characters")
        if name in (n for n, _ in out):
            raise ValueError(f"extra port '{name}' given twice")
        _check_backend(spec, f"port {name}")
        out.append((name, spec))
    return out


@dataclass
class ConsoleConfig:
    #: serial: a 16550A UART (ttyS0, console=ttyS0); virtio: virtio-console (hvc0, console=hvc0)
    kind: str = field(default="serial", metadata={"choices": ("serial", "virtio")})
    #: where the console goes: stdio, pty, socket:PATH, file:PATH or null
    backend: str = "stdio"
    #: the legacy PC port of the UART (serial only)
    port: str = field(default="com1", metadata={"choices": ("com1", "com2", "com3", "com4")})
    #: override the UART's interrupt line (default: 4 for com1/com3, 3 for com2/com4)
    irq: Optional[int] = None
    #: virtio only: named extra ports (virtserialport), "NAME=BACKEND;NAME=BACKEND"
    ports: Optional[str] = None
    #: virtio only: offer VIRTIO_CONSOLE_F_MULTIPORT (needed for extra ports)
    multiport: bool = True
    #: virtio only: RESIZE messages in the (rows, cols) order older Linux kernels read (before
    #: commit 5326ab737a47) instead of the spec's (cols, rows)
    legacy_resize: bool = False
    #: bytes of input held for a guest that is not reading (then vdm stops reading the source)
    input_buffer: int = 4096

    def __post_init__(self) -> None:
        _check_backend(self.backend, "console")
        if self.irq is not None and not 0 <= self.irq < 256:
            raise ValueError("irq must be between 0 and 255")
        extra = parse_extra_ports(self.ports)
        if extra and self.kind != "virtio":
            raise ValueError("extra ports need kind=virtio")
        if extra and not self.multiport:
            raise ValueError("extra ports need multiport")
        if not 1 <= self.input_buffer <= 1 << 24:
            raise ValueError("input_buffer must be between 1 byte and 16 MiB")
