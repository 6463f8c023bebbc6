"""Tests of the real test guest (tests/support/guest.py): a Debian kernel and busybox booted by
QEMU (TCG) from VHDX disks, with a workload whose records are verified across boots."""
