"""vdm: virtio devices written once, served to guests of any hypervisor.

The public API for plugin authors:

* :mod:`vdm.hookspecs` -- the hooks (``hookimpl`` for plugin hooks, ``vmmimpl`` for VMM hooks);
* :mod:`vdm.registry` -- ``DeviceType``, ``HypervisorType``, ``ServerType``, ``Command``;
* :mod:`vdm.device`, :mod:`vdm.virtqueue`, :mod:`vdm.memory` -- writing a virtio device;
* :mod:`vdm.testing` -- an in-process driver for device tests.

A plugin module may set ``VDM_API = <int>`` to the API version it was written for. A plugin for
an older version this core still supports (:data:`SUPPORTED_API_VERSIONS`) loads with a
DeprecationWarning naming what to change (docs/plugins.md, "Changes in API 2"); any other version
is refused by name instead of failing obscurely.
"""

__version__ = "0.1.0"
#: The plugin API version of this vdm-core. Bumped on incompatible hook or base-class changes.
API_VERSION = 2
#: The API versions whose plugins load (the older ones with a DeprecationWarning).
SUPPORTED_API_VERSIONS = (1, 2)

from .hookspecs import hookimpl, vmmimpl  # noqa: E402

__all__ = ["API_VERSION", "SUPPORTED_API_VERSIONS", "__version__", "hookimpl", "vmmimpl"]
