"""vdm-net: virtio-net over a host tap, a plugin of vdm.

Modules, from the wire up:

* :mod:`vdm_net.backends` -- the host side: the tap (:mod:`~vdm_net.backends.tap`, its ioctls in
  :mod:`~vdm_net.backends.tun`, offload flags in :mod:`~vdm_net.backends.offloads`) and the thread
  that watches its fds (:mod:`~vdm_net.backends.poller`);
* :mod:`vdm_net.vnet_hdr` -- the 12-byte virtio-net header and its checks in both directions;
* :mod:`vdm_net.features` -- feature bits and their dependencies (virtio 1.2, 5.1.3.1);
* :mod:`vdm_net.config` -- :class:`~vdm_net.config.NetConfig`, the ``--network`` options;
* :mod:`vdm_net.device` -- :class:`~vdm_net.device.VirtioNet`, the device, with its queue pairs'
  state in :mod:`vdm_net.queue_pair`;
* :mod:`vdm_net.control` -- the control queue's commands;
* :mod:`vdm_net.plugin` -- registers the ``net`` device type.

Nothing is imported here, so that loading the plugin stays cheap.
"""
