"""The runtime sonames of Xen's stable tool libraries vdm-xen uses (Debian: libxen*1, libxenstore4).

Kept apart from :mod:`vdm_xen.abi` so that the probe can name them without parsing C declarations.
"""

from __future__ import annotations

__all__ = ["XEN_SONAMES"]

XEN_SONAMES = (
    "libxendevicemodel.so.1",
    "libxenforeignmemory.so.1",
    "libxenevtchn.so.1",
    "libxengnttab.so.1",
    "libxenstore.so.4",
    "libxentoollog.so.1",
)
