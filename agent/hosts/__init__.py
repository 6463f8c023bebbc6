"""Host backends: the boundary between the agent and the hypervisor.

``directory`` is portable and runs everywhere (tests, demo, Linux hosts). ``hyperv`` drives
Hyper-V through its management API and runs only on Windows hosts.
"""

from __future__ import annotations

import sys

from agent.config import AgentConfig
from agent.hosts.base import HostBackend
from sitepair.errors import ConfigError


def make_backend(config: AgentConfig) -> HostBackend:
    kind = config.backend.kind
    if kind == "directory":
        from agent.hosts.directory import DirectoryBackend

        return DirectoryBackend(
            config.backend.vm_root,
            storage=config.storage,
            networks=config.networks,
            extra_volumes=(config.replication.default_replica_path,),
        )
    if kind == "hyperv":
        # Read into a plain str: mypy would otherwise treat the Windows branch as unreachable
        # when it checks on another platform.
        platform: str = sys.platform
        if platform != "win32":
            raise ConfigError(
                f"the hyperv backend runs only on Windows hosts with Hyper-V; this host is "
                f"{platform}",
                hint='set [backend] kind = "directory" in agent.toml',
            )
        from agent.hosts.hyperv import HyperVBackend
        from agent.hosts.hyperv_api import PowerShellHyperVApi

        return HyperVBackend(
            config.backend.vm_root,
            PowerShellHyperVApi(),
            storage=config.storage,
            networks=config.networks,
            extra_volumes=(config.replication.default_replica_path,),
        )
    raise ConfigError(f"unknown backend {kind!r}")
