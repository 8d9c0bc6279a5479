"""Console backends -- the host side of a guest console: stdio, pty, unix socket, file, null, memory.

Each is a small :class:`~vdm_console.backends.base.ConsoleBackend`: it says how to read its source and
where output goes; buffering and flow control are the base class's.

Guest output never stalls the guest: the pty and socket backends buffer output (64 KiB) for a
writer thread; with nobody attached, or a reader that stopped reading and let the buffer fill,
output is dropped (counted in ``dropped_output``) instead of blocking the vCPU. The terminal and
a log file are written synchronously and fully.

Modules, one per endpoint: :mod:`.base` (the interface: bounded pull-model input, buffered
output), :mod:`.stdio` (with :mod:`.terminal`: raw mode restored on every exit path, the Ctrl-A
escape), :mod:`.pty`, :mod:`.socket`, :mod:`.file`, :mod:`.memory` (memory and null).
:func:`open_backend` turns a ``--console`` spec into one of them.
"""

from __future__ import annotations

from vdm.errors import UserError

from .base import DEFAULT_INPUT_BUFFER, ConsoleBackend
from .file import FileBackend
from .memory import MemoryBackend, NullBackend
from .pty import PtyBackend
from .socket import SocketBackend
from .stdio import StdioBackend

__all__ = [
    "DEFAULT_INPUT_BUFFER",
    "ConsoleBackend",
    "FileBackend",
    "MemoryBackend",
    "NullBackend",
    "PtyBackend",
    "SocketBackend",
    "StdioBackend",
    "open_backend",
]


def open_backend(spec: str, **kw: object) -> ConsoleBackend:
    """Open the backend ``spec`` names: ``stdio``, ``pty``, ``socket:PATH``, ``file:PATH``, ``null``.

    Raises :class:`vdm.errors.UserError` for an unknown kind or a path that cannot be used.
    """
    kind, _, arg = spec.partition(":")
    kind = kind.strip().lower()
    if kind in ("stdio", "pty", "null") and arg:
        raise UserError(f"console backend '{spec}': '{kind}' takes no path")
    if kind == "stdio":
        return StdioBackend(**kw)  # type: ignore[arg-type]
    if kind == "pty":
        return PtyBackend(**kw)  # type: ignore[arg-type]
    if kind == "null":
        return NullBackend(**kw)  # type: ignore[arg-type]
    if kind in ("socket", "unix", "file"):
        if not arg:
            raise UserError(f"console backend '{spec}': give a path, as in {kind}:/path")
        if kind == "file":
            return FileBackend(arg, **kw)  # type: ignore[arg-type]
        return SocketBackend(arg, **kw)  # type: ignore[arg-type]
    raise UserError(f"unknown console backend '{spec}' (use stdio, pty, socket:PATH, file:PATH or null)")
