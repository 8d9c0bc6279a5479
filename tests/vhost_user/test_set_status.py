"""vhost-user SET_STATUS with FEATURES_OK goes through the device's one feature rule
(VirtioDevice.accept_features), as a virtio-mmio or virtio-pci status write does: features the
device refuses at that moment leave FEATURES_OK clear, with one log line saying why.

SET_FEATURES already refuses features the device rejects (the connection is closed); FEATURES_OK
is still checked on its own, because it is the driver's commitment: it can come without any
SET_FEATURES, and the device's answer may have changed since (its validate_features looks at the
host side, here a flag standing for a backend that lost a capability).
"""

from __future__ import annotations

import logging

from vdm.device import Status
from vdm.testing import EchoDevice
from vdm_vhost_user import protocol as p
from vdm_vhost_user.protocol import Req

from tests.vhost_user.frontend import F_VERSION_1

F_EXTRA = 1
FEATURES_OK = Status.ACKNOWLEDGE | Status.DRIVER | Status.FEATURES_OK


class PickyEcho(EchoDevice):
    """Offers F_EXTRA; accepts it only while the host side can serve it (:attr:`extra_ok`)."""

    def __init__(self) -> None:
        super().__init__()
        self.extra_ok = True

    def device_features(self) -> int:
        return 1 << F_EXTRA

    def validate_features(self, features: int) -> str | None:
        if features >> F_EXTRA & 1 and not self.extra_ok:
            return "F_EXTRA is not available on this host any more"
        return None


def connect(serve, frontends, device):
    _, path = serve(device)
    fe = frontends(path)
    fe.set_protocol_features(fe.get_protocol_features())
    fe.call(Req.SET_OWNER)
    return fe


def set_status(fe, value: int) -> int:
    fe.call(Req.SET_STATUS, p.U64.pack(value))
    return fe.get_u64(Req.GET_STATUS)


def refusals(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if "refusing features" in r.getMessage()]


def test_features_ok_refused_when_the_device_rejects_the_features(serve, frontends, caplog):
    device = PickyEcho()
    fe = connect(serve, frontends, device)
    fe.set_features(F_VERSION_1 | 1 << F_EXTRA | 1 << p.F_PROTOCOL_FEATURES)  # accepted now
    device.extra_ok = False
    with caplog.at_level(logging.WARNING):
        status = set_status(fe, FEATURES_OK)
    assert not status & Status.FEATURES_OK, "FEATURES_OK must read back clear"
    assert status & Status.DRIVER
    assert len(refusals(caplog)) == 1 and "not available on this host" in refusals(caplog)[0]
    # the driver starts over with what the device accepts
    assert set_status(fe, 0) == 0
    fe.set_features(F_VERSION_1 | 1 << p.F_PROTOCOL_FEATURES)
    assert set_status(fe, FEATURES_OK) == FEATURES_OK
    assert device.driver_features == F_VERSION_1


def test_features_ok_refused_before_any_set_features(serve, frontends):
    fe = connect(serve, frontends, PickyEcho())
    status = set_status(fe, FEATURES_OK)
    assert status == Status.ACKNOWLEDGE | Status.DRIVER


def test_features_ok_accepted_keeps_the_features(serve, frontends):
    device = PickyEcho()
    fe = connect(serve, frontends, device)
    fe.set_features(F_VERSION_1 | 1 << F_EXTRA | 1 << p.F_PROTOCOL_FEATURES)
    assert set_status(fe, FEATURES_OK) == FEATURES_OK
    assert device.driver_features == F_VERSION_1 | 1 << F_EXTRA
