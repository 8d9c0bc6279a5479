"""Dropping root after set-up: ``--user NAME`` on ``vdm run`` and ``vdm vhost-user``.

vdm opens everything it needs before the guest runs -- /dev/kvm and the VM, disk images, taps,
the vhost-user socket, console files -- so afterwards the process can become an unprivileged user:
a guest that found a bug in vdm then holds only that user's rights, and the open file descriptors.
:func:`drop_privileges` clears the supplementary groups, sets the group and then the user (real,
effective and saved: there is no way back), sets ``PR_SET_NO_NEW_PRIVS`` (no set-uid program can
give them back either), and checks that root cannot be regained.
"""

from __future__ import annotations

import ctypes
import grp
import logging
import os
import pwd

from .errors import UserError

__all__ = ["drop_privileges", "lookup_user"]

log = logging.getLogger(__name__)

_PR_SET_NO_NEW_PRIVS = 38


def lookup_user(name: str) -> tuple[int, int]:
    """The uid and primary gid of user ``name`` (a name or a number); UserError if unknown."""
    try:
        pw = pwd.getpwnam(name) if not name.isdigit() else pwd.getpwuid(int(name))
    except KeyError:
        raise UserError(f"--user {name}: no such user") from None
    return pw.pw_uid, pw.pw_gid


def drop_privileges(name: str) -> tuple[int, int]:
    """Become user ``name`` for good (see the module documentation); returns (uid, gid).

    Call it after every device, file and socket is open. Raises UserError when that is not
    possible (vdm not started as root, unknown user).
    """
    uid, gid = lookup_user(name)
    if os.geteuid() != 0:
        if os.getuid() == uid and os.geteuid() == uid:
            return uid, gid  # already that user: nothing to drop
        raise UserError(f"--user {name}: vdm must be started as root to change to another user")
    try:
        os.setgroups([])
        os.setresgid(gid, gid, gid)
        os.setresuid(uid, uid, uid)
    except OSError as e:
        raise UserError(f"--user {name}: cannot change to uid {uid} gid {gid}: {e.strerror}") from None
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        log.warning("--user %s: PR_SET_NO_NEW_PRIVS failed (errno %d)", name, ctypes.get_errno())
    if uid != 0:
        try:
            os.setuid(0)
        except PermissionError:
            pass
        else:  # pragma: no cover - would be a kernel or libc bug
            raise UserError(f"--user {name}: root could be regained after the change; stopping")
    try:
        group = grp.getgrgid(gid).gr_name
    except KeyError:
        group = str(gid)
    log.info("running as user %s (uid %d), group %s (gid %d), no supplementary groups", name, uid, group, gid)
    return uid, gid
