"""vdm-hyper's plugin module: registers the ``hyper`` hypervisor."""

from __future__ import annotations

from typing import Callable

from vdm import hookimpl
from vdm.registry import HypervisorType

#: The vdm-core plugin API this plugin was written for; vdm skips the plugin (and says why) if
#: the installed vdm-core provides another one.
VDM_API = 1


def check() -> str | None:
    """None when the hyper hypervisor can be used on this machine, else a one-line reason.

    Called by ``vdm list-plugins`` and before a command uses the hypervisor: keep it fast and
    quiet, e.g. ``if not os.path.exists("/dev/hyper"): return "/dev/hyper not found"``.
    """
    return None


@hookimpl
def vdm_register_hypervisors(register: Callable[[HypervisorType], None]) -> None:
    register(HypervisorType(name="hyper", check=check, help="hyper: a hypervisor made by vdm new-plugin"))
