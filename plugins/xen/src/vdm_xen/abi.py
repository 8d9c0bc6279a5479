"""The C interface of Xen's stable tool libraries, as cffi declarations (ABI mode: no compiler).

Everything here mirrors Xen 4.17's public headers (``xendevicemodel.h``, ``xenforeignmemory.h``,
``xenevtchn.h``, ``xengnttab.h``, ``xenstore.h``, ``xentoollog.h``, ``xen/hvm/ioreq.h``,
``xen/memory.h``). ``tests/xen/test_abi_headers.py`` compiles every function pointer and the
``ioreq_t`` layout against Debian's libxen-dev headers to prove they match.

``struct ioreq`` keeps its bitfield byte (``state:4``, ``data_is_ptr:1``, ``dir:1``, ``df:1``) as
one ``uint8_t`` named ``flags``; :func:`flags_state` and friends pick it apart.
"""

from __future__ import annotations

import platform

import cffi

from .sonames import XEN_SONAMES

__all__ = [
    "HVM_IOREQSRV_BUFIOREQ_OFF",
    "IOREQ_READ",
    "IOREQ_TYPE_COPY",
    "IOREQ_TYPE_INVALIDATE",
    "IOREQ_TYPE_PCI_CONFIG",
    "IOREQ_TYPE_PIO",
    "IOREQ_TYPE_TIMEOFFSET",
    "IOREQ_WRITE",
    "LIBRARIES",
    "STATE_IOREQ_INPROCESS",
    "STATE_IOREQ_NONE",
    "STATE_IOREQ_READY",
    "STATE_IORESP_READY",
    "XENMEM_resource_ioreq_server",
    "ffi",
    "make_flags",
]

#: ``xen_pfn_t`` is ``unsigned long`` on x86 (arch-x86/xen.h) and ``uint64_t`` on Arm (arch-arm.h).
XEN_PFN_T = "unsigned long" if platform.machine() in ("x86_64", "i386", "i686", "AMD64") else "uint64_t"

TYPES = f"""
typedef uint16_t domid_t;
typedef uint16_t ioservid_t;
typedef uint32_t evtchn_port_t;
typedef int xenevtchn_port_or_error_t;
typedef {XEN_PFN_T} xen_pfn_t;
typedef uint32_t xs_transaction_t;

typedef struct xentoollog_logger xentoollog_logger;
typedef struct xentoollog_logger_stdiostream xentoollog_logger_stdiostream;
typedef enum {{
    XTL_NONE, XTL_DEBUG, XTL_VERBOSE, XTL_DETAIL, XTL_PROGRESS, XTL_INFO, XTL_NOTICE,
    XTL_WARN, XTL_ERROR, XTL_CRITICAL, XTL_NUM_LEVELS
}} xentoollog_level;
typedef struct _IO_FILE FILE;

typedef struct xendevicemodel_handle xendevicemodel_handle;
typedef struct xenforeignmemory_handle xenforeignmemory_handle;
typedef struct xenforeignmemory_resource_handle xenforeignmemory_resource_handle;
typedef struct xenevtchn_handle xenevtchn_handle;
typedef struct xengntdev_handle xengnttab_handle;
struct xs_handle;

struct ioreq {{
    uint64_t addr;
    uint64_t data;
    uint32_t count;
    uint32_t size;
    uint32_t vp_eport;
    uint16_t _pad0;
    uint8_t flags;      /* state:4, data_is_ptr:1, dir:1, df:1, _pad1:1 */
    uint8_t type;
}};
typedef struct ioreq ioreq_t;
"""

#: soname -> the functions vdm declares from it (C declarations).
LIBRARIES: dict[str, str] = {
    "libxendevicemodel.so.1": """
xendevicemodel_handle *xendevicemodel_open(struct xentoollog_logger *logger, unsigned int open_flags);
int xendevicemodel_close(xendevicemodel_handle *dmod);
int xendevicemodel_create_ioreq_server(xendevicemodel_handle *dmod, domid_t domid,
                                       int handle_bufioreq, ioservid_t *id);
int xendevicemodel_get_ioreq_server_info(xendevicemodel_handle *dmod, domid_t domid, ioservid_t id,
                                         xen_pfn_t *ioreq_gfn, xen_pfn_t *bufioreq_gfn,
                                         evtchn_port_t *bufioreq_port);
int xendevicemodel_map_io_range_to_ioreq_server(xendevicemodel_handle *dmod, domid_t domid,
                                                ioservid_t id, int is_mmio, uint64_t start,
                                                uint64_t end);
int xendevicemodel_unmap_io_range_from_ioreq_server(xendevicemodel_handle *dmod, domid_t domid,
                                                    ioservid_t id, int is_mmio, uint64_t start,
                                                    uint64_t end);
int xendevicemodel_destroy_ioreq_server(xendevicemodel_handle *dmod, domid_t domid, ioservid_t id);
int xendevicemodel_set_ioreq_server_state(xendevicemodel_handle *dmod, domid_t domid, ioservid_t id,
                                          int enabled);
int xendevicemodel_set_isa_irq_level(xendevicemodel_handle *dmod, domid_t domid, uint8_t irq,
                                     unsigned int level);
int xendevicemodel_set_irq_level(xendevicemodel_handle *dmod, domid_t domid, unsigned int irq,
                                 unsigned int level);
int xendevicemodel_inject_msi(xendevicemodel_handle *dmod, domid_t domid, uint64_t msi_addr,
                              uint32_t msi_data);
int xendevicemodel_nr_vcpus(xendevicemodel_handle *dmod, domid_t domid, unsigned int *vcpus);
""",
    "libxenforeignmemory.so.1": """
xenforeignmemory_handle *xenforeignmemory_open(struct xentoollog_logger *logger, unsigned open_flags);
int xenforeignmemory_close(xenforeignmemory_handle *fmem);
void *xenforeignmemory_map(xenforeignmemory_handle *fmem, uint32_t dom, int prot, size_t pages,
                           const xen_pfn_t arr[], int err[]);
int xenforeignmemory_unmap(xenforeignmemory_handle *fmem, void *addr, size_t pages);
xenforeignmemory_resource_handle *xenforeignmemory_map_resource(
    xenforeignmemory_handle *fmem, domid_t domid, unsigned int type, unsigned int id,
    unsigned long frame, unsigned long nr_frames, void **paddr, int prot, int flags);
int xenforeignmemory_unmap_resource(xenforeignmemory_handle *fmem,
                                    xenforeignmemory_resource_handle *fres);
""",
    "libxenevtchn.so.1": """
xenevtchn_handle *xenevtchn_open(struct xentoollog_logger *logger, unsigned int flags);
int xenevtchn_close(xenevtchn_handle *xce);
int xenevtchn_fd(xenevtchn_handle *xce);
int xenevtchn_notify(xenevtchn_handle *xce, evtchn_port_t port);
xenevtchn_port_or_error_t xenevtchn_bind_interdomain(xenevtchn_handle *xce, uint32_t domid,
                                                     evtchn_port_t remote_port);
int xenevtchn_unbind(xenevtchn_handle *xce, evtchn_port_t port);
xenevtchn_port_or_error_t xenevtchn_pending(xenevtchn_handle *xce);
int xenevtchn_unmask(xenevtchn_handle *xce, evtchn_port_t port);
""",
    "libxengnttab.so.1": """
xengnttab_handle *xengnttab_open(struct xentoollog_logger *logger, unsigned open_flags);
int xengnttab_close(xengnttab_handle *xgt);
void *xengnttab_map_domain_grant_refs(xengnttab_handle *xgt, uint32_t count, uint32_t domid,
                                      uint32_t *refs, int prot);
int xengnttab_unmap(xengnttab_handle *xgt, void *start_address, uint32_t count);
""",
    "libxenstore.so.4": """
struct xs_handle *xs_open(unsigned long flags);
void xs_close(struct xs_handle *xsh);
char **xs_directory(struct xs_handle *h, xs_transaction_t t, const char *path, unsigned int *num);
void *xs_read(struct xs_handle *h, xs_transaction_t t, const char *path, unsigned int *len);
_Bool xs_write(struct xs_handle *h, xs_transaction_t t, const char *path, const void *data,
               unsigned int len);
_Bool xs_rm(struct xs_handle *h, xs_transaction_t t, const char *path);
_Bool xs_watch(struct xs_handle *h, const char *path, const char *token);
_Bool xs_unwatch(struct xs_handle *h, const char *path, const char *token);
int xs_fileno(struct xs_handle *h);
char **xs_check_watch(struct xs_handle *h);
""",
    "libxentoollog.so.1": """
xentoollog_logger_stdiostream *xtl_createlogger_stdiostream(FILE *f, xentoollog_level min_level,
                                                            unsigned flags);
void xtl_logger_destroy(struct xentoollog_logger *logger);
""",
    # malloc'ed results of xs_read/xs_directory/xs_check_watch are released with libc's free
    "libc.so.6": """
void free(void *ptr);
FILE *fdopen(int fd, const char *mode);
""",
}

assert tuple(s for s in LIBRARIES if s.startswith("libxen")) == XEN_SONAMES

ffi = cffi.FFI()
ffi.cdef(TYPES)
for _decls in LIBRARIES.values():
    ffi.cdef(_decls)

# ---- constants (xen/hvm/ioreq.h, xen/hvm/dm_op.h, xen/memory.h, xen/io/xenbus.h) ------------------

IOREQ_READ = 1
IOREQ_WRITE = 0

STATE_IOREQ_NONE = 0
STATE_IOREQ_READY = 1
STATE_IOREQ_INPROCESS = 2
STATE_IORESP_READY = 3

IOREQ_TYPE_PIO = 0
IOREQ_TYPE_COPY = 1
IOREQ_TYPE_PCI_CONFIG = 2
IOREQ_TYPE_TIMEOFFSET = 7
IOREQ_TYPE_INVALIDATE = 8

HVM_IOREQSRV_BUFIOREQ_OFF = 0
XENMEM_resource_ioreq_server = 0
XENMEM_resource_ioreq_server_frame_bufioreq = 0


def XENMEM_resource_ioreq_server_frame_ioreq(n: int) -> int:
    return 1 + n


IOREQ_SIZE = 32
#: offset of the state/data_is_ptr/dir/df byte inside struct ioreq
IOREQ_FLAGS_OFFSET = 30
PAGE_SIZE = 4096
#: one shared page holds this many vCPU slots
MAX_VCPUS = PAGE_SIZE // IOREQ_SIZE

XS_WATCH_PATH = 0
XS_WATCH_TOKEN = 1
XBT_NULL = 0

XENBUS_STATE_UNKNOWN = 0
XENBUS_STATE_INITIALISING = 1
XENBUS_STATE_INITWAIT = 2
XENBUS_STATE_CONNECTED = 4
XENBUS_STATE_CLOSING = 5
XENBUS_STATE_CLOSED = 6

#: a guest's grant "DMA address": bit 63 set, the grant reference in the page frame number bits
GRANT_ADDR_BIT = 1 << 63


def flags_state(flags: int) -> int:
    return flags & 0xF


def flags_data_is_ptr(flags: int) -> int:
    return (flags >> 4) & 1


def flags_dir(flags: int) -> int:
    return (flags >> 5) & 1


def flags_df(flags: int) -> int:
    return (flags >> 6) & 1


def make_flags(state: int, data_is_ptr: int = 0, dir: int = 0, df: int = 0) -> int:
    """The bitfield byte for these field values, as GCC lays out ``state:4 ... df:1`` (LSB first)."""
    return (state & 0xF) | (data_is_ptr & 1) << 4 | (dir & 1) << 5 | (df & 1) << 6


def with_state(flags: int, state: int) -> int:
    return (flags & ~0xF) | (state & 0xF)
