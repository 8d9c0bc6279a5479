"""vdm-rng: virtio-rng (device id 4) fed from /dev/urandom or a file, with a rate limit."""

__version__ = "0.1.0"
