/* vdm-blk's optional compiled serve step: one virtio-blk request of the common kind, on a raw
 * image, from or into the page cache. Called by vdm.fastpath's vdm_serve_batch (core) for each
 * chain it took, through a function pointer; built by vdm_blk/fastserve/build.py (cffi API mode).
 *
 * The reference is vdm_blk.device.BlkDevice._start_fast with RawDisk.readv_nowait /
 * writev_inline and HostFile.read_nowait / write_inline: the same request shapes, the same checks
 * (a 16-byte header buffer, data buffers, a 1-byte status buffer; length a non-zero multiple of
 * 512, the range inside the disk), the same system calls. Anything else -- another type, another
 * shape, a read that would block or comes back short, any error -- returns 0 with no status
 * written: the chain is then left to the Python path, which serves it or answers its error.
 *
 * The entries are (host address, length) pairs the core checked to lie inside one region of
 * guest RAM; the header is copied out of guest memory once before it is used.
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <errno.h>
#include <stdint.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <sys/vfs.h>

#ifndef RWF_NOWAIT
#define RWF_NOWAIT 0x00000008
#endif

#define VDM_BLK_SECTOR 512u
#define VDM_BLK_T_IN 0u
#define VDM_BLK_T_OUT 1u
#define VDM_BLK_IOV 1024u /* HostFile's IOV_MAX */

struct vdm_blk {
    int fd;             /* the raw image's file (buffered, not O_DIRECT); -1: closed, serve nothing */
    int reads;          /* serve T_IN */
    int read_flags;     /* preadv2's flags: RWF_NOWAIT, or 0 on tmpfs/ramfs that refused it */
    int writes;         /* serve T_OUT (write-back, writable disk, not write-through) */
    int write_flags;    /* pwritev2's flags: RWF_NOWAIT, or 0 once the file system refused it */
    uint64_t capacity;  /* the disk's size in sectors */
    uint64_t write_max; /* HostFile's INLINE_WRITE_MAX: larger writes go to a worker */
};

/* HostFile._on_memory_fs: a regular file on tmpfs or ramfs (reading it never waits for a device) */
static int on_memory_fs(int fd)
{
    struct statfs fs;
    struct stat st;

    if (fstat(fd, &st) != 0 || S_ISBLK(st.st_mode) || fstatfs(fd, &fs) != 0)
        return 0;
    return ((uint32_t)fs.f_type == 0x01021994u || (uint32_t)fs.f_type == 0x858458F6u);
}

/* 1: a read served, 2: a write served, 0: not served (see above). */
int vdm_blk_serve(void *ctx, const uint64_t *ent, uint32_t n, uint32_t nr, uint32_t *written)
{
    struct vdm_blk *d = ctx;
    struct iovec iov[VDM_BLK_IOV];
    struct { uint32_t type; uint32_t reserved; uint64_t sector; } h;
    uint32_t first, count, k;
    uint64_t bytes = 0, sector;
    ssize_t got;

    if (d->fd < 0 || nr == 0 || n <= nr || ent[1] != 16 || ent[2 * n - 1] != 1)
        return 0;
    memcpy(&h, (const void *)(uintptr_t)ent[0], 16);
    __asm__ __volatile__("" ::: "memory"); /* the guest may rewrite it: this one copy is used */
    if (h.type == VDM_BLK_T_IN && nr == 1 && d->reads) {
        first = 1;
        count = n - 2;
    } else if (h.type == VDM_BLK_T_OUT && n - nr == 1 && d->writes) {
        first = 1;
        count = nr - 1;
    } else {
        return 0;
    }
    if (count == 0 || count > VDM_BLK_IOV)
        return 0;
    for (k = 0; k < count; k++) {
        const uint64_t *e = ent + 2 * (first + k);
        iov[k].iov_base = (void *)(uintptr_t)e[0];
        iov[k].iov_len = e[1];
        bytes += e[1];
    }
    sector = h.sector;
    if (bytes == 0 || bytes % VDM_BLK_SECTOR || sector > d->capacity ||
        bytes / VDM_BLK_SECTOR > d->capacity - sector)
        return 0;
    if (h.type == VDM_BLK_T_IN) {
        got = preadv2(d->fd, iov, (int)count, (off_t)(sector * VDM_BLK_SECTOR), d->read_flags);
        if (got < 0 && d->read_flags && (errno == EOPNOTSUPP || errno == EINVAL)) {
            /* as HostFile.read_nowait: the file system refuses RWF_NOWAIT; asked once. A file on
             * tmpfs/ramfs is then read plainly (a copy from memory); any other: Python's path */
            if (on_memory_fs(d->fd)) {
                d->read_flags = 0;
                got = preadv2(d->fd, iov, (int)count, (off_t)(sector * VDM_BLK_SECTOR), 0);
            } else {
                d->reads = 0;
            }
        }
        if (got < 0 || (uint64_t)got != bytes)
            return 0;
        *(uint8_t *)(uintptr_t)ent[2 * n - 2] = 0; /* S_OK */
        *written = (uint32_t)(bytes + 1);
        return 1;
    }
    if (bytes > d->write_max)
        return 0;
    got = pwritev2(d->fd, iov, (int)count, (off_t)(sector * VDM_BLK_SECTOR), d->write_flags);
    if (got < 0 && d->write_flags && (errno == EOPNOTSUPP || errno == EINVAL)) {
        d->write_flags = 0; /* as HostFile.write_inline: this file system does not take it */
        got = pwritev2(d->fd, iov, (int)count, (off_t)(sector * VDM_BLK_SECTOR), 0);
    }
    if (got < 0 || (uint64_t)got != bytes)
        return 0;
    *(uint8_t *)(uintptr_t)ent[2 * n - 2] = 0; /* S_OK */
    *written = 1;
    return 2;
}
