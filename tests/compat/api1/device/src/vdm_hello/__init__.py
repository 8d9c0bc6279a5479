"""vdm-hello: a device plugin for vdm."""

__version__ = "0.1.0"
