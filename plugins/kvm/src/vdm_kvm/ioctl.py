"""The ioctl call on /dev/kvm, a VM or a vCPU fd, and the error it raises."""

from __future__ import annotations

import os
from typing import Any

from . import kvm_abi as abi
from .kvm_abi import C, ffi

__all__ = ["KvmError", "fixed_errno", "kvm_ioctl"]


class KvmError(OSError):
    """An ioctl on /dev/kvm, a VM or a vCPU failed."""


def kvm_ioctl(fd: int, request: int, arg: Any = 0, what: str = "") -> int:
    """``ioctl(fd, request, arg)``; raises :class:`KvmError` naming ``what`` (or the request) on failure."""
    if isinstance(arg, int):
        arg = ffi.cast("unsigned long", arg)
    r = C.ioctl(fd, request, arg)
    if r < 0:
        e = ffi.errno
        raise KvmError(e, f"{what or hex(request)}: {os.strerror(e)}")
    return r


def fixed_errno() -> int:
    """errno after a failed call through :data:`~vdm_kvm.kvm_abi.C_FIXED` (the KVM_RUN hot path)."""
    return abi.FFI_FIXED.errno

