"""The ioctl call on /dev/kvm, a VM or a vCPU fd, and the error it raises."""

from __future__ import annotations

import os
from typing import Any

from . import kvm_abi as abi
from .kvm_abi import C, ffi


class KvmError(OSError):
    """An ioctl on /dev/kvm, a VM or a vCPU failed."""


def _ioctl(fd: int, request: int, arg: Any = 0, what: str = "") -> int:
    if isinstance(arg, int):
        arg = ffi.cast("unsigned long", arg)
    r = C.ioctl(fd, request, arg)
    if r < 0:
        e = ffi.errno
        raise KvmError(e, f"{what or hex(request)}: {os.strerror(e)}")
    return r


def _ffi_errno() -> int:
    return abi._ffi_fixed.errno

