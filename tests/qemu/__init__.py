"""A broker and two qemu hosts replicating, failing over and booting real guests."""
