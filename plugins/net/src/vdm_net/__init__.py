"""vdm-net: virtio-net over a host tap, a plugin of vdm.

Modules, from the wire up:

* :mod:`vdm_net.tun` -- /dev/net/tun ioctls and flags (checked against the kernel headers in tests);
* :mod:`vdm_net.tap` -- :func:`~vdm_net.tap.open_tap`: open, create or adopt a tap, probe offloads;
* :mod:`vdm_net.vnet_hdr` -- the 12-byte virtio-net header and its checks in both directions;
* :mod:`vdm_net.features` -- feature bits and their dependencies (virtio 1.2, 5.1.3.1);
* :mod:`vdm_net.config` -- :class:`~vdm_net.config.NetConfig`, the ``--network`` options;
* :mod:`vdm_net.device` -- :class:`~vdm_net.device.VirtioNet`, the device;
* :mod:`vdm_net.poller` -- the thread that watches the tap fds;
* :mod:`vdm_net.plugin` -- registers the ``net`` device type.

Nothing is imported here, so that loading the plugin stays cheap.
"""
