"""vhost-user plugin of vdm."""
