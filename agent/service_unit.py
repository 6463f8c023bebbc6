"""The agent's systemd unit: ``sitepair-agent run --home DIR`` under a sandbox.

Writable: the home, and the folders its configuration names for VMs and replicas (the backend's
``vm_root``, each ``[storage]`` folder, ``[replication] default_replica_path``), plus the folder
of a log file configured outside the home. A qemu host keeps the host's devices (``/dev/kvm``,
``/dev/net/tun``) and netlink sockets (tap and bridge set-up); the others get ``PrivateDevices``.
On Windows ``service`` commands go to ``agent/winservice.py`` instead.
"""

from __future__ import annotations

from pathlib import Path

from agent import config as config_mod
from sitepair.service.cli import InstallOptions, ServiceProgram
from sitepair.service.systemd import UnitSpec, entry_point

PROG = "sitepair-agent"


def unit(options: InstallOptions) -> UnitSpec:
    cfg = config_mod.load(options.home)  # a folder that is no agent home stops here
    writable = [
        options.home,
        cfg.backend.vm_root,
        *(path for _, path in cfg.storage),
        cfg.replication.default_replica_path,
    ]
    if cfg.log.file:
        writable.append(Path(cfg.log.file).absolute().parent)
    qemu = cfg.backend.kind == "qemu"
    return UnitSpec(
        name=options.name,
        description="sitepair agent",
        exec_start=(*entry_point(PROG, "agent.cli"), "run", "--home", str(options.home)),
        writable=tuple(Path(p).absolute() for p in writable),
        user=options.user,
        # qemu guests get their stop_timeout to power off, then the agent closes.
        stop_timeout_sec=int(cfg.backend.stop_timeout) + 30 if qemu else 30,
        extra_address_families=("AF_NETLINK",) if qemu else (),
        host_devices=qemu,
    )


def program() -> ServiceProgram:
    windows = None
    import sys

    if sys.platform == "win32":  # pragma: no cover - Windows only
        from agent.winservice import WINDOWS_COMMANDS

        windows = WINDOWS_COMMANDS
    return ServiceProgram(prog=PROG, unit=unit, windows=windows)
