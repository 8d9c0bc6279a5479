"""vdm-balloon: virtio-balloon (device id 5) -- the host asks the guest to give memory back."""

__version__ = "0.1.0"
