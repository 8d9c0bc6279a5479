"""The 9P2000.L requests that change the tree: mkdir, symlink, mknod, readlink, link, unlink, rename.

A mixin of :class:`vdm_9p.server.Server` (split out to keep modules short). Each one acts with an
``*at`` call on a directory node's fd and one checked name (:func:`vdm_9p.export.check_name`), so
it happens inside that directory; a read-only export refuses all but readlink with EROFS.
"""

from __future__ import annotations

import errno
import os
import stat
from typing import TYPE_CHECKING

from .export import MODE_MASK, Node, check_name, proc_path
from .protocol import Reader, Reply

if TYPE_CHECKING:
    from .server import Server as _Base
else:
    _Base = object

__all__ = ["AT_REMOVEDIR", "TreeOps"]

AT_REMOVEDIR = 0x200


class TreeOps(_Base):
    """Handlers of the requests that create, remove, rename and link names."""

    # ---- changes to the tree --------------------------------------------------------------------

    def mkdir(self, r: Reader, out: Reply) -> None:
        f, name, mode, _gid = self._fid(r), r.string(), r.u32(), r.u32()
        self.export.check_writable()
        check_name(name, create=True)
        d = self._dir(f)
        os.mkdir(name, mode & MODE_MASK, dir_fd=d.fd)
        node = self.export.child(d, name)
        try:
            out.raw(self._qid(node))
        finally:
            node.close()

    def symlink(self, r: Reader, out: Reply) -> None:
        f, name, target, _gid = self._fid(r), r.string(), r.string(), r.u32()
        self.export.check_writable()
        check_name(name, create=True)
        if not target or b"\0" in target:
            raise OSError(errno.EINVAL, "bad symlink target")
        d = self._dir(f)
        os.symlink(target, name, dir_fd=d.fd)  # stored as text; the server never follows it
        node = self.export.child(d, name)
        try:
            out.raw(self._qid(node))
        finally:
            node.close()

    def mknod(self, r: Reader, out: Reply) -> None:
        f, name, mode = self._fid(r), r.string(), r.u32()
        r.u32(), r.u32(), r.u32()  # major, minor, gid
        self.export.check_writable()
        check_name(name, create=True)
        d = self._dir(f)
        if not stat.S_ISREG(mode):
            raise OSError(errno.EPERM, "only regular files may be made with mknod")
        os.close(
            os.open(name, os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_CLOEXEC, mode & MODE_MASK, dir_fd=d.fd)
        )
        node = self.export.child(d, name)
        try:
            out.raw(self._qid(node))
        finally:
            node.close()

    def readlink(self, r: Reader, out: Reply) -> None:
        f = self._fid(r)
        if not stat.S_ISLNK(f.node.mode):
            raise OSError(errno.EINVAL, "not a symlink")
        out.string(os.readlink(b"", dir_fd=f.node.fd))

    def link(self, r: Reader, out: Reply) -> None:
        df, f, name = self._fid(r), self._fid(r), r.string()
        self.export.check_writable()
        check_name(name, create=True)
        d = self._dir(df)
        if f.node.is_dir:
            raise OSError(errno.EPERM, "hard link to a directory")
        if stat.S_ISLNK(f.node.mode):  # the link itself, by its name in its own directory
            parent, oname = self.export.parent_of(f.node)
            try:
                os.link(oname, name, src_dir_fd=parent.fd, dst_dir_fd=d.fd, follow_symlinks=False)
            finally:
                parent.close()
            return
        # the node's own inode: its /proc magic link resolves to nothing else
        os.link(proc_path(f.node.fd), name, dst_dir_fd=d.fd, follow_symlinks=True)

    def unlinkat(self, r: Reader, out: Reply) -> None:
        f, name, flags = self._fid(r), r.string(), r.u32()
        self.export.check_writable()
        check_name(name, create=True)
        d = self._dir(f)
        (os.rmdir if flags & AT_REMOVEDIR else os.unlink)(name, dir_fd=d.fd)

    def _rename(self, odir: Node, oname: bytes, ndir: Node, nname: bytes) -> None:
        check_name(oname, create=True)
        check_name(nname, create=True)
        os.rename(oname, nname, src_dir_fd=odir.fd, dst_dir_fd=ndir.fd)
        self._renamed((*odir.parts, oname), (*ndir.parts, nname))

    def renameat(self, r: Reader, out: Reply) -> None:
        of, oname, nf, nname = self._fid(r), r.string(), self._fid(r), r.string()
        self.export.check_writable()
        self._rename(self._dir(of), oname, self._dir(nf), nname)

    def rename(self, r: Reader, out: Reply) -> None:
        f, df, name = self._fid(r), self._fid(r), r.string()
        self.export.check_writable()
        parent, oname = self.export.parent_of(f.node)
        try:
            self._rename(parent, oname, self._dir(df), name)
        finally:
            parent.close()
