"""Virtual disks: raw, VHD and VHDX (fixed, dynamic, differencing)."""
