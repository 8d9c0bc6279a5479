"""virtio-net's host side: the tap the frames go to and come from.

* :mod:`.tun` -- /dev/net/tun ioctls and flags (checked against the kernel headers in tests);
* :mod:`.tap` -- :func:`~vdm_net.backends.tap.open_tap`: open, create or adopt a tap, probe offloads;
* :mod:`.offloads` -- TUN_F_* offload flags <-> the virtio-net features they allow;
* :mod:`.poller` -- the thread that watches the taps' fds and kicks the device's queues.

Nothing is imported here, so that loading the plugin stays cheap.
"""
