"""The guest's power button: the ACPI sleep control and reset registers (hardware-reduced ACPI).

Linux powers off by writing ``SLP_EN | (SLP_TYP << 2)`` to the FADT's ``SLEEP_CONTROL_REG``, with
SLP_TYP from ``\\_S5`` (5 in our DSDT); it reboots by writing ``RESET_VALUE`` to ``RESET_REG``.
Both registers are one-byte I/O ports handled here; reads of the sleep status register return 0
(WAK_STS clear).
"""

from __future__ import annotations

import logging
from typing import Callable

from .acpi.tables import S5_SLP_TYP, SLP_EN

__all__ = ["PowerControl"]

log = logging.getLogger(__name__)


class PowerControl:
    """An I/O handler for ``[sleep_port, reset_port]``; calls ``on_event("poweroff" | "reset")``."""

    def __init__(self, on_event: Callable[[str], None], reset_value: int = 1, reset_offset: int = 1) -> None:
        self.on_event = on_event
        self.reset_value = reset_value
        self.reset_offset = reset_offset

    def read(self, offset: int, size: int) -> int:
        return 0

    def write(self, offset: int, size: int, value: int) -> None:
        value &= 0xFF
        if offset == 0:
            if value & SLP_EN:
                slp_typ = (value >> 2) & 7
                if slp_typ == S5_SLP_TYP:
                    self.on_event("poweroff")
                else:
                    log.info("guest asked for sleep type %d, which vdm does not implement", slp_typ)
        elif offset == self.reset_offset and value == self.reset_value:
            self.on_event("reset")
