"""librbd and librados (Debian's ``librbd1``) bound with cffi in ABI mode, found at run time.

Nothing is compiled: :func:`load` dlopens ``librados.so.2`` and ``librbd.so.1`` (or the files
named by the environment variables ``VDM_LIBRADOS`` / ``VDM_LIBRBD``) and declares the few calls
vdm uses: connecting to a cluster, opening an image, and the asynchronous I/O calls, whose
completions a waiting request can give up on (librbd's synchronous calls cannot be abandoned).

:func:`probe` answers "can the rbd protocol work here?" cheaply with ctypes (cffi's parsing is
not paid by every ``vdm list-plugins``): None, or ``librbd not found (apt install librbd1)``.
"""

from __future__ import annotations

import ctypes
import os
import threading
from typing import Any

__all__ = ["LIBRADOS_ENV", "LIBRBD_ENV", "NOT_FOUND", "load", "probe"]

RADOS_SONAME = "librados.so.2"
RBD_SONAME = "librbd.so.1"
#: paths to use instead of the sonames (tests point them at a missing file)
LIBRADOS_ENV = "VDM_LIBRADOS"
LIBRBD_ENV = "VDM_LIBRBD"
NOT_FOUND = "librbd not found (apt install librbd1)"

CDEF = """
typedef void *rados_t;
typedef void *rados_ioctx_t;
typedef void *rbd_image_t;
typedef void *rbd_completion_t;
typedef void (*rbd_callback_t)(rbd_completion_t cb, void *arg);

int rados_create(rados_t *cluster, const char *const id);
int rados_conf_read_file(rados_t cluster, const char *path);
int rados_conf_set(rados_t cluster, const char *option, const char *value);
int rados_connect(rados_t cluster);
void rados_shutdown(rados_t cluster);
int rados_ioctx_create(rados_t cluster, const char *pool_name, rados_ioctx_t *ioctx);
void rados_ioctx_destroy(rados_ioctx_t io);
void rados_ioctx_set_namespace(rados_ioctx_t io, const char *nspace);

int rbd_open(rados_ioctx_t io, const char *name, rbd_image_t *image, const char *snap_name);
int rbd_open_read_only(rados_ioctx_t io, const char *name, rbd_image_t *image, const char *snap_name);
int rbd_close(rbd_image_t image);
int rbd_get_size(rbd_image_t image, uint64_t *size);
int rbd_resize(rbd_image_t image, uint64_t size);
int rbd_aio_create_completion(void *cb_arg, rbd_callback_t complete_cb, rbd_completion_t *c);
int rbd_aio_read(rbd_image_t image, uint64_t off, size_t len, char *buf, rbd_completion_t c);
int rbd_aio_write(rbd_image_t image, uint64_t off, size_t len, const char *buf, rbd_completion_t c);
int rbd_aio_discard(rbd_image_t image, uint64_t off, uint64_t len, rbd_completion_t c);
int rbd_aio_write_zeroes(rbd_image_t image, uint64_t off, size_t len, rbd_completion_t c,
                         int zero_flags, int op_flags);
int rbd_aio_flush(rbd_image_t image, rbd_completion_t c);
ssize_t rbd_aio_get_return_value(rbd_completion_t c);
void rbd_aio_release(rbd_completion_t c);
"""

#: rbd_aio_write_zeroes: keep the range allocated (no unmap)
WRITE_ZEROES_FLAG_THICK_PROVISION = 1

_lock = threading.Lock()
_loaded: tuple[Any, Any, Any] | None = None


def _paths() -> tuple[str, str]:
    return os.environ.get(LIBRADOS_ENV) or RADOS_SONAME, os.environ.get(LIBRBD_ENV) or RBD_SONAME


def probe() -> str | None:
    """None when librados and librbd load, else :data:`NOT_FOUND`."""
    try:
        for p in _paths():
            ctypes.CDLL(p)
    except OSError:
        return NOT_FOUND
    return None


def load() -> tuple[Any, Any, Any]:
    """``(ffi, librados, librbd)``, loaded once; OSError when they cannot be loaded."""
    global _loaded
    with _lock:
        if _loaded is None:
            import cffi

            ffi = cffi.FFI()
            ffi.cdef(CDEF)
            rados_path, rbd_path = _paths()
            try:
                rados = ffi.dlopen(rados_path)
                rbd = ffi.dlopen(rbd_path)
            except OSError as e:
                raise OSError(f"{NOT_FOUND}: {e}") from None
            _loaded = (ffi, rados, rbd)
        return _loaded
