"""vdm-vsock: virtio-vsock (device id 19) whose host side is Unix sockets."""

__version__ = "0.1.0"
