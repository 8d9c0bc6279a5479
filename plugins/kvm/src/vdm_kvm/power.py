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

__all__ = ["KeyboardControllerReset", "PowerControl"]

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


class KeyboardControllerReset:
    """Port 0x64 of an i8042 keyboard controller, just enough for Linux's ``reboot=k``.

    Linux reboots through the keyboard controller by waiting for its input buffer to be empty
    (status bit 1 clear) and writing 0xfe (pulse the reset line). Without a handler an unclaimed
    read returns 0xff, and ``kb_wait`` polls 65,536 times per attempt -- each poll an exit. The
    status register here always reads 0x01: input buffer empty (so ``kb_wait`` returns at once),
    output buffer "full" -- the i8042 driver (which probes when told ``i8042.nopnp``) then drains
    16 bytes of 0xff from port 0x60 and reports "No controller found" instead of waiting ~10,000
    polls for a reply to its first command. 0xfe resets; other commands are ignored.
    """

    STATUS = 0x01  # OBF set, IBF clear

    RESET_COMMAND = 0xFE

    def __init__(self, on_event: Callable[[str], None]) -> None:
        self.on_event = on_event

    def read(self, offset: int, size: int) -> int:
        return self.STATUS

    def write(self, offset: int, size: int, value: int) -> None:
        if value & 0xFF == self.RESET_COMMAND:
            self.on_event("reset")
