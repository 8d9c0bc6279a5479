"""Deprecated (plugin API 1): use :mod:`vdm.interrupts` and :mod:`vdm.iorange`.

API 2 split this module by what it holds: :class:`~vdm.iorange.IoHandler` lives in
:mod:`vdm.iorange`; :class:`~vdm.interrupts.IrqLine`, its implementations and
:class:`~vdm.interrupts.MsiSink` in :mod:`vdm.interrupts`. Importing this module still works and
warns once.
"""

from __future__ import annotations

import warnings

from .interrupts import CallbackIrqLine, EventfdIrqLine, IrqLine, MsiSink, RecordingIrqLine
from .iorange import IoHandler

__all__ = ["CallbackIrqLine", "EventfdIrqLine", "IoHandler", "IrqLine", "MsiSink", "RecordingIrqLine"]

warnings.warn(
    "vdm.hypervisor is deprecated (plugin API 2): import IoHandler from vdm.iorange and "
    "IrqLine, CallbackIrqLine, EventfdIrqLine, RecordingIrqLine, MsiSink from vdm.interrupts",
    DeprecationWarning,
    stacklevel=2,
)
