"""The path of a Unix socket vdm listens on: checked before anything opens, a stale one cleared.

One rule for every listening socket (vhost-user's ``--socket-path``, ``--control``): the path is
not empty, its folder exists, it fits ``sun_path`` (107 bytes and the final NUL). Something
already at the path is removed only when it is a socket nobody listens on (left by a process
that was killed); a file that is no socket, or a socket another process serves, is refused with
one :class:`~vdm.errors.UserError` line naming the option.
"""

from __future__ import annotations

import os
import socket
import stat

from .errors import UserError

__all__ = ["check_socket_path", "clear_stale_socket"]


def check_socket_path(path: str, option: str, what: str) -> None:
    """Refuse a path that cannot work: empty (``what`` says what to give), no folder, too long."""
    if not path:
        raise UserError(f"{option} is empty: give the path of {what}")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise UserError(f"{option} {path}: no such folder {folder}")
    if len(os.fsencode(path)) > 107:  # sun_path holds 108 bytes with the final NUL
        raise UserError(f"{option} {path}: longer than 107 bytes (use a shorter or relative path)")


def clear_stale_socket(path: str, option: str) -> None:
    """Remove a socket nobody listens on at ``path``; refuse a file or a served socket in the way."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise UserError(f"{option} {path} exists and is not a socket; choose another path")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.settimeout(2)
        probe.connect(path)
    except (ConnectionRefusedError, FileNotFoundError):
        os.unlink(path)  # nobody listens: left over by a process that was killed
        return
    except OSError as e:
        raise UserError(f"{option} {path}: cannot check the existing socket: {e}") from None
    finally:
        probe.close()
    raise UserError(f"{option} {path}: another process is listening on this socket")
