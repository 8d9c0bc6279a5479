"""Is a Xen IOREQ server possible here? Cheap, silent, and exact about why not.

:func:`probe` returns None when ``vdm dm-only`` can work, else one line (``vdm list-plugins`` puts
"unavailable: " in front of it):

* ``Xen libraries not installed (libxendevicemodel.so.1, ...)`` -- the sonames that do not load;
* ``Xen libraries found, but no Xen hypervisor (/dev/xen/privcmd missing)``;
* ``not privileged`` -- privcmd exists but cannot be opened (not root in dom0);
* ``Xen built without IOREQ server support`` -- the dm_op hypercall answers ENOSYS (Xen's
  ``CONFIG_IOREQ_SERVER`` is off: the default on Arm).

It dlopens the libraries, opens a devicemodel handle with a logger that keeps the libraries quiet,
and asks for the vCPU count of a domain that cannot exist: with IOREQ support Xen answers ESRCH,
without it ENOSYS. It uses ctypes, not cffi: parsing the cffi declarations costs a quarter of a
second, too much for every ``vdm list-plugins``; :func:`probe_lib` is the same decision over a
cffi-style library namespace (the real bindings or the simulator).
"""

from __future__ import annotations

import ctypes
import errno
import os
from typing import Any, Callable

from .sonames import XEN_SONAMES

__all__ = [
    "NOT_INSTALLED",
    "NOT_PRIVILEGED",
    "NO_HYPERVISOR",
    "NO_IOREQ",
    "probe",
    "probe_lib",
]

NOT_INSTALLED = "Xen libraries not installed ({})"
NO_HYPERVISOR = "Xen libraries found, but no Xen hypervisor (/dev/xen/privcmd missing)"
NOT_PRIVILEGED = "not privileged"
NO_IOREQ = "Xen built without IOREQ server support"

#: DOMID_INVALID (xen.h): never a real domain
DOMID_INVALID = 0x7FF4
XTL_CRITICAL = 9
LIBDIR_ENV = "VDM_XEN_LIBDIR"  # the same variable as vdm_xen.bindings.LIBDIR_ENV


def _decide(
    open_dm: Callable[[], tuple[Any, int]],
    nr_vcpus: Callable[[Any], tuple[int, int]],
    close: Callable[[Any], Any],
) -> str | None:
    handle, err = open_dm()
    if handle is None:
        if err in (errno.ENOENT, errno.ENODEV, errno.ENXIO):
            return NO_HYPERVISOR
        if err in (errno.EACCES, errno.EPERM):
            return NOT_PRIVILEGED
        return f"cannot open the Xen devicemodel interface: {errno.errorcode.get(err, err)}"
    try:
        rc, err = nr_vcpus(handle)
        if rc == -1:
            if err == errno.ENOSYS:
                return NO_IOREQ
            if err == errno.EACCES:
                return NOT_PRIVILEGED
        return None  # ESRCH (no such domain) or EPERM (XSM): the dm_op hypercall exists
    finally:
        close(handle)


def probe_lib(lib: Any) -> str | None:
    """The probe's hypervisor part over a library namespace (:class:`~vdm_xen.bindings.XenLib` or
    :class:`~vdm_xen.sim.SimLib`)."""
    ffi = lib.ffi

    def open_dm() -> tuple[Any, int]:
        h = lib.xendevicemodel_open(lib.quiet_logger, 0)
        return (None, lib.errno) if h == ffi.NULL else (h, 0)

    def nr_vcpus(h: Any) -> tuple[int, int]:
        rc = lib.xendevicemodel_nr_vcpus(h, DOMID_INVALID, ffi.new("unsigned int *"))
        return rc, lib.errno if rc == -1 else 0

    return _decide(open_dm, nr_vcpus, lib.xendevicemodel_close)


_quiet: dict[str, int] = {}


def _quiet_logger(tl: ctypes.CDLL) -> int | None:
    """A xentoollog logger writing only CRITICAL messages to (a copy of) stderr; made once."""
    if "logger" not in _quiet:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.fdopen.restype = ctypes.c_void_p
        libc.fdopen.argtypes = [ctypes.c_int, ctypes.c_char_p]
        tl.xtl_createlogger_stdiostream.restype = ctypes.c_void_p
        tl.xtl_createlogger_stdiostream.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_uint]
        fd = os.dup(2)
        stream = libc.fdopen(fd, b"w")
        if not stream:
            os.close(fd)
            return None
        _quiet["logger"] = tl.xtl_createlogger_stdiostream(stream, XTL_CRITICAL, 0) or 0
    return _quiet["logger"] or None


def probe(libdir: str | None = None) -> str | None:
    """None when ``vdm dm-only`` can run here, else why not (one line, never printed).

    ``libdir`` (or ``$VDM_XEN_LIBDIR``): look for the libraries only in that directory.
    """
    libdir = libdir if libdir is not None else (os.environ.get(LIBDIR_ENV) or None)
    libs: dict[str, ctypes.CDLL] = {}
    missing = []
    for soname in XEN_SONAMES:
        try:
            libs[soname] = ctypes.CDLL(os.path.join(libdir, soname) if libdir else soname, use_errno=True)
        except OSError:
            missing.append(soname)
    if missing:
        return NOT_INSTALLED.format(", ".join(missing))
    dm = libs["libxendevicemodel.so.1"]
    dm.xendevicemodel_open.restype = ctypes.c_void_p
    dm.xendevicemodel_open.argtypes = [ctypes.c_void_p, ctypes.c_uint]
    dm.xendevicemodel_nr_vcpus.restype = ctypes.c_int
    dm.xendevicemodel_nr_vcpus.argtypes = [ctypes.c_void_p, ctypes.c_uint16, ctypes.POINTER(ctypes.c_uint)]
    dm.xendevicemodel_close.restype = ctypes.c_int
    dm.xendevicemodel_close.argtypes = [ctypes.c_void_p]
    logger = _quiet_logger(libs["libxentoollog.so.1"])

    def open_dm() -> tuple[Any, int]:
        ctypes.set_errno(0)
        h = dm.xendevicemodel_open(logger, 0)
        return (h, 0) if h else (None, ctypes.get_errno())

    def nr_vcpus(h: Any) -> tuple[int, int]:
        n = ctypes.c_uint()
        rc = dm.xendevicemodel_nr_vcpus(h, DOMID_INVALID, ctypes.byref(n))
        return rc, ctypes.get_errno() if rc == -1 else 0

    return _decide(open_dm, nr_vcpus, dm.xendevicemodel_close)
