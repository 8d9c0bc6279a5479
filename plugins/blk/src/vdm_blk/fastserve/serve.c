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
 *
 * Requests of at least defer_min bytes are copied on a small pool of threads (see "large requests"
 * below) while the queue's thread takes the next chains; every one of them is finished before
 * the core publishes the batch.
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <errno.h>
#include <pthread.h>
#include <sched.h>
#include <stdint.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <sys/vfs.h>
#include <unistd.h>

#ifndef RWF_NOWAIT
#define RWF_NOWAIT 0x00000008
#endif

#define VDM_BLK_SECTOR 512u
#define VDM_BLK_T_IN 0u
#define VDM_BLK_T_OUT 1u
#define VDM_BLK_IOV 1024u /* HostFile's IOV_MAX */
#define VDM_POOL_IOV 16u  /* a request handed to the pool (below) has at most this many buffers */

struct vdm_blk {
    int fd;             /* the raw image's file (buffered, not O_DIRECT); -1: closed, serve nothing */
    int reads;          /* serve T_IN */
    int read_flags;     /* preadv2's flags: RWF_NOWAIT, or 0 on tmpfs/ramfs that refused it */
    int writes;         /* serve T_OUT (write-back, writable disk, not write-through) */
    int write_flags;    /* pwritev2's flags: RWF_NOWAIT, or 0 once the file system refused it */
    uint64_t capacity;  /* the disk's size in sectors */
    uint64_t write_max; /* HostFile.write_inline_max: larger writes go to a worker or the pool */
    uint64_t defer_min; /* requests of at least this many bytes go to the pool (below); 0: none */
    uint64_t deferred;  /* requests the pool served, reads and writes (a counter) */
    int read_seen;      /* a read with read_flags succeeded here: the flags are settled */
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
    if (h.type == VDM_BLK_T_OUT && bytes > d->write_max &&
        !(d->defer_min && bytes >= d->defer_min && count <= VDM_POOL_IOV)) /* (the pool's, below) */
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
        d->read_seen = 1;
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

/* ---- large requests on a small pool of threads (core's deferred requests, ring.c) ------------
 *
 * A read of at least d->defer_min bytes, once a read has settled the file's flags (read_seen), and
 * a write-back write of at least d->defer_min bytes (larger than write_max: without the pool it is
 * the Python path's worker's) are checked here as any other, then handed to the pool as a job (the
 * file, its iovec, the position, the status byte) and returned as VDM_DEFERRED: the queue's thread
 * goes on taking chains while a pool thread copies. A pooled read uses read_flags (RWF_NOWAIT: a
 * read that would wait for the device is not served, as inline); a pooled write is a plain
 * pwritev2, as the Python path's worker's pwritev. The join (serve with ent NULL, called by
 * vdm_serve_batch before it publishes anything) runs the thread's own jobs still queued itself,
 * waits for the rest, and reports each: served (the whole length transferred, status S_OK written
 * by the thread that did it) or not (the reference path serves it again). The jobs of one batch
 * belong to the calling thread (thread-local), so queues served on several threads at once join
 * only their own. The pool's threads only ever run preadv2/pwritev2 on a job's iovec -- guest
 * memory the core checked, mapped while the caller holds the queue's lock, which it holds until
 * the join has returned -- and a qcow2 job keeps the map in use (busy) until it is done. */

#define VDM_POOL_JOBS 64u /* VDM_BATCH_MAX */
#define VDM_DEFERRED 0x100

struct job {
    struct job *next;
    struct batch *owner;
    struct vdm_blk *d;
    int *busy;           /* qcow2's map users (left when the job is done), or NULL */
    int fd, flags, ok;
    uint32_t type, count;
    uint64_t bytes, pos;
    uint8_t *status;
    struct iovec iov[VDM_POOL_IOV];
};

struct batch {
    uint32_t n;         /* jobs this batch deferred */
    uint32_t remaining; /* ... not finished (under pool.lock) */
    struct job jobs[VDM_POOL_JOBS];
};

static struct {
    pthread_mutex_t lock;
    pthread_cond_t work, done;
    struct job *head, **tail;
    pid_t pid; /* the process the threads run in (a fork's child starts its own) */
    int threads;
} pool = {PTHREAD_MUTEX_INITIALIZER, PTHREAD_COND_INITIALIZER, PTHREAD_COND_INITIALIZER, NULL, NULL, 0, 0};

static __thread struct batch tls_batch;

static void run_job(struct job *j)
{
    ssize_t got = j->type == VDM_BLK_T_IN ? preadv2(j->fd, j->iov, (int)j->count, (off_t)j->pos, j->flags)
                                          : pwritev2(j->fd, j->iov, (int)j->count, (off_t)j->pos, 0);
    j->ok = got >= 0 && (uint64_t)got == j->bytes;
    if (j->ok) {
        *j->status = 0; /* S_OK */
        __atomic_add_fetch(&j->d->deferred, 1, __ATOMIC_RELAXED);
    }
    if (j->busy)
        __atomic_sub_fetch(j->busy, 1, __ATOMIC_RELEASE);
}

static void *pool_thread(void *arg)
{
    (void)arg;
    pthread_mutex_lock(&pool.lock);
    for (;;) {
        struct job *j = pool.head;
        if (!j) {
            pthread_cond_wait(&pool.work, &pool.lock);
            continue;
        }
        pool.head = j->next;
        if (!pool.head)
            pool.tail = &pool.head;
        pthread_mutex_unlock(&pool.lock);
        run_job(j);
        pthread_mutex_lock(&pool.lock);
        if (--j->owner->remaining == 0)
            pthread_cond_broadcast(&pool.done);
    }
    return NULL;
}

/* The pool's threads (started once per process, under pool.lock): 1 on fewer than 3 CPUs, else 2
 * -- the queue's thread copies too, at the join. 0 when none could be started: serve inline. */
static int pool_ready(void)
{
    pid_t pid = getpid();

    if (pool.pid == pid)
        return pool.threads;
    pool.pid = pid;
    pool.head = NULL;
    pool.tail = &pool.head;
    pool.threads = 0;
    long cpus = sysconf(_SC_NPROCESSORS_ONLN);
    int want = cpus >= 3 ? 2 : 1;
    for (int k = 0; k < want; k++) {
        pthread_t t;
        pthread_attr_t a;
        pthread_attr_init(&a);
        pthread_attr_setdetachstate(&a, PTHREAD_CREATE_DETACHED);
        pthread_attr_setstacksize(&a, 64 << 10);
        if (pthread_create(&t, &a, pool_thread, NULL) == 0)
            pool.threads++;
        pthread_attr_destroy(&a);
    }
    return pool.threads;
}

/* Hand a checked request to the pool: VDM_DEFERRED | its class, or 0 when it is not deferred (a
 * read is then served inline; a write above write_max is left to the Python path). */
static int defer(struct vdm_blk *d, int *busy, const uint64_t *ent, uint32_t n, uint32_t *written,
                 const struct iovec *iov, uint32_t count, uint64_t bytes, uint64_t pos, uint32_t type)
{
    struct batch *b;
    struct job *j;

    if (!d->defer_min || bytes < d->defer_min || (type == VDM_BLK_T_IN && !d->read_seen) ||
        count > VDM_POOL_IOV)
        return 0; /* (the common case: no thread-local lookup) */
    b = &tls_batch;
    if (b->n >= VDM_POOL_JOBS)
        return 0;
    pthread_mutex_lock(&pool.lock);
    if (!pool_ready()) {
        pthread_mutex_unlock(&pool.lock);
        return 0;
    }
    j = &b->jobs[b->n++];
    j->next = NULL;
    j->owner = b;
    j->d = d;
    j->busy = busy;
    j->fd = d->fd;
    j->flags = d->read_flags;
    j->ok = 0;
    j->type = type;
    j->count = count;
    j->bytes = bytes;
    j->pos = pos;
    j->status = (uint8_t *)(uintptr_t)ent[2 * n - 2];
    memcpy(j->iov, iov, count * sizeof *iov);
    b->remaining++;
    *pool.tail = j;
    pool.tail = &j->next;
    pthread_cond_signal(&pool.work);
    pthread_mutex_unlock(&pool.lock);
    *written = type == VDM_BLK_T_IN ? (uint32_t)(bytes + 1) : 1;
    return VDM_DEFERRED | (type == VDM_BLK_T_IN ? 1 : 2);
}

/* The join (see above): ok[i] for the i-th job of this thread's batch; the batch is empty after. */
static void join(uint32_t k, uint32_t *ok)
{
    struct batch *b = &tls_batch;
    uint32_t i;

    pthread_mutex_lock(&pool.lock);
    while (b->remaining) {
        struct job **p = &pool.head, *j;
        while ((j = *p) && j->owner != b) /* this batch's own jobs still queued: run them here */
            p = &j->next;
        if (!j) {
            pthread_cond_wait(&pool.done, &pool.lock);
            continue;
        }
        *p = j->next;
        if (pool.tail == &j->next)
            pool.tail = p;
        pthread_mutex_unlock(&pool.lock);
        run_job(j);
        pthread_mutex_lock(&pool.lock);
        b->remaining--;
    }
    pthread_mutex_unlock(&pool.lock);
    for (i = 0; i < k; i++)
        ok[i] = i < b->n && b->jobs[i].ok;
    b->n = 0;
}

/* 1: a read served, 2: a write served, 0: not served (see above); VDM_DEFERRED | 1: handed to the
 * pool; ent NULL: the join. */
int vdm_blk_serve(void *ctx, const uint64_t *ent, uint32_t n, uint32_t nr, uint32_t *written)
{
    struct vdm_blk *d = ctx;
    struct iovec iov[VDM_BLK_IOV];
    uint32_t count, type;
    uint64_t bytes, sector;
    int rc;

    if (!ent) {
        join(n, written);
        return 0;
    }
    if (!parse(d, ent, n, nr, iov, &count, &bytes, &sector, &type))
        return 0;
    if ((rc = defer(d, NULL, ent, n, written, iov, count, bytes, sector * VDM_BLK_SECTOR, type)) ||
        (type == VDM_BLK_T_OUT && bytes > d->write_max))
        return rc;
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

    if (!ent) {
        join(n, written);
        return 0;
    }
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
    if ((rc = defer(d, &q->busy, ent, n, written, iov, count, bytes, host + (off & cmask), type)))
        return rc; /* (the map stays in use, busy, until the job is done) */
    if (type == VDM_BLK_T_OUT && bytes > d->write_max)
        goto out;
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
