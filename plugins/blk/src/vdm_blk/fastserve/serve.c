/* vdm-blk's optional compiled serve step: one virtio-blk request of the common kind, on a raw
 * image (or a qcow2 image's clusters it found allocated, below), from or into the page cache. Called by vdm.fastpath's vdm_serve_batch (core) for each
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
#include <sched.h>
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
    uint64_t write_max; /* HostFile.write_inline_max: larger writes go to a worker */
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

/* The request's shape and checks (see above): its type, data as iov[count], its byte count and
 * first sector; 0 when the step does not serve it. */
static int parse(const struct vdm_blk *d, const uint64_t *ent, uint32_t n, uint32_t nr,
                 struct iovec *iov, uint32_t *count_out, uint64_t *bytes_out, uint64_t *sector_out,
                 uint32_t *type_out)
{
    struct { uint32_t type; uint32_t reserved; uint64_t sector; } h;
    uint32_t first, count, k;
    uint64_t bytes = 0, sector;

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
    if (h.type == VDM_BLK_T_OUT && bytes > d->write_max)
        return 0;
    *count_out = count;
    *bytes_out = bytes;
    *sector_out = sector;
    *type_out = h.type;
    return 1;
}

/* The I/O of a parsed request at ``pos`` in the file: 1 read served, 2 write served, 0 not. */
static int serve_io(struct vdm_blk *d, const uint64_t *ent, uint32_t n, uint32_t *written,
                    struct iovec *iov, uint32_t count, uint64_t bytes, uint64_t pos, uint32_t type)
{
    ssize_t got;

    if (type == VDM_BLK_T_IN) {
        got = preadv2(d->fd, iov, (int)count, (off_t)pos, d->read_flags);
        if (got < 0 && d->read_flags && (errno == EOPNOTSUPP || errno == EINVAL)) {
            /* as HostFile.read_nowait: the file system refuses RWF_NOWAIT; asked once. A file on
             * tmpfs/ramfs is then read plainly (a copy from memory); any other: Python's path */
            if (on_memory_fs(d->fd)) {
                d->read_flags = 0;
                got = preadv2(d->fd, iov, (int)count, (off_t)pos, 0);
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
    got = pwritev2(d->fd, iov, (int)count, (off_t)pos, d->write_flags);
    if (got < 0 && d->write_flags && (errno == EOPNOTSUPP || errno == EINVAL)) {
        d->write_flags = 0; /* as HostFile.write_inline: this file system does not take it */
        got = pwritev2(d->fd, iov, (int)count, (off_t)pos, 0);
    }
    if (got < 0 || (uint64_t)got != bytes)
        return 0;
    *(uint8_t *)(uintptr_t)ent[2 * n - 2] = 0; /* S_OK */
    *written = 1;
    return 2;
}

/* 1: a read served, 2: a write served, 0: not served (see above). */
int vdm_blk_serve(void *ctx, const uint64_t *ent, uint32_t n, uint32_t nr, uint32_t *written)
{
    struct vdm_blk *d = ctx;
    struct iovec iov[VDM_BLK_IOV];
    uint32_t count, type;
    uint64_t bytes, sector;

    if (!parse(d, ent, n, nr, iov, &count, &bytes, &sector, &type))
        return 0;
    return serve_io(d, ent, n, written, iov, count, bytes, sector * VDM_BLK_SECTOR, type);
}

/* ---- qcow2: requests inside clusters the image's Python side found allocated ------------------
 *
 * The reference is Qcow2Disk.readv_nowait / writev_inline (vdm_blk.backends.qcow2_inline) for a
 * request inside one run of contiguous, allocated, unshared (COPIED) data clusters. The Python
 * side remembers such runs, as it maps them, in ``map`` (vdm_blk.fastserve.Qcow2Step.remember):
 * slot ``gc & (slots - 1)`` holds the host offset of guest cluster ``gc`` (cluster aligned, checked
 * not to be metadata) or'ed with ``(gc >> slot_bits) + 1`` in its low bits; 0 is empty. A request
 * is served here only when every cluster it touches is in the map and the clusters are
 * contiguous on the host; anything else (an empty or other slot) is left to the Python path.
 *
 * The map is valid while ``enabled``: whatever may change a mapped cluster's entry (discard,
 * write zeroes, giving clusters back, reloading or handing over the metadata) first calls
 * vdm_blk_q2_block, which disables the map, waits for the steps in flight (``busy``) and clears
 * it; vdm_blk_q2_unblock enables it again (empty). A step enters with busy++ then tests enabled,
 * block stores enabled = 0 then tests busy (both sequentially consistent): either the step sees
 * the map disabled or block waits for it. */

struct vdm_blk_q2 {
    struct vdm_blk d;
    uint64_t *map;      /* slots entries (Python owns the memory) */
    uint64_t slots;     /* a power of two */
    uint32_t slot_bits;
    uint32_t cbits;     /* log2 of the cluster size */
    int enabled;
    int busy;
};

#define VDM_Q2_MAX_CLUSTERS 64u /* a request touching more is Python's */

int vdm_blk_serve_qcow2(void *ctx, const uint64_t *ent, uint32_t n, uint32_t nr, uint32_t *written)
{
    struct vdm_blk_q2 *q = ctx;
    struct vdm_blk *d = &q->d;
    struct iovec iov[VDM_BLK_IOV];
    uint32_t count, type;
    uint64_t bytes, sector, off, gc, last, host = 0, cmask = ((uint64_t)1 << q->cbits) - 1;
    int rc = 0;

    if (!parse(d, ent, n, nr, iov, &count, &bytes, &sector, &type))
        return 0;
    off = sector * VDM_BLK_SECTOR;
    gc = off >> q->cbits;
    last = (off + bytes - 1) >> q->cbits;
    if (last - gc >= VDM_Q2_MAX_CLUSTERS)
        return 0;
    __atomic_add_fetch(&q->busy, 1, __ATOMIC_SEQ_CST);
    if (!__atomic_load_n(&q->enabled, __ATOMIC_SEQ_CST))
        goto out;
    for (uint64_t c = gc; c <= last; c++) {
        uint64_t e = __atomic_load_n(&q->map[c & (q->slots - 1)], __ATOMIC_ACQUIRE);
        uint64_t h = e & ~cmask;
        if ((e & cmask) != (c >> q->slot_bits) + 1 || h == 0)
            goto out;
        if (c == gc)
            host = h;
        else if (h != host + ((c - gc) << q->cbits))
            goto out;
    }
    rc = serve_io(d, ent, n, written, iov, count, bytes, host + (off & cmask), type);
out:
    __atomic_sub_fetch(&q->busy, 1, __ATOMIC_RELEASE);
    return rc;
}

/* Remember guest clusters gc..gc+count-1 at host..host+(count-1)*cluster (Python: the run was
 * just found mapped, with the metadata lock held and no exclusive holder). */
void vdm_blk_q2_remember(struct vdm_blk_q2 *q, uint64_t gc, uint64_t count, uint64_t host)
{
    for (uint64_t k = 0; k < count; k++, gc++)
        __atomic_store_n(&q->map[gc & (q->slots - 1)],
                         (host + (k << q->cbits)) | ((gc >> q->slot_bits) + 1), __ATOMIC_RELEASE);
}

/* Disable the map, wait for the steps using it, clear it. */
void vdm_blk_q2_block(struct vdm_blk_q2 *q)
{
    __atomic_store_n(&q->enabled, 0, __ATOMIC_SEQ_CST);
    while (__atomic_load_n(&q->busy, __ATOMIC_SEQ_CST))
        sched_yield();
    for (uint64_t k = 0; k < q->slots; k++)
        __atomic_store_n(&q->map[k], 0, __ATOMIC_RELAXED);
}

/* Use the (cleared) map again. */
void vdm_blk_q2_unblock(struct vdm_blk_q2 *q)
{
    __atomic_store_n(&q->enabled, 1, __ATOMIC_SEQ_CST);
}
