"""vdm-rng-example: virtio-rng as a third-party vdm plugin."""

__version__ = "0.1.0"
