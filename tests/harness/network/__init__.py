"""The cross-site harness' network layer: namespaces, the WAN link, small filesystems.

* :mod:`.netns` builds sites, a broker and a router in network namespaces (root + iproute2);
* :mod:`.proxy` is the userspace TCP proxy that shapes and breaks the inter-site link;
* :mod:`.wan` names the WAN profiles and says honestly what each can and cannot emulate;
* :mod:`.network` puts them behind one API in ``loopback`` or ``netns`` mode;
* :mod:`.fs` mounts size-limited filesystems for "replica disk full" faults.

docs/harness-network.md is the operator's page for all of it.
"""

from tests.harness.network.fs import (
    FilesystemUnavailable,
    SmallFilesystem,
    cleanup_stale_mounts,
    small_filesystem,
    small_filesystem_unavailable,
)
from tests.harness.network.netns import (
    NetnsError,
    NetnsUnavailable,
    Topology,
    cleanup_stale,
    netns_unavailable_reason,
)
from tests.harness.network.network import Network
from tests.harness.network.proxy import FaultProxy, ProxyStats
from tests.harness.network.wan import LAN, LOSSY, METRO, PROFILES, WAN, WanLink, WanProfile

__all__ = [
    "LAN",
    "LOSSY",
    "METRO",
    "PROFILES",
    "WAN",
    "FaultProxy",
    "FilesystemUnavailable",
    "NetnsError",
    "NetnsUnavailable",
    "Network",
    "ProxyStats",
    "SmallFilesystem",
    "Topology",
    "WanLink",
    "WanProfile",
    "cleanup_stale",
    "cleanup_stale_mounts",
    "netns_unavailable_reason",
    "small_filesystem",
    "small_filesystem_unavailable",
]
