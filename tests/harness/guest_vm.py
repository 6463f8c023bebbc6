"""Real guests on the harness's qemu hosts (``--backend qemu``): the test guest of
``tests/support/guest.py``, created and started on a host the way an operator would, its serial
console read, its QEMU killed when its site is lost.

The guest *is* the workload: it writes durable, checksummed records to its ext4 data disk and
acknowledges each on its serial console (``SITEPAIR ACK <seq> <digest>``), and on every boot it
checks every record on the disk itself (``SITEPAIR FSCK`` and ``SITEPAIR VERIFY``). What the
scenarios conclude from that is in :mod:`tests.harness.guest_check`.

A VM is created and started in its host's place (``python -m tests.harness.guest_vm``, run
through the network layer, so in namespace mode its QEMU lives in the site's namespace, as
the VMs its agent starts after a failover do). The qemu backend writes each boot's console to
``<vm folder>/run/serial.log`` (the boot before to ``serial.previous.log``).
"""

from __future__ import annotations

import argparse
import functools
import json
import subprocess
import sys
from pathlib import Path

from agent import config as agent_config
from agent.hosts import make_backend, qemu_vm
from agent.hosts.qemu import QemuBackend
from tests.harness.cluster import REPO, AgentProc, Cluster
from tests.support.guest import ConsoleLog, GuestImage, missing_tools

#: The guest's memory: the kernel, busybox and e2fsck need little; TCG is faster with less.
MEMORY_MB = 256


def unavailable_reason() -> str:
    """Why real guests cannot run here ("" when they can)."""
    missing = missing_tools()
    if missing:
        return f"real guests need {', '.join(missing)}; scripts/setup.sh installs them"
    return ""


@functools.cache
def image() -> GuestImage:
    """The guest image, built once (and cached across runs by tests/support/guest.py)."""
    return GuestImage.build()


def create(cluster: Cluster, host: str, vm: str) -> None:
    """Create guest ``vm`` on ``host`` from fresh copies of the image's disks (a boot disk and
    a data disk, both VHDX), its NIC on the host's site network, and start it, from the
    host's place."""
    agent = cluster.agents[host]
    boot, data = image().copy_disks(cluster.root / "images", prefix=f"{vm}-")
    argv = [
        sys.executable,
        "-m",
        "tests.harness.guest_vm",
        "--home",
        str(agent.home),
        "--vm",
        vm,
        "--boot",
        str(boot),
        "--data",
        str(data),
        "--network",
        f"corp-{agent.site}",
    ]
    done = subprocess.run(
        cluster.net.command(argv, agent.site),
        env=cluster.env,
        capture_output=True,
        text=True,
        check=False,
        cwd=REPO,
    )
    if done.returncode != 0:
        raise RuntimeError(f"creating guest {vm} on {host} failed: {done.stderr[-3000:]}")
    # The VM folder holds its own copies now.
    boot.unlink()
    data.unlink()


def console(agent: AgentProc, vm: str) -> ConsoleLog:
    """The console of ``vm``'s current (or last) boot on ``agent``'s host."""
    return ConsoleLog(qemu_vm.Runtime(agent.qemu.vm_dir(vm)).serial)


def kill(agent: AgentProc, vm: str) -> bool:
    """SIGKILL ``vm``'s QEMU on ``agent``'s host (a power cut: what reached its files stays);
    False if it was not running."""
    inst = qemu_vm.running_instance(qemu_vm.Runtime(agent.qemu.vm_dir(vm)))
    if inst is None:
        return False
    qemu_vm.kill(inst)
    return True


def _main(argv: list[str] | None = None) -> int:
    """Create and start a guest VM with the host's own backend (from its agent.toml)."""
    p = argparse.ArgumentParser(prog="python -m tests.harness.guest_vm", description=_main.__doc__)
    p.add_argument("--home", type=Path, required=True, help="the agent's home")
    p.add_argument("--vm", required=True)
    p.add_argument("--boot", type=Path, required=True, help="the boot disk (VHDX) to copy")
    p.add_argument("--data", type=Path, required=True, help="the data disk (VHDX) to copy")
    p.add_argument("--network", required=True, help="the VM network of its NIC")
    args = p.parse_args(argv)
    backend = make_backend(agent_config.load(args.home))
    if not isinstance(backend, QemuBackend):
        p.error(f"{args.home} is not a qemu host")
    spec = backend.create_vm(
        args.vm,
        disks=[("boot", "vhdx", args.boot), ("data", "vhdx", args.data)],
        memory_mb=MEMORY_MB,
        nics=[("nic0", args.network)],
    )
    record = backend.set_vm_state(args.vm, "running")
    print(json.dumps({"vm_id": spec.id, "state": record.state}))
    return 0


if __name__ == "__main__":
    sys.exit(_main())
