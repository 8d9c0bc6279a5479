"""The backend channel of a vhost-user handler: configuration changes sent to the frontend.

The backend channel (PROTOCOL_F_BACKEND_REQ: a socket the frontend hands over with
SET_BACKEND_REQ_FD, kept until the connection ends) carries the device's configuration changes
(:meth:`~vdm.device.VirtioDevice.signal_config`, e.g. ``vdm ctl resize``) as
CONFIG_CHANGE_MSG when CONFIG is negotiated; the frontend then reads the new configuration
with GET_CONFIG and interrupts the driver. A send that fails is one log line; the connection
stays. Sends are serialized by ``_backend_lock``; the channel is replaced (and the old one
closed) under it.

:class:`BackendChannel` is a mixin of :class:`~.handler.VhostUserHandler`, which owns the state
declared below.
"""

from __future__ import annotations

import logging
import os
import socket
import stat
import threading

from vdm.device import VirtioDevice

from . import protocol as p
from .protocol import Message, ProtocolError, ProtocolFeature
from .rings import close_fd

__all__ = ["BackendChannel"]

log = logging.getLogger("vdm_vhost_user.handler")  # (the handler's log, as before the split)


class BackendChannel:
    """SET_BACKEND_REQ_FD and the configuration changes sent on that channel (module doc)."""

    device: VirtioDevice
    protocol_features: int
    backend_channel: socket.socket | None
    _backend_lock: threading.Lock

    def _set_backend_req_fd(self, msg: Message) -> None:
        if not self.protocol_features & (1 << ProtocolFeature.BACKEND_REQ):
            raise ProtocolError("SET_BACKEND_REQ_FD without BACKEND_REQ negotiated")
        fd = msg.take_fd()
        assert fd is not None  # the layout asks for exactly one
        if not stat.S_ISSOCK(os.fstat(fd).st_mode):
            close_fd(fd)
            raise ProtocolError("SET_BACKEND_REQ_FD: the descriptor is not a socket")
        chan = socket.socket(fileno=fd)
        chan.settimeout(5)  # a frontend that stops reading costs a config change, not the process
        self._set_backend_channel(chan)

    def _config_changed(self) -> None:
        if not self.protocol_features & (1 << ProtocolFeature.CONFIG):
            log.warning(
                "vhost-user: %s: configuration changed, but the frontend did not negotiate "
                "CONFIG: the guest sees it after a reset",
                self.device.name,
            )
            return
        with self._backend_lock:
            chan = self.backend_channel
            if chan is None:
                log.warning(
                    "vhost-user: %s: configuration changed, but the frontend gave no backend "
                    "channel (BACKEND_REQ): the guest sees it after a reset",
                    self.device.name,
                )
                return
            try:
                p.send_backend_request(chan, p.BackendReq.CONFIG_CHANGE_MSG)
            except OSError as e:
                log.warning("vhost-user: %s: cannot send CONFIG_CHANGE_MSG: %s", self.device.name, e)
                return
        log.info("vhost-user: %s: configuration change sent to the frontend", self.device.name)

    def _set_backend_channel(self, chan: socket.socket | None) -> None:
        with self._backend_lock:
            old, self.backend_channel = self.backend_channel, chan
        if old is not None:
            old.close()
