"""Loading Xen's stable tool libraries by soname, with cffi in ABI mode.

:func:`load` returns a :class:`XenLib`: one namespace holding every declared function of
libxendevicemodel, libxenforeignmemory, libxenevtchn, libxengnttab, libxenstore, libxentoollog
(and libc's ``free``/``fdopen``), plus the shared :data:`vdm_xen.abi.ffi`. Everything above this
module talks to that namespace only -- which is why a simulated Xen (:mod:`vdm_xen.sim`) can stand
in for it.

Where the libraries are looked for: the normal dynamic-linker search, or only the directory named
by ``libdir`` / the ``VDM_XEN_LIBDIR`` environment variable (how tests hide them).
"""

from __future__ import annotations

import errno as _errno
import os
import re
import threading
from typing import Any

from .abi import LIBRARIES, XEN_SONAMES, ffi

__all__ = ["LIBDIR_ENV", "XenLib", "XenLibraryError", "declared_functions", "load", "missing_libraries"]

#: environment variable: load the Xen libraries only from this directory
LIBDIR_ENV = "VDM_XEN_LIBDIR"


class XenLibraryError(OSError):
    """One or more Xen libraries cannot be loaded."""

    def __init__(self, missing: list[str], details: dict[str, str]) -> None:
        super().__init__(f"Xen libraries not installed ({', '.join(missing)})")
        self.missing = missing
        self.details = details


def declared_functions(soname: str) -> list[str]:
    """The names of the functions vdm declares from library ``soname``."""
    names = []
    for decl in LIBRARIES[soname].split(";"):
        flat = " ".join(decl.split())
        if "(" in flat:
            head = flat.split("(")[0]
            names.append(re.split(r"[\s*]+", head.strip())[-1])
    return names


def _path(soname: str, libdir: str | None) -> str:
    if soname.startswith("libc."):
        return soname  # libc is always the process's own
    return os.path.join(libdir, soname) if libdir else soname


def _libdir(libdir: str | None) -> str | None:
    return libdir if libdir is not None else (os.environ.get(LIBDIR_ENV) or None)


def missing_libraries(libdir: str | None = None) -> tuple[list[str], dict[str, Any], dict[str, str]]:
    """dlopen every library; returns (missing sonames, loaded libs by soname, error texts)."""
    libdir = _libdir(libdir)
    loaded: dict[str, Any] = {}
    missing: list[str] = []
    details: dict[str, str] = {}
    for soname in LIBRARIES:
        try:
            loaded[soname] = ffi.dlopen(_path(soname, libdir))
        except OSError as e:
            missing.append(soname)
            details[soname] = str(e)
    return missing, loaded, details


class XenLib:
    """Every declared function of the Xen libraries in one namespace, plus ``ffi``.

    Attributes are the C functions themselves (``lib.xendevicemodel_open(...)``). ``errno`` is the
    C errno of the calling thread after a failed call; ``quiet_logger`` is a xentoollog logger that
    only lets CRITICAL messages through (pass it to the ``*_open`` calls so the libraries do not
    print their own error lines on stderr).
    """

    def __init__(self, libs: dict[str, Any]) -> None:
        self.ffi = ffi
        self._libs = libs  # keep the dlopen handles alive
        for soname, lib in libs.items():
            for name in declared_functions(soname):
                setattr(self, name, getattr(lib, name))
        self._logger: Any = None
        self._lock = threading.Lock()

    @property
    def errno(self) -> int:
        return ffi.errno

    @property
    def quiet_logger(self) -> Any:
        with self._lock:
            if self._logger is None:
                fd = os.dup(2)
                stream = self.fdopen(fd, b"w")
                if stream == ffi.NULL:
                    os.close(fd)
                    return ffi.NULL
                logger = self.xtl_createlogger_stdiostream(stream, self.XTL_CRITICAL, 0)
                self._logger = ffi.cast("struct xentoollog_logger *", logger)
            return self._logger

    XTL_CRITICAL = 9


_loaded: dict[str | None, XenLib] = {}
_load_lock = threading.Lock()


def load(libdir: str | None = None) -> XenLib:
    """Load the real libraries (once per directory); raise :class:`XenLibraryError` naming every
    missing one."""
    libdir = _libdir(libdir)
    with _load_lock:
        if libdir in _loaded:
            return _loaded[libdir]
        missing, loaded, details = missing_libraries(libdir)
        xen_missing = [s for s in missing if s in XEN_SONAMES]
        if missing:
            raise XenLibraryError(xen_missing or missing, details)
        lib = _loaded[libdir] = XenLib(loaded)
        return lib


def check_errno(what: str, result: int, lib: Any) -> int:
    """Raise OSError(errno) if a Xen int call failed (returned -1)."""
    if result == -1 or result is False:
        err = lib.errno or _errno.EIO
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return result
