"""libnbd (Debian's ``libnbd0``) bound with cffi in ABI mode, found at run time.

Nothing is compiled: :func:`load` dlopens ``libnbd.so.0`` (or the file named by the environment
variable ``VDM_LIBNBD``) and declares the few calls vdm uses: the asynchronous ones, so that a
request waits for its reply with a bounded ``nbd_poll`` and can give up on a server that stopped
answering (libnbd's synchronous calls poll without a timeout while holding the handle's lock).

:func:`probe` answers "can the nbd protocol work here?" cheaply with ctypes (cffi's parsing is
not paid by every ``vdm list-plugins``): None, or ``libnbd not found (apt install libnbd0)``.
"""

from __future__ import annotations

import ctypes
import os
import threading
from typing import Any

__all__ = ["LIBNBD_ENV", "NOT_FOUND", "SONAME", "load", "probe"]

SONAME = "libnbd.so.0"
#: a path to use instead of the soname (tests point it at a missing file)
LIBNBD_ENV = "VDM_LIBNBD"
NOT_FOUND = "libnbd not found (apt install libnbd0)"

CDEF = """
struct nbd_handle;
typedef struct {
    int (*callback) (void *user_data, int *error);
    void *user_data;
    void (*free) (void *user_data);
} nbd_completion_callback;

struct nbd_handle *nbd_create (void);
void nbd_close (struct nbd_handle *h);
const char *nbd_get_error (void);
int nbd_get_errno (void);
int nbd_supports_uri (struct nbd_handle *h);
int nbd_aio_connect_uri (struct nbd_handle *h, const char *uri);
int nbd_aio_is_connecting (struct nbd_handle *h);
int nbd_aio_is_ready (struct nbd_handle *h);
int nbd_aio_is_dead (struct nbd_handle *h);
int nbd_aio_is_closed (struct nbd_handle *h);
int nbd_poll (struct nbd_handle *h, int timeout);
int64_t nbd_get_size (struct nbd_handle *h);
int64_t nbd_get_block_size (struct nbd_handle *h, int size_type);
int nbd_is_read_only (struct nbd_handle *h);
int nbd_can_flush (struct nbd_handle *h);
int nbd_can_fua (struct nbd_handle *h);
int nbd_can_trim (struct nbd_handle *h);
int nbd_can_zero (struct nbd_handle *h);
int nbd_can_multi_conn (struct nbd_handle *h);
int64_t nbd_aio_pread (struct nbd_handle *h, void *buf, size_t count, uint64_t offset,
                       nbd_completion_callback completion_callback, uint32_t flags);
int64_t nbd_aio_pwrite (struct nbd_handle *h, const void *buf, size_t count, uint64_t offset,
                        nbd_completion_callback completion_callback, uint32_t flags);
int64_t nbd_aio_flush (struct nbd_handle *h, nbd_completion_callback completion_callback,
                       uint32_t flags);
int64_t nbd_aio_trim (struct nbd_handle *h, uint64_t count, uint64_t offset,
                      nbd_completion_callback completion_callback, uint32_t flags);
int64_t nbd_aio_zero (struct nbd_handle *h, uint64_t count, uint64_t offset,
                      nbd_completion_callback completion_callback, uint32_t flags);
int nbd_aio_command_completed (struct nbd_handle *h, uint64_t cookie);
int64_t nbd_aio_peek_command_completed (struct nbd_handle *h);
int nbd_aio_get_fd (struct nbd_handle *h);
unsigned nbd_aio_get_direction (struct nbd_handle *h);
int nbd_aio_notify_read (struct nbd_handle *h);
int nbd_aio_notify_write (struct nbd_handle *h);
"""

SIZE_MINIMUM = 0
SIZE_PREFERRED = 1
SIZE_MAXIMUM = 2
CMD_FLAG_FUA = 1 << 0
CMD_FLAG_NO_HOLE = 1 << 1

_lock = threading.Lock()
_loaded: tuple[Any, Any] | None = None


def _path() -> str:
    return os.environ.get(LIBNBD_ENV) or SONAME


def probe() -> str | None:
    """None when libnbd loads, else :data:`NOT_FOUND`."""
    try:
        ctypes.CDLL(_path())
    except OSError:
        return NOT_FOUND
    return None


def load() -> tuple[Any, Any]:
    """``(ffi, lib)`` of libnbd, loaded once; OSError when it cannot be loaded."""
    global _loaded
    with _lock:
        if _loaded is None:
            import cffi

            ffi = cffi.FFI()
            ffi.cdef(CDEF)
            try:
                lib = ffi.dlopen(_path())
            except OSError as e:
                raise OSError(f"{NOT_FOUND}: {e}") from None
            _loaded = (ffi, lib)
        return _loaded
