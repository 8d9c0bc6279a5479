/* vdm-net's optional compiled transmit step: one transmitted frame checked and written to the tap.
 *
 * A serve function of core's vdm_serve_batch (vdm/fastpath/ring.c: it takes the chains with the
 * compiled walk's checks, hands each one's buffers here as (host address, length) entries inside
 * guest RAM, and publishes the ones served with one used-index store). The Python path
 * (vdm_net.device's _send, vdm_net.vnet_hdr.check_tx) is the reference: this step sends only what
 * it would send, exactly as it would, and declines (returns 0: the chain stays in the ring for
 * pop, and the Python path decides) everything else -- a header check_tx refuses, a chain with
 * device-writable buffers, more buffers than MAX_IOV, a frame shorter than the header, the tap
 * pushing back (EAGAIN: the Python path retries the write and, pushed back too, keeps the chain
 * and sets tx_blocked). A write that fails otherwise (or writes short) has happened, so it is
 * not redone: the chain is completed (class 2) and the error kept in ``err`` for the caller to
 * count as _send counts it; the step declines every chain after it until the caller clears
 * ``err``.
 *
 * The header is read once, into a local copy, and checked and re-packed from that copy (the guest
 * may rewrite its buffers meanwhile); the frame after it goes to the tap straight from guest
 * memory, as the Python path's writev does.
 */
#include <errno.h>
#include <stdint.h>
#include <string.h>
#include <sys/uio.h>

#define HDR_LEN 12
#define HEAD_LEN (HDR_LEN + 64) /* the header and the frame's start _send reads */
#define ETH_HLEN 14
#define VLAN_HLEN 4
#define MAX_FRAME_LEN (ETH_HLEN + 2 * VLAN_HLEN + 40 + 65535)
#define MAX_IOV 1000 /* vdm_net.device.MAX_IOV: more iovecs go through the Python path's gather */
#define F_NEEDS_CSUM 1
#define GSO_NONE 0
#define GSO_TCPV4 1
#define GSO_UDP 3
#define GSO_TCPV6 4
#define GSO_UDP_L4 5
#define GSO_ECN 0x80
#define ETH_P_IP 0x0800
#define ETH_P_IPV6 0x86DD

struct vdm_net_tx {
    int fd;        /* the tap fd; -1: decline everything */
    int csum, tso4, tso6, ecn, ufo, uso; /* the transmit policy (vdm_net.vnet_hdr.HeaderPolicy) */
    int64_t mtu;   /* the policy's mtu, -1 when None */
    uint64_t bytes; /* frame bytes (without the header) sent, for the caller to take */
    int err;       /* 0, or the errno of the write that failed (-1: it wrote short), for the caller */
};

static inline uint16_t le16(const uint8_t *p) { return (uint16_t)(p[0] | p[1] << 8); }

/* vnet_hdr.ethertype: the EtherType after any VLAN tags, -1 when the bytes end before it */
static int ethertype(const uint8_t *frame, uint64_t len)
{
    uint64_t off = 12;
    while (off + 2 <= len) {
        int et = frame[off] << 8 | frame[off + 1];
        if (et != 0x8100 && et != 0x88A8 && et != 0x9100)
            return et;
        off += VLAN_HLEN;
    }
    return -1;
}

/* check_tx's rules on the header at hdr (the head's first HDR_LEN bytes, then head_len - HDR_LEN
 * of the frame); 1 with out[] the header for the tap, 0 when check_tx would refuse it */
static int check_tx(const struct vdm_net_tx *t, const uint8_t *hdr, uint64_t head_len, uint64_t frame_len,
                    uint8_t *out)
{
    unsigned flags = hdr[0] & F_NEEDS_CSUM, gso = hdr[1], base = gso & ~GSO_ECN;
    uint64_t hdr_len = le16(hdr + 2), gso_size = le16(hdr + 4), cs = 0, co = 0;
    int allowed, proto;

    if (frame_len < ETH_HLEN || frame_len > MAX_FRAME_LEN)
        return 0;
    if (flags && !t->csum)
        return 0;
    if (flags) {
        cs = le16(hdr + 6);
        co = le16(hdr + 8);
        if (cs + co + 2 > frame_len)
            return 0;
    }
    if (hdr_len > frame_len)
        return 0;
    if (gso == GSO_NONE) {
        if (t->mtu >= 0 && frame_len > (uint64_t)t->mtu + ETH_HLEN + VLAN_HLEN)
            return 0;
        gso_size = 0;
    } else {
        switch (base) {
        case GSO_TCPV4: allowed = t->tso4; break;
        case GSO_TCPV6: allowed = t->tso6; break;
        case GSO_UDP: allowed = t->ufo; break;
        case GSO_UDP_L4: allowed = t->uso; break;
        default: return 0; /* bad_gso_type */
        }
        if (!allowed || ((gso & GSO_ECN) && !t->ecn) || !flags || gso_size == 0)
            return 0;
        proto = ethertype(hdr + HDR_LEN, head_len - HDR_LEN);
        if (base == GSO_TCPV4 ? proto != ETH_P_IP
            : base == GSO_TCPV6 ? proto != ETH_P_IPV6
            : proto != ETH_P_IP && proto != ETH_P_IPV6)
            return 0;
    }
    out[0] = (uint8_t)flags;
    out[1] = (uint8_t)gso;
    out[2] = (uint8_t)hdr_len; out[3] = (uint8_t)(hdr_len >> 8);
    out[4] = (uint8_t)gso_size; out[5] = (uint8_t)(gso_size >> 8);
    out[6] = (uint8_t)cs; out[7] = (uint8_t)(cs >> 8);
    out[8] = (uint8_t)co; out[9] = (uint8_t)(co >> 8);
    out[10] = out[11] = 0; /* num_buffers */
    return 1;
}

/* core's vdm_serve_fn: 1 sent, 2 completed after a failed write (t->err), 0 declined */
int vdm_net_tx_send(void *ctx, const uint64_t *ent, uint32_t n, uint32_t nr, uint32_t *written)
{
    struct vdm_net_tx *t = ctx;
    uint8_t head[HEAD_LEN], out[HDR_LEN];
    struct iovec iov[MAX_IOV];
    uint64_t total = 0, got = 0, off;
    uint32_t k, cnt = 1;
    ssize_t rc;

    if (t->fd < 0 || t->err || n != nr || n + 1 > MAX_IOV)
        return 0;
    for (k = 0; k < n; k++)
        total += ent[2 * k + 1];
    if (total < HDR_LEN)
        return 0; /* short_header */
    for (k = 0; k < n && got < HEAD_LEN; k++) { /* one copy of the header and the frame's start */
        uint64_t c = ent[2 * k + 1] < HEAD_LEN - got ? ent[2 * k + 1] : HEAD_LEN - got;
        memcpy(head + got, (const void *)(uintptr_t)ent[2 * k], c);
        got += c;
    }
    __asm__ __volatile__("" ::: "memory");
    if (!check_tx(t, head, got, total - HDR_LEN, out))
        return 0;
    iov[0].iov_base = out;
    iov[0].iov_len = HDR_LEN;
    for (k = 0, off = HDR_LEN; k < n; k++) { /* the buffers from byte HDR_LEN on */
        uint64_t len = ent[2 * k + 1];
        if (off >= len) {
            off -= len;
            continue;
        }
        iov[cnt].iov_base = (void *)(uintptr_t)(ent[2 * k] + off);
        iov[cnt].iov_len = len - off;
        cnt++;
        off = 0;
    }
    do
        rc = writev(t->fd, iov, (int)cnt);
    while (rc < 0 && errno == EINTR);
    *written = 0;
    if (rc < 0) {
        if (errno == EAGAIN || errno == EWOULDBLOCK)
            return 0; /* pushed back: the Python path retries, and keeps the chain */
        t->err = errno ? errno : -2;
        return 2;
    }
    if ((uint64_t)rc != total) {
        t->err = -1;
        return 2;
    }
    t->bytes += total - HDR_LEN;
    return 1;
}
