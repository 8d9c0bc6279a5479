"""console plugin of vdm."""
