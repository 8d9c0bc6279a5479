"""blk plugin of vdm."""
