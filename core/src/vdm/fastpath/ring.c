/* vdm's optional compiled fast path: the split virtqueue's ring work, nothing of any device.
 *
 * Built by cffi in API mode (vdm/fastpath/build.py); called from vdm.fastpath and vdm.virtqueue.
 * The pure-Python walk (vdm/chain_walk.py) is the reference: this code checks the same rules in
 * the same order and reports the same errors (as codes that Python turns into the same messages);
 * tests/core/test_fastpath.py runs random and hostile rings through both.
 *
 * Everything here is guest memory written by an untrusted driver that may change it at any
 * moment: each descriptor is copied once into a local (memcpy + compiler barrier: no field is read
 * twice), every index is checked against the table it indexes before it is used, and nothing is
 * written but the used ring's avail_event field (pop) and the caller's state array -- except by
 * vdm_serve_batch (below), which also writes the used elements and used.idx of the chains a
 * device's compiled step served, and (ending a batch) avail_event or used.flags, and vdm_fill (at
 * the end), which copies the caller's bytes into the writable buffers of the chains it takes and
 * publishes them, both with the caller holding the queue's lock.
 *
 * The state array (uint64_t st[]) carries the walk between C and Python: see the ST_* indexes.
 * Entries (guest address, length) start at st[ST_ENTRIES]; readable ones first, then writable.
 * Guest memory is never touched through an address from a descriptor: Python maps the entries
 * through its GuestMemory, which checks them against guest RAM; vdm_serve_batch hands a device
 * only entries checked to lie inside one region of guest RAM (flat(), or translate() against
 * the caller's region table), and reads an indirect table only when it lies inside one too.
 */
#include <stdint.h>
#include <string.h>

#if !defined(__BYTE_ORDER__) || __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "vdm's fast path reads virtio 1.x little-endian rings with native loads"
#endif

/* what vdm/fastpath/__init__.py checks (ABI) before it uses a built module: bumped whenever the
 * declarations in build.py change */
#define VDM_FASTPATH_ABI 4

#define VDM_F_NEXT 1u
#define VDM_F_WRITE 2u
#define VDM_F_INDIRECT 4u
#define VDM_MAX_INDIRECT 4096u
#define VDM_MAX_CHAIN_BYTES (1ull << 32)

/* codes returned by vdm_walk / vdm_pop (mirrored in vdm/fastpath/__init__.py) */
#define VDM_DONE 0
#define VDM_INDIRECT 1 /* the chain continues in the indirect table at st[ST_IND_ADDR] */
#define VDM_EMPTY 2    /* vdm_pop: nothing available */
#define VDM_E_INDIRECT_LOOPS -1
#define VDM_E_TOO_LONG -2
#define VDM_E_NESTED -3
#define VDM_E_NOT_NEGOTIATED -4
#define VDM_E_INDIRECT_NEXT -5
#define VDM_E_INDIRECT_LEN -6
#define VDM_E_READ_AFTER_WRITE -7
#define VDM_E_NEXT_INDIRECT -8
#define VDM_E_NEXT -9
#define VDM_E_TOO_BIG -10
#define VDM_E_AHEAD -11 /* vdm_pop: the available index is more than size ahead */
#define VDM_E_HELD -12  /* vdm_pop: the head is held by the device */
#define VDM_E_HEAD -13  /* vdm_pop: the head is not below the size */

enum {
    ST_TOTAL = 0, ST_RBYTES, ST_IND_ADDR, ST_IND_LEN, ST_STEPS, ST_N, ST_NR, ST_VALUE,
    ST_WRITABLE, ST_HEAD, ST_LAST, ST_PENDING, ST_FLAT, ST_ENTRIES = 16
};

struct vdm_ring {
    const uint8_t *desc;      /* the descriptor table, size * 16 bytes */
    const uint16_t *avail16;  /* the available ring as u16: [0] flags, [1] idx, [2 + i] ring */
    uint16_t *used16;         /* the used ring as u16 (avail_event at avail_event16) */
    const uint8_t *held;      /* one byte per head, held_len of them: 1 while the device holds it */
    uint32_t held_len;
    uint32_t size;            /* the queue size, a power of two */
    uint32_t limit;           /* descriptors allowed in the ring part: min(size, MAX_CHAIN) */
    uint32_t avail_event16;
    int event_idx;
    int indirect;             /* VIRTIO_F_INDIRECT_DESC negotiated */
    uint64_t flat_base;       /* guest RAM as one region [flat_base, flat_base + flat_size), or */
    uint64_t flat_size;       /* flat_size 0: see flat() */
    uint32_t used_event16;    /* used_event's index in avail16 (EVENT_IDX) */
    uint64_t *counts;         /* the queue's counters (VDM_C_*), updated by vdm_serve_batch only */
};

#define COMPILER_BARRIER() __asm__ __volatile__("" ::: "memory")

static inline void read_fence(void)
{
#if defined(__x86_64__) || defined(__i386__)
    COMPILER_BARRIER(); /* TSO: loads are not reordered with older loads */
#else
    __atomic_thread_fence(__ATOMIC_ACQUIRE);
#endif
}

/* Walk one table (the ring's descriptor table from ``i``, or an indirect table from 0), exactly as
 * vdm.chain_walk.walk_chain's loop does. st[ST_TOTAL], st[ST_RBYTES] and st[ST_WRITABLE] carry over
 * from the ring part to the indirect part; the caller clears them before a chain. */
static int walk(const uint8_t *table, uint32_t table_len, uint32_t limit, uint32_t i, int in_indirect,
                int indirect_ok, uint64_t *st)
{
    uint32_t steps = 0, n = 0, nr = 0;
    uint64_t total = st[ST_TOTAL], rbytes = st[ST_RBYTES], writable = st[ST_WRITABLE];
    uint64_t *out = st + ST_ENTRIES;
    int rc = VDM_DONE;

    for (;;) {
        struct { uint64_t addr; uint32_t len; uint16_t flags; uint16_t next; } d;
        memcpy(&d, table + ((size_t)i << 4), 16);
        COMPILER_BARRIER(); /* the guest may rewrite the descriptor: use this one copy */
        if (++steps > limit) {
            st[ST_VALUE] = limit;
            rc = in_indirect ? VDM_E_INDIRECT_LOOPS : VDM_E_TOO_LONG;
            break;
        }
        if (d.flags & VDM_F_INDIRECT) {
            if (in_indirect) { rc = VDM_E_NESTED; break; }
            if (!indirect_ok) { rc = VDM_E_NOT_NEGOTIATED; break; }
            if (d.flags & VDM_F_NEXT) { rc = VDM_E_INDIRECT_NEXT; break; }
            if (d.len == 0 || d.len % 16 || d.len / 16 > VDM_MAX_INDIRECT) {
                st[ST_VALUE] = d.len;
                rc = VDM_E_INDIRECT_LEN;
                break;
            }
            st[ST_IND_ADDR] = d.addr;
            st[ST_IND_LEN] = d.len;
            rc = VDM_INDIRECT;
            break;
        }
        total += d.len;
        if (d.flags & VDM_F_WRITE) {
            writable = 1;
        } else {
            if (writable) { rc = VDM_E_READ_AFTER_WRITE; break; }
            rbytes += d.len;
            nr++;
        }
        out[2 * n] = d.addr;
        out[2 * n + 1] = d.len;
        n++;
        if (!(d.flags & VDM_F_NEXT)) {
            if (total > VDM_MAX_CHAIN_BYTES)
                rc = VDM_E_TOO_BIG;
            break;
        }
        if (d.next >= table_len) {
            st[ST_VALUE] = d.next;
            rc = in_indirect ? VDM_E_NEXT_INDIRECT : VDM_E_NEXT;
            break;
        }
        i = d.next;
    }
    st[ST_TOTAL] = total;
    st[ST_RBYTES] = rbytes;
    st[ST_WRITABLE] = writable;
    st[ST_STEPS] = steps;
    st[ST_N] = n;
    st[ST_NR] = nr;
    return rc;
}

/* If every entry the last walk() wrote lies inside the ring's flat region, rewrite them as
 * (start, end) offsets into it and set st[ST_FLAT] (Python then slices the region's view, as
 * FlatGuestMemory.map does); otherwise leave them as (address, length) with st[ST_FLAT] 0. */
static int flat(const struct vdm_ring *r, uint64_t *st, int rc)
{
    uint64_t *out = st + ST_ENTRIES, k, n = st[ST_N];

    st[ST_FLAT] = 0;
    if (r->flat_size == 0)
        return rc;
    for (k = 0; k < n; k++) {
        uint64_t addr = out[2 * k], len = out[2 * k + 1];
        if (addr < r->flat_base || addr - r->flat_base > r->flat_size ||
            len > r->flat_size - (addr - r->flat_base))
            return rc; /* (FlatGuestMemory.map decides: it maps or raises) */
    }
    for (k = 0; k < n; k++) {
        out[2 * k] -= r->flat_base;
        out[2 * k + 1] += out[2 * k];
    }
    st[ST_FLAT] = 1;
    return rc;
}

/* The ring part of the chain at ``head`` (below the ring's size: the caller checked). */
int vdm_walk(const struct vdm_ring *r, uint32_t head, uint64_t *st)
{
    st[ST_TOTAL] = st[ST_RBYTES] = st[ST_WRITABLE] = 0;
    return flat(r, st, walk(r->desc, r->size, r->limit, head, 0, r->indirect, st));
}

/* The indirect part: ``count`` descriptors at ``table`` (st holds enough room for them). */
int vdm_walk_indirect(const struct vdm_ring *r, const uint8_t *table, uint32_t count, uint64_t *st)
{
    return flat(r, st, walk(table, count, count, 0, 1, r->indirect, st));
}

/* vdm.virtqueue.Virtqueue.pop's ring work: read the available index, take the next head, write
 * avail_event (EVENT_IDX), check the head is not held and below the size, walk its ring part.
 * st[ST_LAST] is the new last_avail_idx once a head was taken (codes other than EMPTY/AHEAD). */
int vdm_pop(const struct vdm_ring *r, uint32_t last, uint64_t *st)
{
    uint32_t idx = __atomic_load_n(&r->avail16[1], __ATOMIC_RELAXED);
    uint32_t pending = (idx - last) & 0xFFFF, head;

    if (pending == 0)
        return VDM_EMPTY;
    if (pending > r->size) {
        st[ST_VALUE] = idx;
        st[ST_PENDING] = pending;
        return VDM_E_AHEAD;
    }
    read_fence(); /* the index before the entries it covers */
    head = __atomic_load_n(&r->avail16[2 + (last & (r->size - 1))], __ATOMIC_RELAXED);
    last = (last + 1) & 0xFFFF;
    st[ST_HEAD] = head;
    st[ST_LAST] = last;
    if (r->event_idx)
        __atomic_store_n(&r->used16[r->avail_event16], (uint16_t)last, __ATOMIC_RELAXED);
    if (head < r->held_len && r->held[head])
        return VDM_E_HELD;
    if (head >= r->size || head >= r->held_len)
        return VDM_E_HEAD;
    return vdm_walk(r, head, st);
}

/* ---- a batch served by a device's compiled step (vdm_serve_batch) ----------------------------
 *
 * Take chains, one after another, serve each with the device's ``serve`` function and publish
 * the served ones with one used-index store -- only for the plain case: no held head, the index
 * not running ahead, the chain's buffers (and its indirect table, when the ring part is that one
 * descriptor) inside guest RAM, and ``serve`` saying it served it. The first chain that is
 * anything else is left untaken (last_avail_idx, avail_event and the ring as they were), so the
 * caller's pop takes it and the reference path serves it or reports its error. ``serve`` gets
 * the chain's entries as (host address, length) (readable ones first, ``nr`` of them, then
 * writable), each checked to lie inside one region of guest RAM -- the flat region the walk
 * checks against, or else the region table the caller gives (FlatGuestMemory's regions, looked up
 * as its map() does) -- and it returns 0 (not served, nothing the
 * guest can see changed in a way the reference path does not redo) or the class of request it
 * served (1..VDM_KINDS, counted in io[IO_KINDS + class - 1]) with the length written in *written.
 *
 * The end of a batch (io[IO_FLAGS] & VDM_F_END): when the step stops with nothing left for pop --
 * the ring read empty, or the walk budget spent -- it also does what vdm.used_ring's
 * complete_batch([]) does next, with its exact rule: store the kick request (avail_event = the new
 * last_avail_idx with EVENT_IDX, else used.flags 0), a full fence, then, if anything was pushed
 * (here or before: VDM_F_PUSHED), decide the interrupt (EVENT_IDX: vring_need_event over
 * used_event from the last signalled index io[IO_SIGNALLED], or always when none is valid yet
 * (VDM_F_VALID clear); else the available ring's NO_INTERRUPT flag), and whether buffers are
 * there to take (the available index moved past last_avail_idx and the budget is not spent).
 * io[IO_RES] says what it did (VDM_R_*); the caller updates its Python state from it.
 *
 * Deferred requests (ABI 4): ``serve`` may return its class or'ed with VDM_DEFERRED -- the request
 * checked and its I/O started on another thread, *written set as if it succeeded. Before anything
 * is published, vdm_serve_batch then calls ``serve(ctx, NULL, k, 0, ok)`` once (the join): it
 * returns when the k requests deferred in this call are finished, no thread touching their buffers
 * or the file for them any more, with ok[i] 1 (served, status written) or 0 (not: as a 0 return)
 * for the i-th of them. The chains from the first one that was not served on are left untaken as
 * above (last_avail_idx, used index, counters and classes as if the batch had stopped there; a chain
 * after it that was served is served again by the reference path: its request is still in flight,
 * so the driver cannot tell), and the batch is not ended. So all I/O of a call is done inside it,
 * under the caller's lock, and the publish rule is the one above.
 *
 * The queue's counters (requests, bytes read and written, latency) are added to in r->counts.
 * The caller holds the queue's lock (the used ring is written here) and is the queue's taker. */

#include <time.h>

#define VDM_KINDS 4

typedef int (*vdm_serve_fn)(void *ctx, const uint64_t *ent, uint32_t n, uint32_t nr, uint32_t *written);

struct vdm_batch {
    uint8_t *base;        /* the flat region's bytes, flat_size of them, writable (ring.flat_size != 0) */
    const uint64_t *regions; /* or guest RAM as nregions (guest address, size, host address) triples, */
    uint32_t nregions;       /* sorted by guest address, not overlapping, writable (FlatGuestMemory's) */
    uint32_t max;         /* chains one call takes at most (at most VDM_BATCH_MAX) */
    uint64_t room;        /* the entries the state array holds */
};

#define VDM_BATCH_MAX 64u
#define VDM_DEFERRED 0x100 /* serve's return: started, finished by the join (above) */

/* the io words (mirrored in vdm/fastpath/__init__.py) */
enum {
    IO_LAST = 0,   /* in: last_avail_idx; out: after the chains taken */
    IO_USED,       /* in: the used index; out: the new one (published) */
    IO_BUDGET,     /* in: descriptor reads allowed (the walk budget left, > 0) */
    IO_FLAGS,      /* in: VDM_F_* */
    IO_SIGNALLED,  /* in: the used index last signalled (EVENT_IDX, valid with VDM_F_VALID) */
    IO_SERVED,     /* out: chains taken and served (and published) */
    IO_STEPS,      /* out: descriptors read for them */
    IO_RES,        /* out: VDM_R_* */
    IO_KINDS,      /* out: served chains per class serve() returned, VDM_KINDS words */
    IO_WORDS = IO_KINDS + VDM_KINDS
};
#define VDM_F_END 1u     /* end the batch when nothing is left for pop (above) */
#define VDM_F_PUSHED 2u  /* something was pushed since the last interrupt decision */
#define VDM_F_VALID 4u   /* io[IO_SIGNALLED] holds a signalled index */
#define VDM_R_FULL 1u    /* stopped after ``max`` chains: call again */
#define VDM_R_ENDED 2u   /* the batch was ended (kick request stored, fence, decided) */
#define VDM_R_DECIDED 4u /* ... and the interrupt decided (something was pushed): nothing pushed now */
#define VDM_R_NOTIFY 8u  /* ... and the driver wants the interrupt */
#define VDM_R_MORE 16u   /* ... and buffers are there to take: process the queue again */
/* the counters' words in r->counts (mirrored in vdm/virtqueue.py) */
enum { VDM_C_REQUESTS = 0, VDM_C_RBYTES, VDM_C_WBYTES, VDM_C_TOOK, VDM_C_LATENCY };

/* The host address of [addr, addr + len) as FlatGuestMemory.map finds it: the region with the
 * greatest guest address <= addr, which must hold the whole range; 0 when none does. */
static uint64_t translate(const struct vdm_batch *b, uint64_t addr, uint64_t len)
{
    uint32_t k = b->nregions;

    while (k--) {
        const uint64_t *g = b->regions + 3 * k;
        if (g[0] <= addr) {
            uint64_t off = addr - g[0];
            return off <= g[1] && len <= g[1] - off ? g[2] + off : 0;
        }
    }
    return 0;
}

/* The entries the last walk wrote, as (host address, length) in place; 0 if one is not in RAM. */
static int to_host(const struct vdm_ring *r, const struct vdm_batch *b, uint64_t *st)
{
    uint64_t *out = st + ST_ENTRIES, k, n = st[ST_N];

    for (k = 0; k < n; k++) {
        if (st[ST_FLAT]) { /* (start, end) in the flat region, checked by flat() */
            uint64_t len = out[2 * k + 1] - out[2 * k];
            out[2 * k] = (uint64_t)(uintptr_t)b->base + out[2 * k];
            out[2 * k + 1] = len;
        } else {
            uint64_t host = b->nregions ? translate(b, out[2 * k], out[2 * k + 1]) : 0;
            if (!host)
                return 0; /* (for map() to decide: it raises, or maps it) */
            out[2 * k] = host;
        }
    }
    return 1;
}

static uint64_t now_ns(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t); /* (time.perf_counter_ns's clock) */
    return (uint64_t)t.tv_sec * 1000000000ull + (uint64_t)t.tv_nsec;
}

/* The head at ``last`` in the available ring, for the batch steps (vdm_serve_batch, vdm_fill): 1
 * with *head set when one is there that may be taken as it is (the index not running ahead, the
 * head inside the table and not held); 0 when the ring reads empty; -1 for anything else (left
 * for pop, which reports it). */
static inline int next_head(const struct vdm_ring *r, uint32_t last, uint32_t *head)
{
    uint32_t pending = (__atomic_load_n(&r->avail16[1], __ATOMIC_RELAXED) - last) & 0xFFFF, h;

    if (pending == 0)
        return 0;
    if (pending > r->size)
        return -1;
    read_fence(); /* the index before the entries it covers */
    h = __atomic_load_n(&r->avail16[2 + (last & (r->size - 1))], __ATOMIC_RELAXED);
    if (h >= r->size || h >= r->held_len || r->held[h])
        return -1;
    *head = h;
    return 1;
}

/* vdm.used_ring's _need_event (vring_need_event) */
static inline int need_event(uint16_t event, uint16_t new_idx, uint16_t old)
{
    return (uint16_t)(new_idx - event - 1) < (uint16_t)(new_idx - old);
}

int vdm_serve_batch(const struct vdm_ring *r, const struct vdm_batch *b, vdm_serve_fn serve, void *ctx,
                    uint64_t *st, uint64_t *io)
{
    uint32_t last = (uint32_t)io[IO_LAST], used_idx = (uint32_t)io[IO_USED], mask = r->size - 1;
    uint32_t served = 0, heads_max = b->max < VDM_BATCH_MAX ? b->max : VDM_BATCH_MAX;
    uint64_t budget = io[IO_BUDGET], flags = io[IO_FLAGS], steps = 0, rbytes = 0, wbytes = 0;
    uint64_t t0[VDM_BATCH_MAX], res = 0;
    uint32_t *elems = (uint32_t *)(r->used16 + 2); /* used element i: [2 i] id, [2 i + 1] len */
    int nothing_left = 0; /* pop would answer None now: the ring read empty, or the budget spent */
    /* per chain served, for a join that leaves some untaken: class, descriptors, bytes */
    uint8_t c_kind[VDM_BATCH_MAX], c_defer[VDM_BATCH_MAX];
    uint64_t c_steps[VDM_BATCH_MAX], c_rbytes[VDM_BATCH_MAX], c_wbytes[VDM_BATCH_MAX];
    uint32_t deferred = 0, last0 = last, used0 = used_idx;

    memset(io + IO_KINDS, 0, VDM_KINDS * sizeof *io);
    io[IO_SERVED] = io[IO_STEPS] = io[IO_RES] = 0;
    if (r->flat_size == 0 && b->nregions == 0)
        return 0;
    for (;;) {
        uint32_t head, written = 0, ring_steps = 0;
        int rc, kind, got;

        if (steps >= budget) {
            nothing_left = 1;
            break;
        }
        if (served >= heads_max) {
            res |= VDM_R_FULL;
            break;
        }
        got = next_head(r, last, &head);
        if (got <= 0) {
            nothing_left = got == 0;
            break;
        }
        t0[served] = now_ns();
        rc = vdm_walk(r, head, st);
        if (rc == VDM_INDIRECT) {
            /* only a chain that is its indirect table alone, the table inside guest RAM */
            uint64_t addr = st[ST_IND_ADDR], len = st[ST_IND_LEN], table;
            if (st[ST_N] != 0 || (len >> 4) > b->room)
                break;
            if (r->flat_size)
                table = addr >= r->flat_base && addr - r->flat_base <= r->flat_size &&
                        len <= r->flat_size - (addr - r->flat_base)
                            ? (uint64_t)(uintptr_t)b->base + (addr - r->flat_base) : 0;
            else
                table = translate(b, addr, len);
            if (!table)
                break;
            ring_steps = st[ST_STEPS];
            rc = vdm_walk_indirect(r, (const uint8_t *)(uintptr_t)table, (uint32_t)(len >> 4), st);
        }
        if (rc != VDM_DONE || !to_host(r, b, st))
            break;
        kind = serve(ctx, st + ST_ENTRIES, (uint32_t)st[ST_N], (uint32_t)st[ST_NR], &written);
        c_defer[served] = (kind & VDM_DEFERRED) != 0;
        kind &= ~VDM_DEFERRED;
        if (kind <= 0 || kind > VDM_KINDS) {
            if (c_defer[served]) /* (a step must not do this; its I/O is joined below all the same) */
                deferred++;
            break;
        }
        deferred += c_defer[served];
        /* taken: as pop would, then completed as push would */
        last = (last + 1) & 0xFFFF;
        if (r->event_idx)
            __atomic_store_n(&r->used16[r->avail_event16], (uint16_t)last, __ATOMIC_RELAXED);
        c_kind[served] = (uint8_t)kind;
        c_steps[served] = st[ST_STEPS] + ring_steps;
        c_rbytes[served] = st[ST_RBYTES];
        c_wbytes[served] = written;
        steps += st[ST_STEPS] + ring_steps;
        elems[2 * (used_idx & mask)] = head;
        elems[2 * (used_idx & mask) + 1] = written;
        used_idx = (used_idx + 1) & 0xFFFF;
        served++;
    }
    if (deferred) {
        /* the join (see above): keep the chains before the first one not served */
        uint32_t ok[VDM_BATCH_MAX + 1], k, j = 0;
        serve(ctx, NULL, deferred, 0, ok);
        for (k = 0; k < served; k++)
            if (c_defer[k] && !ok[j++])
                break;
        if (k < served) {
            served = k;
            last = (last0 + k) & 0xFFFF;
            used_idx = (used0 + k) & 0xFFFF;
            if (r->event_idx)
                __atomic_store_n(&r->used16[r->avail_event16], (uint16_t)last, __ATOMIC_RELAXED);
            nothing_left = 0;
            res &= ~VDM_R_FULL;
        }
    }
    steps = 0;
    for (uint32_t k = 0; k < served; k++) {
        io[IO_KINDS + c_kind[k] - 1]++;
        steps += c_steps[k];
        rbytes += c_rbytes[k];
        wbytes += c_wbytes[k];
    }
    if (served) {
        uint64_t *c = r->counts, t1 = now_ns(), took_sum = 0;
        uint32_t k;
        for (k = 0; k < served; k++) {
            uint64_t took = t1 - t0[k];
            took_sum += took;
            c[VDM_C_LATENCY + (took ? 64 - __builtin_clzll(took) : 0)]++;
        }
        c[VDM_C_REQUESTS] += served;
        c[VDM_C_RBYTES] += rbytes;
        c[VDM_C_WBYTES] += wbytes;
        c[VDM_C_TOOK] += took_sum;
        __atomic_thread_fence(__ATOMIC_RELEASE); /* the elements (and the data) before the index */
        __atomic_store_n(&r->used16[1], (uint16_t)used_idx, __ATOMIC_RELAXED);
    }
    if ((flags & VDM_F_END) && nothing_left) {
        /* complete_batch([]): the kick request, the fence, the decision (see above) */
        if (r->event_idx)
            __atomic_store_n(&r->used16[r->avail_event16], (uint16_t)last, __ATOMIC_RELAXED);
        else
            __atomic_store_n(&r->used16[0], (uint16_t)0, __ATOMIC_RELAXED);
        __atomic_thread_fence(__ATOMIC_SEQ_CST); /* those stores before the loads below */
        res |= VDM_R_ENDED;
        if (served || (flags & VDM_F_PUSHED)) {
            int notify;
            res |= VDM_R_DECIDED;
            if (r->event_idx) {
                uint16_t event = __atomic_load_n(&r->avail16[r->used_event16], __ATOMIC_RELAXED);
                notify = !(flags & VDM_F_VALID) ||
                         need_event(event, (uint16_t)used_idx, (uint16_t)io[IO_SIGNALLED]);
            } else {
                notify = !(__atomic_load_n(&r->avail16[0], __ATOMIC_RELAXED) & 1u); /* NO_INTERRUPT */
            }
            if (notify)
                res |= VDM_R_NOTIFY;
        }
        if (steps < budget && __atomic_load_n(&r->avail16[1], __ATOMIC_RELAXED) != (uint16_t)last)
            res |= VDM_R_MORE;
    }
    io[IO_LAST] = last;
    io[IO_USED] = used_idx;
    io[IO_SERVED] = served;
    io[IO_STEPS] = steps;
    io[IO_RES] = res;
    return (int)served;
}

/* ---- one byte string scattered over as many chains as it needs (vdm_fill) --------------------
 *
 * Virtqueue.fill_compiled's ring work (a received frame into the driver's receive buffers, for
 * one): take the next available chains, in ring order from ``last``, until their writable bytes
 * hold ``len`` bytes of ``data`` (at most ``max`` chains, never more than VDM_FILL_CHAINS nor
 * VDM_FILL_ENTRIES buffers in all), copy the data over them in order, write one used element per chain (its head,
 * the bytes copied into it) and publish them with one used-index store. All or nothing: the data
 * is never split. Only the plain case is done here -- every chain device-writable only, walked
 * without an indirect table, each buffer inside one region of guest RAM (to_host, as for
 * vdm_serve_batch: b gives guest RAM), at least ``min_len`` writable bytes per chain, no head held
 * nor taken twice, the index not running ahead, the walk budget (``budget`` descriptor reads) not
 * spent before a chain -- and the chains are
 * checked before anything is written. Anything else, or too few chains available, leaves the
 * queue, guest RAM and the data as they were (returns 0), for the Python path to take the chains
 * with pop and serve or reject them. Before the copy, when count_at + 2 <= len, the number of
 * chains is stored at data[count_at] (le16: virtio-net's num_buffers, for one). The caller holds
 * the queue's lock and is the queue's taker. Returns the chains used, n: last_avail_idx and the
 * used index are then ``last`` + n and ``used_idx`` + n (mod 2^16), st[ST_STEPS] the descriptors
 * read, st[ST_VALUE] the take-to-publish time in ns (the same for each chain). */

#define VDM_FILL_CHAINS 64
#define VDM_FILL_ENTRIES 256

int vdm_fill(const struct vdm_ring *r, const struct vdm_batch *b, uint8_t *data, uint64_t len, uint32_t last,
             uint32_t used_idx, uint64_t budget, uint32_t max, uint64_t min_len, uint64_t count_at, uint64_t *st)
{
    uint32_t mask = r->size - 1, n = 0, ne = 0, k, j;
    uint32_t heads[VDM_FILL_CHAINS], counts[VDM_FILL_CHAINS];
    uint64_t ent[2 * VDM_FILL_ENTRIES], have = 0, steps = 0, off = 0, t0, took;
    uint32_t *elems = (uint32_t *)(r->used16 + 2);

    if ((r->flat_size == 0 && b->nregions == 0) || len == 0)
        return 0;
    if (max > VDM_FILL_CHAINS)
        max = VDM_FILL_CHAINS;
    t0 = now_ns();
    while (have < len) {
        uint32_t head, cn;
        uint64_t *out = st + ST_ENTRIES;

        if (n == max || steps >= budget || next_head(r, last, &head) <= 0)
            return 0;
        for (k = 0; k < n; k++)
            if (heads[k] == head)
                return 0; /* (offered twice: pop's error, on the Python path) */
        if (vdm_walk(r, head, st) != VDM_DONE || st[ST_NR] != 0 || st[ST_TOTAL] < min_len ||
            st[ST_TOTAL] > 0xFFFFFFFFull) /* (a used length is 32 bits: push's ValueError) */
            return 0;
        cn = (uint32_t)st[ST_N];
        if (cn > VDM_FILL_ENTRIES - ne || !to_host(r, b, st))
            return 0;
        for (j = 0; j < cn; j++) {
            ent[2 * (ne + j)] = out[2 * j];
            ent[2 * (ne + j) + 1] = out[2 * j + 1];
        }
        heads[n] = head;
        counts[n] = cn;
        ne += cn;
        n++;
        steps += st[ST_STEPS];
        have += st[ST_TOTAL];
        last = (last + 1) & 0xFFFF;
    }
    /* every chain checked: taken, filled and completed, as pop, the device's copy and push would */
    if (count_at <= len && len - count_at >= 2) {
        data[count_at] = (uint8_t)n;
        data[count_at + 1] = (uint8_t)(n >> 8);
    }
    for (k = 0, ne = 0; k < n; k++) {
        uint64_t written = 0;
        for (j = 0; j < counts[k]; j++, ne++) {
            uint64_t c = ent[2 * ne + 1];
            if (c > len - off)
                c = len - off;
            if (c) /* (host addresses checked by to_host: inside one writable region) */
                memcpy((void *)(uintptr_t)ent[2 * ne], data + off, c);
            off += c;
            written += c;
        }
        elems[2 * (used_idx & mask)] = heads[k];
        elems[2 * (used_idx & mask) + 1] = (uint32_t)written;
        used_idx = (used_idx + 1) & 0xFFFF;
    }
    if (r->event_idx)
        __atomic_store_n(&r->used16[r->avail_event16], (uint16_t)last, __ATOMIC_RELAXED);
    took = now_ns() - t0;
    __atomic_thread_fence(__ATOMIC_RELEASE); /* the data and the elements before the index */
    __atomic_store_n(&r->used16[1], (uint16_t)used_idx, __ATOMIC_RELAXED);
    st[ST_STEPS] = steps;
    st[ST_VALUE] = took;
    return (int)n;
}
