"""kvm plugin of vdm."""
