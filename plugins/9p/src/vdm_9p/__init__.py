"""vdm-9p: a host directory shared with the guest over virtio-9p (9P2000.L)."""

__version__ = "0.1.0"
