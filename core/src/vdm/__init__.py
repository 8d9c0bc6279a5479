"""vdm: virtio devices written once, served to guests of any hypervisor."""

__version__ = "0.1.0"
