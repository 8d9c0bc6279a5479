"""vdm-hyper: a hypervisor plugin for vdm."""

__version__ = "0.1.0"
