"""A 9P2000.L file server over one :class:`~vdm_9p.export.Export`: request bytes in, reply out.

:meth:`Server.handle` takes one T-message and returns its R-message (:meth:`DataPath.serve`,
the same from and into a chain's buffers, reads and writes file data without copies). It never raises for
anything a guest sends: a malformed body is ``Rlerror(EINVAL)``, an unknown fid ``EBADF``, an
unknown message ``EOPNOTSUPP``, a host error its errno; a read-only export answers every
modifying request with ``EROFS``. Requests are served one at a time, in order (a lock
also keeps :meth:`Server.reset` from another thread out of a request), so ``Tflush`` has nothing
left to cancel and is answered at once.

State: the fid table (guest number -> :class:`Fid`: an O_PATH node, maybe an open fd, the
snapshot of a directory being read). At most ``max_fids`` fids exist (each holds host fds);
one more is ``ENFILE``. Tversion and reset drop them all.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
import struct
import threading
import time
from typing import Callable, Optional

from .datapath import DataPath
from .export import MODE_MASK, Export, Node, check_name, proc_path
from .protocol import HEADER, MAXWELEM, NOFID, Msg, ProtocolError, Reader, Reply, qid_bytes, rlerror
from .tree import TreeOps

__all__ = ["Fid", "Server"]

log = logging.getLogger(__name__)

VERSION = b"9P2000.L"
#: largest message this server accepts (the client asks for its msize; the smaller wins)
MAX_MSIZE = 1 << 20
IOHDRSZ = 24  # what a client reserves for Twrite/Rread headers: iounit = msize - IOHDRSZ
V9FS_MAGIC = 0x01021997

# setattr valid bits
SA_MODE, SA_UID, SA_GID, SA_SIZE = 0x1, 0x2, 0x4, 0x8
SA_ATIME, SA_MTIME, SA_CTIME, SA_ATIME_SET, SA_MTIME_SET = 0x10, 0x20, 0x40, 0x80, 0x100
GETATTR_BASIC = 0x7FF
#: Rgetattr's body: valid[8] qid[13] mode uid gid[4 each] nlink rdev size blksize blocks[8 each]
#: atime mtime ctime btime (sec[8] nsec[8] each) gen[8] data_version[8]
_GETATTR = struct.Struct("<Q13sIIIQQQQQQQQQQQQQQQ")
_M32, _M64 = 0xFFFFFFFF, 0xFFFFFFFFFFFFFFFF
# Linux open flags as the 9P2000.L client sends them (the x86 / generic values)
_DOTL_ACCMODE, _DOTL_TRUNC, _DOTL_APPEND, _DOTL_EXCL = 0o3, 0o1000, 0o2000, 0o200
_DOTL_DIRECTORY, _DOTL_SYNC, _DOTL_DSYNC = 0o200000, 0o4000000, 0o10000


def _qid_type(mode: int) -> int:
    if stat.S_ISDIR(mode):
        return 0x80
    if stat.S_ISLNK(mode):
        return 0x02
    return 0


def _open_flags(dotl: int) -> int:
    """The host flags for a client's lopen/lcreate flags: access mode, truncate, append, sync."""
    flags = dotl & _DOTL_ACCMODE
    if flags == 3:
        raise OSError(errno.EINVAL, "bad access mode")
    for bit, host in (
        (_DOTL_TRUNC, os.O_TRUNC),
        (_DOTL_APPEND, os.O_APPEND),
        (_DOTL_SYNC, os.O_SYNC),
        (_DOTL_DSYNC, os.O_DSYNC),
        (_DOTL_DIRECTORY, os.O_DIRECTORY),
    ):
        if dotl & bit:
            flags |= host
    return flags


class Fid:
    """A guest fid: its node, and while open its I/O fd and directory snapshot."""

    __slots__ = ("dirents", "fd", "node")

    def __init__(self, node: Node) -> None:
        self.node = node
        self.fd: Optional[int] = None
        self.dirents: Optional[list[bytes]] = None

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
        self.node.close()


class Server(TreeOps, DataPath):
    """The 9P2000.L server of one export (not thread-safe: one request at a time)."""

    def __init__(self, export: Export, *, max_fids: int = 4096) -> None:
        self.export = export
        self.max_fids = max_fids
        self.msize = 8192
        self.fids: dict[int, Fid] = {}
        self._room = 0  # reply bytes the current request's buffers hold, less the header
        #: held while a request is served and while fids are dropped, so that a reset from another
        #: thread never closes an fd a request is using (its number could be reused meanwhile)
        self._lock = threading.RLock()
        self._handlers: dict[int, Callable[[Reader, Reply], None]] = {
            Msg.TSTATFS: self.statfs,
            Msg.TLOPEN: self.lopen,
            Msg.TLCREATE: self.lcreate,
            Msg.TSYMLINK: self.symlink,
            Msg.TMKNOD: self.mknod,
            Msg.TRENAME: self.rename,
            Msg.TREADLINK: self.readlink,
            Msg.TGETATTR: self.getattr,
            Msg.TSETATTR: self.setattr,
            Msg.TXATTRWALK: self.xattrwalk,
            Msg.TXATTRCREATE: self.xattrcreate,
            Msg.TREADDIR: self.readdir,
            Msg.TFSYNC: self.fsync,
            Msg.TLOCK: self.lock,
            Msg.TGETLOCK: self.getlock,
            Msg.TLINK: self.link,
            Msg.TMKDIR: self.mkdir,
            Msg.TRENAMEAT: self.renameat,
            Msg.TUNLINKAT: self.unlinkat,
            Msg.TATTACH: self.attach,
            Msg.TFLUSH: self.flush,
            Msg.TWALK: self.walk,
            Msg.TREAD: self.read,
            Msg.TWRITE: self.write,
            Msg.TCLUNK: self.clunk,
        }

    # ---- dispatch -------------------------------------------------------------------------------

    def handle(self, msg: bytes | memoryview, room: int) -> bytes:
        """Serve one whole T-message; the reply is at most ``room`` bytes (``room`` >= 11)."""
        with self._lock:
            return self._handle(msg, room)

    def _handle(self, msg: bytes | memoryview, room: int) -> bytes:
        if len(msg) < HEADER.size:
            return rlerror(0, errno.EINVAL)
        size, mtype, tag = HEADER.unpack_from(msg)
        r = Reader(msg, HEADER.size)
        if size != len(msg):
            return rlerror(tag, errno.EINVAL)
        out = Reply()
        try:
            if mtype == Msg.TVERSION:
                self.version(r, out)
            else:
                handler = self._handlers.get(mtype)
                if handler is None:
                    return rlerror(tag, errno.EOPNOTSUPP)
                self._room = room - 7
                handler(r, out)
        except ProtocolError:
            return rlerror(tag, errno.EINVAL)
        except OSError as e:
            return rlerror(tag, e.errno or errno.EIO)
        except (ValueError, OverflowError) as e:  # a field out of any valid range
            log.debug("9p: request %d refused: %s", mtype, e)
            return rlerror(tag, errno.EINVAL)
        reply = out.message(mtype + 1, tag)
        if len(reply) > room:
            return rlerror(tag, errno.ENOBUFS)
        return reply

    def reset(self) -> None:
        """Drop every fid (Tversion, device reset, close)."""
        with self._lock:
            for f in self.fids.values():
                f.close()
            self.fids.clear()

    # ---- fids -----------------------------------------------------------------------------------

    def _fid(self, r: Reader) -> Fid:
        f = self.fids.get(r.u32())
        if f is None:
            raise OSError(errno.EBADF, "unknown fid")
        return f

    def _new_fid(self, num: int, node: Node) -> None:
        """Bind ``num`` to ``node`` (the node is closed if that is refused)."""
        if num == NOFID or num in self.fids or len(self.fids) >= self.max_fids:
            node.close()
            raise OSError(
                errno.EBADF if num == NOFID else errno.EEXIST if num in self.fids else errno.ENFILE,
                "fid refused",
            )
        self.fids[num] = Fid(node)

    def _qid(self, node: Node) -> bytes:
        st = os.fstat(node.fd)
        return self._qid_of(st)

    def _qid_of(self, st: os.stat_result) -> bytes:
        path = st.st_ino if st.st_dev == self.export.root_dev else st.st_ino ^ (st.st_dev << 40)
        return qid_bytes(_qid_type(st.st_mode), int(st.st_mtime_ns // 1000), path)

    def _dir(self, f: Fid) -> Node:
        if not f.node.is_dir:
            raise OSError(errno.ENOTDIR, "not a directory")
        return f.node

    def _renamed(self, old: tuple, new: tuple) -> None:
        """Open nodes below a renamed object remember their new components."""
        n = len(old)
        for f in self.fids.values():
            if f.node.parts[:n] == old:
                f.node.parts = new + f.node.parts[n:]

    # ---- session --------------------------------------------------------------------------------

    def version(self, r: Reader, out: Reply) -> None:
        msize, ver = r.u32(), r.string()
        self.reset()
        self.msize = max(4096, min(msize, MAX_MSIZE))
        out.u32(self.msize).string(VERSION if ver.startswith(VERSION) else b"unknown")

    def attach(self, r: Reader, out: Reply) -> None:
        fid, _afid, _uname, _aname, _uid = r.u32(), r.u32(), r.string(), r.string(), r.u32()
        node = self.export.root()
        out.raw(self._qid(node))
        self._new_fid(fid, node)

    def flush(self, r: Reader, out: Reply) -> None:
        r.u16()  # requests are served in order: the old one is already answered

    def clunk(self, r: Reader, out: Reply) -> None:
        num = r.u32()
        f = self.fids.pop(num, None)
        if f is None:
            raise OSError(errno.EBADF, "unknown fid")
        f.close()

    # ---- names ----------------------------------------------------------------------------------

    def walk(self, r: Reader, out: Reply) -> None:
        num, newfid, n = r.u32(), r.u32(), r.u16()
        if n > MAXWELEM:
            raise OSError(errno.EINVAL, "too many names")
        names = [r.string() for _ in range(n)]
        f = self.fids.get(num)
        if f is None:
            raise OSError(errno.EBADF, "unknown fid")
        if newfid != num and newfid in self.fids:
            raise OSError(errno.EEXIST, "newfid in use")
        node = self.export.clone(f.node)
        qids: list[bytes] = []
        try:
            for name in names:
                nxt = self.export.walk1(node, name)
                node.close()
                node = nxt
                qids.append(self._qid(node))
        except OSError:
            node.close()
            if not qids:
                raise
            out.u16(len(qids)).raw(b"".join(qids))
            return
        out.u16(len(qids)).raw(b"".join(qids))
        old = self.fids.pop(newfid, None)
        if old is not None:  # newfid == fid: the fid moves
            old.close()
        self._new_fid(newfid, node)

    def getattr(self, r: Reader, out: Reply) -> None:
        f, _mask = self._fid(r), r.u64()
        st = os.fstat(f.node.fd)
        at, mt, ct = st.st_atime_ns, st.st_mtime_ns, st.st_ctime_ns
        out.raw(
            _GETATTR.pack(
                GETATTR_BASIC, self._qid_of(st), st.st_mode, st.st_uid & _M32, st.st_gid & _M32,
                st.st_nlink, st.st_rdev, st.st_size, st.st_blksize, st.st_blocks,
                at // 10**9 & _M64, at % 10**9, mt // 10**9 & _M64, mt % 10**9,
                ct // 10**9 & _M64, ct % 10**9,
                0, 0, 0, 0,  # btime, gen, data_version
            )
        )

    def setattr(self, r: Reader, out: Reply) -> None:
        f, valid, mode, uid, gid, size = self._fid(r), r.u32(), r.u32(), r.u32(), r.u32(), r.u64()
        asec, ansec, msec, mnsec = r.u64(), r.u64(), r.u64(), r.u64()
        self.export.check_writable()
        if stat.S_ISLNK(f.node.mode):  # the link itself, by name in its directory, never followed
            if valid & (SA_MODE | SA_SIZE):
                raise OSError(errno.EOPNOTSUPP, "a symlink has no mode or size to set")
            parent, name = self.export.parent_of(f.node)
            try:
                self._set_owner_times(
                    name, parent.fd, False, f.node, valid, uid, gid, asec, ansec, msec, mnsec
                )
            finally:
                parent.close()
            return
        path = proc_path(f.node.fd)  # the node's own inode (a file or directory)
        if valid & SA_MODE:
            os.chmod(path, mode & MODE_MASK)
        if valid & SA_SIZE:
            if not stat.S_ISREG(f.node.mode):
                raise OSError(errno.EINVAL, "not a regular file")
            os.truncate(path, size)
        self._set_owner_times(path, None, True, f.node, valid, uid, gid, asec, ansec, msec, mnsec)

    def _set_owner_times(
        self,
        path: str | bytes,
        dir_fd: Optional[int],
        follow: bool,
        node: Node,
        valid: int,
        uid: int,
        gid: int,
        asec: int,
        ansec: int,
        msec: int,
        mnsec: int,
    ) -> None:
        if valid & (SA_UID | SA_GID):
            os.chown(
                path,
                uid if valid & SA_UID else -1,
                gid if valid & SA_GID else -1,
                dir_fd=dir_fd,
                follow_symlinks=follow,
            )
        if valid & (SA_ATIME | SA_MTIME):
            st = os.fstat(node.fd)
            now = time.time_ns()
            at = (
                (asec * 10**9 + ansec if valid & SA_ATIME_SET else now)
                if valid & SA_ATIME
                else st.st_atime_ns
            )
            mt = (
                (msec * 10**9 + mnsec if valid & SA_MTIME_SET else now)
                if valid & SA_MTIME
                else st.st_mtime_ns
            )
            os.utime(path, ns=(at, mt), dir_fd=dir_fd, follow_symlinks=follow)

    def statfs(self, r: Reader, out: Reply) -> None:
        f = self._fid(r)
        s = os.fstatvfs(f.node.fd)
        out.u32(V9FS_MAGIC).u32(s.f_bsize).u64(s.f_blocks).u64(s.f_bfree).u64(s.f_bavail)
        out.u64(s.f_files).u64(s.f_ffree).u64(s.f_fsid).u32(s.f_namemax)

    # ---- open, read, write ----------------------------------------------------------------------

    def _iounit(self) -> int:
        return self.msize - IOHDRSZ

    def lopen(self, r: Reader, out: Reply) -> None:
        f, flags = self._fid(r), _open_flags(r.u32())
        if f.fd is not None:
            raise OSError(errno.EBADF, "fid already open")
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_TRUNC | os.O_APPEND):
            self.export.check_writable()
        f.fd = self.export.reopen(f.node, flags)
        f.dirents = None
        out.raw(self._qid(f.node)).u32(self._iounit())

    def lcreate(self, r: Reader, out: Reply) -> None:
        f, name, flags, mode, _gid = self._fid(r), r.string(), r.u32(), r.u32(), r.u32()
        self.export.check_writable()
        d = self._dir(f)
        check_name(name, create=True)
        hflags = (
            _open_flags(flags & ~_DOTL_DIRECTORY) | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NOCTTY
        )
        if flags & _DOTL_EXCL:
            hflags |= os.O_EXCL
        fd = os.open(name, hflags, mode & MODE_MASK, dir_fd=d.fd)
        try:
            node = self.export.child(d, name)
        except BaseException:
            os.close(fd)
            raise
        d.close()
        f.node, f.fd, f.dirents = node, fd, None  # the fid now stands for the new, open file
        out.raw(self._qid(node)).u32(self._iounit())

    def read(self, r: Reader, out: Reply) -> None:
        f, offset, count = self._fid(r), r.u64(), r.u32()
        if f.fd is None:
            raise OSError(errno.EBADF, "fid not open")
        count = max(0, min(count, self.msize - 11, self._room - 4))
        data = os.pread(f.fd, count, offset) if count else b""
        out.u32(len(data)).raw(data)

    def write(self, r: Reader, out: Reply) -> None:
        f, offset, count = self._fid(r), r.u64(), r.u32()
        data = r.data(count)
        if f.fd is None:
            raise OSError(errno.EBADF, "fid not open")
        self.export.check_writable()
        out.u32(os.pwrite(f.fd, data, offset))

    def fsync(self, r: Reader, out: Reply) -> None:
        f, datasync = self._fid(r), r.u32()
        if f.fd is None:
            raise OSError(errno.EBADF, "fid not open")
        (os.fdatasync if datasync else os.fsync)(f.fd)

    def readdir(self, r: Reader, out: Reply) -> None:
        f, offset, count = self._fid(r), r.u64(), r.u32()
        if f.fd is None or not f.node.is_dir:
            raise OSError(errno.EBADF if f.fd is None else errno.ENOTDIR, "not an open directory")
        if offset == 0 or f.dirents is None:
            f.dirents = [b".", b"..", *sorted(os.fsencode(n) for n in os.listdir(f.fd))]
        count = max(0, min(count, self.msize - 11, self._room - 4))
        entries: list[bytes] = []
        used = 0
        for i in range(offset, len(f.dirents)):
            name = f.dirents[i]
            try:
                if name == b"..":
                    st = (
                        os.fstat(self.export.root_fd)
                        if not f.node.parts
                        else os.stat(b"..", dir_fd=f.fd, follow_symlinks=False)
                    )
                else:
                    st = os.stat(name, dir_fd=f.fd, follow_symlinks=False)
            except OSError:
                continue  # removed since the snapshot
            ent = Reply().raw(self._qid_of(st)).u64(i + 1).u8(stat.S_IFMT(st.st_mode) >> 12).string(name)
            b = b"".join(ent.parts)
            if used + len(b) > count:
                break
            entries.append(b)
            used += len(b)
        out.u32(used).raw(b"".join(entries))

    # ---- the rest: extended attributes and locks --------------------------------------------------

    def xattrwalk(self, r: Reader, out: Reply) -> None:
        self._fid(r)
        raise OSError(errno.EOPNOTSUPP, "no extended attributes")

    def xattrcreate(self, r: Reader, out: Reply) -> None:
        self._fid(r)
        self.export.check_writable()
        raise OSError(errno.EOPNOTSUPP, "no extended attributes")

    def lock(self, r: Reader, out: Reply) -> None:
        self._fid(r)
        r.u8(), r.u32(), r.u64(), r.u64(), r.u32(), r.string()
        out.u8(0)  # P9_LOCK_SUCCESS: locks are advisory and local to the guest

    def getlock(self, r: Reader, out: Reply) -> None:
        self._fid(r)
        _type, start, length, proc_id, client = r.u8(), r.u64(), r.u64(), r.u32(), r.string()
        out.u8(2).u64(start).u64(length).u32(proc_id).string(client)  # F_UNLCK: nobody holds it
