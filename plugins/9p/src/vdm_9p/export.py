"""The exported directory: fd-relative name resolution that cannot leave it.

**The export is a security boundary.** Every object the guest can name is reached from the
export's root directory fd, one validated path component at a time, and held as an ``O_PATH``
fd (a :class:`Node`). The rules that keep the guest inside:

* A name from the guest is one component: not empty, not ``.``/``..`` where an object is created,
  no ``/`` and no NUL, at most 255 bytes (:func:`check_name`); otherwise ``EINVAL``. Nothing
  here ever joins guest strings into a path or compares path strings.
* A component is opened with ``openat2(dirfd, name, O_PATH|O_NOFOLLOW,
  RESOLVE_BENEATH|RESOLVE_NO_MAGICLINKS|RESOLVE_NO_SYMLINKS)`` (Linux >= 5.6); where the kernel
  lacks ``openat2`` the same single-component ``openat`` with ``O_NOFOLLOW`` is used, which
  cannot leave ``dirfd`` either. A symlink is therefore opened as itself, never followed: the
  guest's client reads it (``Treadlink``) and resolves it in the guest's own name space.
* ``..`` is never handed to the kernel: a node remembers its components below the root, and its
  parent is re-resolved from the root fd with ``RESOLVE_BENEATH`` (at the root, ``..`` is the
  root). Renames done through the server fix the remembered components of open nodes.
* Creating, removing, renaming and linking use ``*at`` calls on a directory node's fd with a
  checked single name, so they act inside that directory; ``linkat`` takes its source from a
  node's fd (``/proc/self/fd/N``, the node itself, not a path the guest chose).
* Only regular files and directories are ever opened for I/O: a host device, FIFO or socket
  inside the export is refused (``EPERM``), and ``mknod`` of anything but a regular file is
  refused too. Modes never get set-user-ID or set-group-ID bits from the guest.
"""

from __future__ import annotations

import ctypes
import errno
import os
import stat
from typing import Optional, Sequence

__all__ = ["Export", "Node", "check_name"]

_SYS_OPENAT2 = 437  # the same number on every Linux architecture vdm runs on (x86-64, arm64)
RESOLVE_NO_MAGICLINKS = 0x02
RESOLVE_NO_SYMLINKS = 0x04
RESOLVE_BENEATH = 0x08
_RESOLVE = RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS | RESOLVE_NO_SYMLINKS
NAME_MAX = 255
#: mode bits the guest may set (no set-user-ID / set-group-ID on the host)
MODE_MASK = 0o1777


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64)]


_libc = ctypes.CDLL(None, use_errno=True)
_syscall = _libc.syscall
_syscall.restype = ctypes.c_long
_have_openat2: Optional[bool] = None


def openat2(dirfd: int, path: bytes, flags: int, resolve: int) -> int:
    """``openat2(2)``; raises OSError. Falls back to ``openat`` with O_NOFOLLOW (single
    components only) where the kernel has no openat2 (ENOSYS) or a sandbox forbids it."""
    global _have_openat2
    if _have_openat2 is not False:
        how = _OpenHow(flags | os.O_CLOEXEC, 0, resolve)
        fd = _syscall(
            ctypes.c_long(_SYS_OPENAT2),
            ctypes.c_long(dirfd),
            ctypes.c_char_p(path),
            ctypes.byref(how),
            ctypes.c_size_t(ctypes.sizeof(how)),
        )
        if fd >= 0:
            _have_openat2 = True
            return fd
        err = ctypes.get_errno()
        if err not in (errno.ENOSYS, errno.EPERM) or _have_openat2:
            raise OSError(err, os.strerror(err))
        _have_openat2 = False
    # fallback: component by component, never following a symlink, never ".."
    fd = dirfd
    parts = [p for p in path.split(b"/") if p not in (b"", b".")]
    if any(p == b".." for p in parts):
        raise OSError(errno.EXDEV, "'..' is not resolved here")
    if not parts:
        return os.open(b".", flags | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dirfd)
    try:
        for i, p in enumerate(parts):
            last = i == len(parts) - 1
            nfl = (flags if last else os.O_PATH | os.O_DIRECTORY) | os.O_NOFOLLOW | os.O_CLOEXEC
            nfd = os.open(p, nfl, dir_fd=fd)
            if fd != dirfd:
                os.close(fd)
            fd = nfd
        return fd
    except BaseException:
        if fd != dirfd:
            os.close(fd)
        raise


def check_name(name: bytes, *, create: bool = False) -> None:
    """Refuse anything but one path component (EINVAL)."""
    if not name or len(name) > NAME_MAX or b"/" in name or b"\0" in name:
        raise OSError(errno.EINVAL, "not a single file name")
    if create and name in (b".", b".."):
        raise OSError(errno.EINVAL, "'.' and '..' cannot be created, removed or renamed")


def proc_path(fd: int) -> str:
    """The magic link of one of our own fds: reopening it reaches that very inode, nothing else."""
    return f"/proc/self/fd/{fd}"


class Node:
    """One object of the export, held by an O_PATH fd; ``parts`` are its components below the root."""

    __slots__ = ("fd", "mode", "parts")

    def __init__(self, fd: int, parts: Sequence[bytes], mode: int) -> None:
        self.fd = fd
        self.parts = tuple(parts)
        self.mode = mode

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.mode)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class Export:
    """The shared directory: a root fd and how nodes below it are found."""

    def __init__(self, path: str, *, readonly: bool = False) -> None:
        self.path = path
        self.readonly = readonly
        self.root_fd = os.open(path, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        st = os.fstat(self.root_fd)
        self.root_dev = st.st_dev

    def close(self) -> None:
        if self.root_fd >= 0:
            os.close(self.root_fd)
            self.root_fd = -1

    def root(self) -> Node:
        fd = os.dup(self.root_fd)
        return Node(fd, (), os.fstat(fd).st_mode)

    def clone(self, node: Node) -> Node:
        fd = os.dup(node.fd)
        return Node(fd, node.parts, node.mode)

    def _open_parts(self, parts: Sequence[bytes]) -> Node:
        """The directory at ``parts`` below the root (a parent: never a symlink, never outside)."""
        flags = os.O_PATH | os.O_NOFOLLOW | os.O_DIRECTORY
        fd = openat2(self.root_fd, b"/".join(parts) or b".", flags, _RESOLVE)
        try:
            return Node(fd, parts, os.fstat(fd).st_mode)
        except BaseException:
            os.close(fd)
            raise

    def walk1(self, node: Node, name: bytes) -> Node:
        """The node ``name`` names in directory ``node`` (``..`` of the root is the root)."""
        check_name(name)
        if not node.is_dir:
            raise OSError(errno.ENOTDIR, "not a directory")
        if name == b".":
            return self.clone(node)
        if name == b"..":
            return self._open_parts(node.parts[:-1])
        fd = openat2(node.fd, name, os.O_PATH | os.O_NOFOLLOW, _RESOLVE)
        try:
            return Node(fd, (*node.parts, name), os.fstat(fd).st_mode)
        except BaseException:
            os.close(fd)
            raise

    def child(self, parent: Node, name: bytes) -> Node:
        check_name(name, create=True)
        return self.walk1(parent, name)

    def parent_of(self, node: Node) -> tuple[Node, bytes]:
        """A directory node holding ``node`` and its name there (EBUSY for the root)."""
        if not node.parts:
            raise OSError(errno.EBUSY, "the export's root has no name")
        return self._open_parts(node.parts[:-1]), node.parts[-1]

    def reopen(self, node: Node, flags: int) -> int:
        """A real fd on ``node`` (a regular file or directory only) for I/O."""
        if not (stat.S_ISREG(node.mode) or stat.S_ISDIR(node.mode)):
            raise OSError(errno.EPERM if not stat.S_ISLNK(node.mode) else errno.ELOOP, "not a file")
        if stat.S_ISDIR(node.mode):
            flags = (flags & ~(os.O_WRONLY | os.O_RDWR | os.O_TRUNC | os.O_APPEND)) | os.O_DIRECTORY
        return os.open(proc_path(node.fd), flags | os.O_CLOEXEC | os.O_NOCTTY)

    def check_writable(self) -> None:
        if self.readonly:
            raise OSError(errno.EROFS, "read-only export")
