// SPDX-License-Identifier: MIT
/*
 * blkio_frontend: a vhost-user-blk frontend without a guest, on libblkio 1.5 (Debian 13).
 *
 * It connects to a vhost-user-blk backend's socket (vdm vhost-user --disk, qemu-storage-daemon
 * --export vhost-user-blk) through libblkio's "virtio-blk-vhost-user" driver and either checks
 * data or measures speed. Built by scripts/frontends/build.sh inside the Debian 13 root; the tests
 * (tests/vhost_user/test_libblkio.py) and benchmarks/vhost_user_blk_free.py run it.
 *
 *   blkio_frontend --path SOCK --mode verify [--offset B] [--size B] [--bs B] [--qd N] [--seed S]
 *                  [--write-zeroes] [--discard]
 *       write the pattern over [offset, offset+size) in bs-sized requests, qd in flight; flush;
 *       read it back and compare. --write-zeroes: then zero the last quarter, read zeros back,
 *       flush. --discard: then discard the third quarter (its contents are undefined after).
 *   blkio_frontend --path SOCK --mode check ...   read and compare only (data written earlier)
 *   blkio_frontend --path SOCK --mode randread|randwrite|read|write [--bs B] [--qd N]
 *                  [--size B] [--offset B] [--time SEC | --count N] [--warmup SEC]
 *       a benchmark; the last line is machine-readable:
 *       RESULT mode=randread bs=4096 qd=32 ios=N seconds=S iops=X mibps=Y p50_us=A p99_us=B errors=0
 *
 * The pattern: every 512-byte sector at byte offset o of the disk holds the 64-bit little-endian
 * seed, then o / 512 as a 64-bit little-endian number, then 496 bytes where byte i (16 <= i < 512)
 * is (seed + sector * 31 + i) mod 256; so a sector in the wrong place or a stale one shows.
 * Exit status: 0 ok, 1 data mismatch (VERIFY mismatch ... line), 2 an I/O error or setup failure
 * (ERROR ... line), 64 bad usage.
 */
#define _GNU_SOURCE
#include <blkio.h>
#include <errno.h>
#include <getopt.h>
#include <inttypes.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define SECTOR 512u

struct opts {
    const char *path;
    const char *driver;
    const char *mode;
    uint64_t offset, size, bs, count;
    int qd, queue_size;
    uint64_t seed;
    double time_s, warmup_s;
    bool write_zeroes, discard;
};

struct slot {
    uint64_t start_ns;
    uint64_t offset;
    bool busy;
};

static struct blkio *b;
static struct blkioq *q;
static struct blkio_mem_region region;
static unsigned char *bufs;
static struct slot *slots;
static struct blkio_completion *comps;

static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

static void die(const char *what, int ret)
{
    printf("ERROR %s: %s: %s\n", what, strerror(ret < 0 ? -ret : ret), blkio_get_error_msg());
    fflush(stdout);
    exit(2);
}

static void fill_pattern(unsigned char *buf, uint64_t offset, uint64_t len, uint64_t seed)
{
    for (uint64_t s = 0; s < len; s += SECTOR) {
        uint64_t sector = (offset + s) / SECTOR;
        unsigned char *p = buf + s;
        for (int i = 0; i < 8; i++) {
            p[i] = (unsigned char)(seed >> (8 * i));
            p[8 + i] = (unsigned char)(sector >> (8 * i));
        }
        unsigned base = (unsigned)(seed + sector * 31u);
        for (unsigned i = 16; i < SECTOR; i++)
            p[i] = (unsigned char)(base + i);
    }
}

/* Compare a read buffer with what should be there; on a mismatch print it and exit 1. */
static void compare(const unsigned char *got, uint64_t offset, uint64_t len, uint64_t seed, bool zeroes,
                    unsigned char *scratch)
{
    if (zeroes)
        memset(scratch, 0, len);
    else
        fill_pattern(scratch, offset, len, seed);
    if (memcmp(got, scratch, len) == 0)
        return;
    uint64_t i = 0;
    while (got[i] == scratch[i])
        i++;
    printf("VERIFY mismatch at offset %" PRIu64 ": byte 0x%02x, expected 0x%02x (%s)\n", offset + i, got[i],
           scratch[i], zeroes ? "zeroes" : "pattern");
    fflush(stdout);
    exit(1);
}

/* Wait for at least `min` completions; return how many, exit 2 on an error completion. */
static int reap(int min, int max, const char *what)
{
    int n = blkioq_do_io(q, comps, min, max, NULL);
    if (n < 0)
        die("blkioq_do_io", n);
    for (int i = 0; i < n; i++) {
        if (comps[i].ret != 0) {
            struct slot *sl = &slots[(uintptr_t)comps[i].user_data];
            printf("ERROR %s at offset %" PRIu64 ": %s: %s\n", what, sl->offset, strerror(-comps[i].ret),
                   comps[i].error_msg ? comps[i].error_msg : "");
            fflush(stdout);
            exit(2);
        }
    }
    return n;
}

enum op { OP_READ, OP_WRITE, OP_ZEROES, OP_DISCARD };

/* Queue one request in `slot` (its buffer is the slot's bs-sized stride of the mapped region). */
static void submit(enum op op, int slot, uint64_t bs, uint64_t offset, uint64_t len)
{
    void *user = (void *)(uintptr_t)slot;
    unsigned char *buf = bufs + (uint64_t)slot * bs;
    slots[slot].offset = offset;
    slots[slot].busy = true;
    slots[slot].start_ns = now_ns();
    switch (op) {
    case OP_READ: blkioq_read(q, offset, buf, len, user, 0); break;
    case OP_WRITE: blkioq_write(q, offset, buf, len, user, 0); break;
    case OP_ZEROES: blkioq_write_zeroes(q, offset, len, user, 0); break;
    case OP_DISCARD: blkioq_discard(q, offset, len, user, 0); break;
    }
}

/* One pass of `op` over [start, end) in bs requests, qd in flight; reads are compared. */
static void pass(const struct opts *o, enum op op, uint64_t start, uint64_t end, bool zeroes, const char *what)
{
    static unsigned char *scratch;
    if (!scratch && !(scratch = malloc(o->bs)))
        die("malloc", ENOMEM);
    uint64_t next = start;
    int inflight = 0;
    while (next < end || inflight > 0) {
        for (int s = 0; s < o->qd && next < end; s++) {
            if (slots[s].busy)
                continue;
            uint64_t len = end - next < o->bs ? end - next : o->bs;
            if (op == OP_WRITE)
                fill_pattern(bufs + (uint64_t)s * o->bs, next, len, o->seed);
            submit(op, s, o->bs, next, len);
            next += len;
            inflight++;
        }
        int n = reap(1, o->qd, what);
        for (int i = 0; i < n; i++) {
            int s = (int)(uintptr_t)comps[i].user_data;
            if (op == OP_READ) {
                uint64_t off = slots[s].offset;
                uint64_t len = end - off < o->bs ? end - off : o->bs;
                compare(bufs + (uint64_t)s * o->bs, off, len, o->seed, zeroes, scratch);
            }
            slots[s].busy = false;
            inflight--;
        }
    }
}

static void flush_all(void)
{
    slots[0].offset = 0;
    slots[0].busy = true;
    blkioq_flush(q, (void *)(uintptr_t)0, 0);
    reap(1, 1, "flush");
    slots[0].busy = false;
}

static int cmp_u64(const void *a, const void *b2)
{
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b2;
    return x < y ? -1 : x > y;
}

static uint64_t rng_state;
static uint64_t rnd(void)
{
    rng_state ^= rng_state << 13;
    rng_state ^= rng_state >> 7;
    rng_state ^= rng_state << 17;
    return rng_state;
}

static void bench(const struct opts *o)
{
    bool rnd_off = strncmp(o->mode, "rand", 4) == 0;
    bool is_write = strstr(o->mode, "write") != NULL;
    enum op op = is_write ? OP_WRITE : OP_READ;
    uint64_t blocks = o->size / o->bs, seq = 0;
    size_t cap = 1 << 20, nlat = 0;
    uint64_t *lat = malloc(cap * sizeof *lat);
    if (!lat || blocks == 0)
        die("bench setup", blocks ? ENOMEM : EINVAL);
    for (int s = 0; s < o->qd; s++)
        fill_pattern(bufs + (uint64_t)s * o->bs, 0, o->bs, o->seed);
    rng_state = o->seed * 0x9E3779B97F4A7C15ull | 1;

    uint64_t t0 = now_ns(), measure_from = t0 + (uint64_t)(o->warmup_s * 1e9);
    uint64_t deadline = o->count ? UINT64_MAX : measure_from + (uint64_t)(o->time_s * 1e9);
    uint64_t ios = 0, submitted = 0, t_start = 0, t_end = 0;
    int inflight = 0;
    bool measuring = o->warmup_s <= 0;
    if (measuring)
        t_start = t0;
    for (;;) {
        uint64_t t = now_ns();
        if (!measuring && t >= measure_from) {
            measuring = true;
            t_start = t;
        }
        bool more = o->count ? submitted < o->count : t < deadline;
        for (int s = 0; s < o->qd && more; s++) {
            if (slots[s].busy)
                continue;
            uint64_t blk = rnd_off ? rnd() % blocks : seq++ % blocks;
            submit(op, s, o->bs, o->offset + blk * o->bs, o->bs);
            submitted++;
            inflight++;
            more = o->count ? submitted < o->count : true;
        }
        if (inflight == 0)
            break;
        int n = reap(1, o->qd, o->mode);
        uint64_t done = now_ns();
        for (int i = 0; i < n; i++) {
            int s = (int)(uintptr_t)comps[i].user_data;
            if (measuring && slots[s].start_ns >= t_start) {
                if (nlat == cap) {
                    cap *= 2;
                    if (!(lat = realloc(lat, cap * sizeof *lat)))
                        die("realloc", ENOMEM);
                }
                lat[nlat++] = done - slots[s].start_ns;
                ios++;
            }
            slots[s].busy = false;
            inflight--;
        }
        t_end = done;
    }
    double secs = (double)(t_end - t_start) / 1e9;
    qsort(lat, nlat, sizeof *lat, cmp_u64);
    double p50 = nlat ? lat[nlat / 2] / 1e3 : 0, p99 = nlat ? lat[(nlat * 99) / 100] / 1e3 : 0;
    printf("RESULT mode=%s bs=%" PRIu64 " qd=%d ios=%" PRIu64 " seconds=%.3f iops=%.0f mibps=%.1f "
           "p50_us=%.1f p99_us=%.1f errors=0\n",
           o->mode, o->bs, o->qd, ios, secs, secs > 0 ? ios / secs : 0,
           secs > 0 ? ios * (double)o->bs / secs / 1048576.0 : 0, p50, p99);
    free(lat);
}

static void usage(void)
{
    fprintf(stderr,
            "usage: blkio_frontend --path SOCK [--driver NAME] --mode verify|check|randread|randwrite|read|write\n"
            "       [--offset B] [--size B] [--bs B] [--qd N] [--seed S] [--queue-size N]\n"
            "       [--time SEC | --count N] [--warmup SEC] [--write-zeroes] [--discard]\n");
    exit(64);
}

static uint64_t num(const char *s)
{
    char *end;
    errno = 0;
    unsigned long long v = strtoull(s, &end, 0);
    uint64_t mul = 1;
    if (*end == 'k' || *end == 'K')
        mul = 1024, end++;
    else if (*end == 'm' || *end == 'M')
        mul = 1024 * 1024, end++;
    else if (*end == 'g' || *end == 'G')
        mul = 1024ull * 1024 * 1024, end++;
    if (errno || *end || end == s) {
        fprintf(stderr, "blkio_frontend: not a number: %s\n", s);
        exit(64);
    }
    return v * mul;
}

int main(int argc, char **argv)
{
    struct opts o = {.driver = "virtio-blk-vhost-user", .mode = "verify", .bs = 4096, .qd = 1,
                     .seed = 1, .time_s = 5, .size = 0};
    static const struct option longopts[] = {
        {"path", 1, 0, 'p'}, {"driver", 1, 0, 'D'}, {"mode", 1, 0, 'm'}, {"offset", 1, 0, 'o'},
        {"size", 1, 0, 's'}, {"bs", 1, 0, 'b'}, {"qd", 1, 0, 'q'}, {"seed", 1, 0, 'S'},
        {"time", 1, 0, 't'}, {"count", 1, 0, 'c'}, {"warmup", 1, 0, 'w'}, {"queue-size", 1, 0, 'Q'},
        {"write-zeroes", 0, 0, 'z'}, {"discard", 0, 0, 'd'}, {0, 0, 0, 0}};
    int c;
    while ((c = getopt_long(argc, argv, "", longopts, NULL)) != -1) {
        switch (c) {
        case 'p': o.path = optarg; break;
        case 'D': o.driver = optarg; break;
        case 'm': o.mode = optarg; break;
        case 'o': o.offset = num(optarg); break;
        case 's': o.size = num(optarg); break;
        case 'b': o.bs = num(optarg); break;
        case 'q': o.qd = (int)num(optarg); break;
        case 'S': o.seed = num(optarg); break;
        case 't': o.time_s = strtod(optarg, NULL); break;
        case 'c': o.count = num(optarg); break;
        case 'w': o.warmup_s = strtod(optarg, NULL); break;
        case 'Q': o.queue_size = (int)num(optarg); break;
        case 'z': o.write_zeroes = true; break;
        case 'd': o.discard = true; break;
        default: usage();
        }
    }
    bool verify = !strcmp(o.mode, "verify"), check = !strcmp(o.mode, "check");
    bool benchmode = !strcmp(o.mode, "randread") || !strcmp(o.mode, "randwrite") || !strcmp(o.mode, "read") ||
                     !strcmp(o.mode, "write");
    const char *bad = !o.path                             ? "--path SOCK is required"
                      : optind != argc                      ? "unexpected arguments after the options"
                      : !(verify || check || benchmode)     ? "--mode must be verify, check, randread, randwrite, read or write"
                      : o.qd < 1 || o.qd > 1024             ? "--qd must be 1..1024"
                      : o.bs == 0 || o.bs % SECTOR          ? "--bs must be a non-zero multiple of 512"
                      : o.offset % SECTOR || o.size % SECTOR ? "--offset and --size must be multiples of 512"
                                                            : NULL;
    if (bad) {
        fprintf(stderr, "blkio_frontend: %s\n", bad);
        usage();
    }

    int ret = blkio_create(o.driver, &b);
    if (ret < 0)
        die("blkio_create", ret);
    if ((ret = blkio_set_str(b, "path", o.path)) < 0)
        die("set path", ret);
    if ((ret = blkio_connect(b)) < 0)
        die("blkio_connect", ret);
    uint64_t capacity = 0, align = 0;
    if ((ret = blkio_get_uint64(b, "capacity", &capacity)) < 0)
        die("get capacity", ret);
    if (o.queue_size && (ret = blkio_set_int(b, "queue-size", o.queue_size)) < 0)
        die("set queue-size", ret);
    if ((ret = blkio_start(b)) < 0)
        die("blkio_start", ret);
    q = blkio_get_queue(b, 0);
    if (!q)
        die("blkio_get_queue", EINVAL);
    if (o.size == 0)
        o.size = capacity > o.offset ? capacity - o.offset : 0;
    if (o.offset + o.size > capacity || o.size == 0) {
        printf("ERROR range: offset %" PRIu64 " + size %" PRIu64 " past the capacity %" PRIu64 "\n", o.offset,
               o.size, capacity);
        return 2;
    }
    if ((ret = blkio_get_uint64(b, "mem-region-alignment", &align)) < 0)
        die("get mem-region-alignment", ret);
    uint64_t len = (uint64_t)o.qd * o.bs;
    len = (len + align - 1) / align * align;
    if ((ret = blkio_alloc_mem_region(b, &region, len)) < 0)
        die("blkio_alloc_mem_region", ret);
    if ((ret = blkio_map_mem_region(b, &region)) < 0)
        die("blkio_map_mem_region", ret);
    bufs = region.addr;
    slots = calloc((size_t)o.qd, sizeof *slots);
    comps = calloc((size_t)o.qd, sizeof *comps);
    if (!slots || !comps)
        die("calloc", ENOMEM);
    printf("CONNECTED driver=%s capacity=%" PRIu64 " mem-region-alignment=%" PRIu64 "\n", o.driver, capacity,
           align);
    fflush(stdout);

    if (benchmode) {
        bench(&o);
    } else {
        uint64_t end = o.offset + o.size;
        uint64_t quarter = o.size / 4 / SECTOR * SECTOR;
        if (verify) {
            pass(&o, OP_WRITE, o.offset, end, false, "write");
            flush_all();
        }
        pass(&o, OP_READ, o.offset, end, false, "read");
        printf("VERIFY ok pattern offset=%" PRIu64 " size=%" PRIu64 " seed=%" PRIu64 "\n", o.offset, o.size,
               o.seed);
        if (verify && o.write_zeroes && quarter) {
            pass(&o, OP_ZEROES, end - quarter, end, false, "write-zeroes");
            pass(&o, OP_READ, end - quarter, end, true, "read");
            flush_all();
            printf("VERIFY ok zeroes offset=%" PRIu64 " size=%" PRIu64 "\n", end - quarter, quarter);
        }
        if (verify && o.discard && quarter) {
            pass(&o, OP_DISCARD, end - 2 * quarter, end - quarter, false, "discard");
            flush_all();
            printf("DISCARD ok offset=%" PRIu64 " size=%" PRIu64 "\n", end - 2 * quarter, quarter);
        }
    }
    fflush(stdout);
    blkio_unmap_mem_region(b, &region);
    blkio_free_mem_region(b, &region);
    blkio_destroy(&b);
    return 0;
}
