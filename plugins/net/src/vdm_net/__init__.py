"""net plugin of vdm."""
