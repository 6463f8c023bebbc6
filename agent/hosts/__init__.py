"""Host backends: the boundary between the agent and the hypervisor.

``directory`` is portable and runs everywhere (tests, demo, Linux hosts). ``hyperv`` drives
Hyper-V through its management API and runs only on Windows hosts. ``qemu`` runs VMs as QEMU
processes (KVM or TCG) on Linux hosts.
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
        from agent.hosts.hyperv_powershell import PowerShellHyperVApi

        return HyperVBackend(
            config.backend.vm_root,
            PowerShellHyperVApi(),
            storage=config.storage,
            networks=config.networks,
            extra_volumes=(config.replication.default_replica_path,),
        )
    if kind == "qemu":
        if not sys.platform.startswith("linux"):
            raise ConfigError(
                f"the qemu backend runs only on Linux hosts; this host is {sys.platform}",
                hint='set [backend] kind = "directory" in agent.toml',
            )
        from agent.hosts.qemu import QemuBackend

        return QemuBackend(
            config.backend.vm_root,
            binary=config.backend.qemu_binary,
            accel=config.backend.accel,
            storage=config.storage,
            networks=tuple((n.name, n.qemu_netdev()) for n in config.networks),
            extra_volumes=(config.replication.default_replica_path,),
            stop_timeout=config.backend.stop_timeout,
        )
    raise ConfigError(f"unknown backend {kind!r}")
