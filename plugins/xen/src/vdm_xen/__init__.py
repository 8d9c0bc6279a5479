"""xen plugin of vdm."""
