"""Is a Xen IOREQ server possible here? Cheap, silent, and exact about why not.

:func:`probe` returns None when ``vdm dm-only`` can work, else one line (``vdm list-plugins`` puts
"unavailable: " in front of it):

* ``Xen libraries not installed (libxendevicemodel.so.1, ...)`` -- the sonames that do not load;
* ``Xen libraries found, but no Xen hypervisor (/dev/xen/privcmd missing)``;
* ``not privileged`` -- privcmd exists but cannot be opened (not root in dom0);
* ``Xen built without IOREQ server support`` -- the dm_op hypercall answers ENOSYS (Xen's
  ``CONFIG_IOREQ_SERVER`` is off: the default on Arm).

It dlopens the libraries (a few milliseconds), opens a devicemodel handle with a logger that keeps
the libraries quiet, and asks for the vCPU count of a domain that cannot exist: with IOREQ support
Xen answers ESRCH, without it ENOSYS.
"""

from __future__ import annotations

import errno
from typing import Any

from .bindings import XenLib, XenLibraryError, load

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


def probe_lib(lib: Any) -> str | None:
    """The probe's hypervisor part, against a loaded library namespace (real or simulated)."""
    ffi = lib.ffi
    dmod = lib.xendevicemodel_open(lib.quiet_logger, 0)
    if dmod == ffi.NULL:
        err = lib.errno
        if err in (errno.ENOENT, errno.ENODEV, errno.ENXIO):
            return NO_HYPERVISOR
        if err in (errno.EACCES, errno.EPERM):
            return NOT_PRIVILEGED
        return f"cannot open the Xen devicemodel interface: {errno.errorcode.get(err, err)}"
    try:
        n = ffi.new("unsigned int *")
        if lib.xendevicemodel_nr_vcpus(dmod, DOMID_INVALID, n) == -1:
            err = lib.errno
            if err == errno.ENOSYS:
                return NO_IOREQ
            if err == errno.EACCES:
                return NOT_PRIVILEGED
        return None  # ESRCH (no such domain) or EPERM (XSM): the dm_op hypercall exists
    finally:
        lib.xendevicemodel_close(dmod)


def probe(libdir: str | None = None) -> str | None:
    """None when ``vdm dm-only`` can run here, else why not (one line, never printed)."""
    try:
        lib: XenLib = load(libdir)
    except XenLibraryError as e:
        return NOT_INSTALLED.format(", ".join(e.missing))
    return probe_lib(lib)
