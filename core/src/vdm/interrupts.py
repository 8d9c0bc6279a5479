"""Interrupts as devices and transports raise them, whatever the hypervisor.

A hypervisor plugin hands these out at setup (through the :class:`~vdm.hookspecs.VmmSpec` hooks);
transports then use them directly on hot paths, with no plugin dispatch per interrupt:

* :class:`IrqLine` -- a wired interrupt line (level or edge); :class:`CallbackIrqLine`,
  :class:`EventfdIrqLine` (KVM irqfd, a vhost-user call fd) and :class:`RecordingIrqLine` (tests);
* :class:`MsiSink` -- an MSI doorbell (virtio-pci MSI-X).
"""

from __future__ import annotations

import logging
import threading
from typing import Callable, Protocol

from .eventfd import eventfd_write

__all__ = ["CallbackIrqLine", "EventfdIrqLine", "IrqLine", "MsiSink", "RecordingIrqLine"]

log = logging.getLogger(__name__)


class IrqLine:
    """An interrupt line. ``set_level`` for level-triggered use, ``trigger`` for an edge."""

    def set_level(self, level: bool) -> None:
        raise NotImplementedError

    def trigger(self) -> None:
        self.set_level(True)
        self.set_level(False)


class CallbackIrqLine(IrqLine):
    """An interrupt line implemented by a function ``set_level(level)``."""

    def __init__(self, set_level: Callable[[bool], None]) -> None:
        self._set = set_level

    def set_level(self, level: bool) -> None:
        self._set(level)


class EventfdIrqLine(IrqLine):
    """An edge-signalled line backed by an eventfd (KVM irqfd, vhost-user call fd).

    A rising level writes the eventfd; a falling level does nothing (the consumer resamples).
    """

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self._level = False

    def set_level(self, level: bool) -> None:
        if level and not self._level:
            self.trigger()
        self._level = level

    def trigger(self) -> None:
        try:
            eventfd_write(self.fd, 1)
        except OSError as e:  # a frontend that closed its call fd must not kill the device
            log.warning("cannot signal interrupt eventfd %d: %s", self.fd, e)


class RecordingIrqLine(IrqLine):
    """A line that records its level and counts rising edges (for tests and simulators)."""

    def __init__(self) -> None:
        self.level = False
        self.edges = 0
        self.cond = threading.Condition()

    def set_level(self, level: bool) -> None:
        with self.cond:
            if level and not self.level:
                self.edges += 1
            self.level = bool(level)
            self.cond.notify_all()

    def trigger(self) -> None:
        with self.cond:
            self.edges += 1
            self.cond.notify_all()


class MsiSink(Protocol):
    """Delivers a message-signalled interrupt (address/data pair as the guest programmed it)."""

    def send_msi(self, address: int, data: int) -> None: ...
