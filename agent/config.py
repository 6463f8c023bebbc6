"""Agent configuration (``<home>/agent.toml``), parsed once into frozen dataclasses.

``sitepair-agent register`` writes it with the options given on the command line; an operator
may edit it later (restart the agent to apply). Relative paths are relative to the agent home.
"""

from __future__ import annotations

import dataclasses
import re
import tomllib
from pathlib import Path
from typing import Any

from sitepair import addresses, pki
from sitepair import log as sitepair_log
from sitepair.errors import ConfigError, InvalidArgument
from sitepair.metrics import AgentMetricsConfig, MetricsConfig, parse_table


@dataclasses.dataclass(frozen=True)
class NetworkConfig:
    """A VM network this host offers, as the backend reports it to the broker."""

    name: str
    subnets: tuple[str, ...] = ()
    #: qemu backend: what a NIC on this network is attached to: "bridge:<bridge>",
    #: "tap:<interface>", "user" (QEMU's user-mode NAT) or "isolated" (user mode with no
    #: route anywhere, restrict=on). "" = the NIC has no backend (link down).
    qemu: str = ""

    def qemu_netdev(self) -> str:
        """The ``-netdev`` option string of :attr:`qemu` ("" = none)."""
        kind, _, arg = self.qemu.partition(":")
        if not self.qemu:
            return ""
        if kind == "user" and not arg:
            return "user"
        if kind == "isolated" and not arg:
            return "user,restrict=on"
        if kind in ("bridge", "tap") and re.fullmatch(r"[A-Za-z0-9_.-]{1,15}", arg):
            return (
                f"bridge,br={arg}"
                if kind == "bridge"
                else f"tap,ifname={arg},script=no,downscript=no"
            )
        raise ConfigError(
            f"network {self.name}: qemu = {self.qemu!r} is not valid",
            hint='use "bridge:<bridge>", "tap:<interface>", "user" or "isolated"',
        )


BACKENDS = ("directory", "hyperv", "qemu")
ACCELS = ("auto", "kvm", "tcg")


@dataclasses.dataclass(frozen=True)
class BackendConfig:
    #: "directory" (portable; VMs are folders), "hyperv" (Windows hosts only) or "qemu" (Linux
    #: hosts running QEMU/KVM guests).
    kind: str = "directory"
    #: Root folder of the directory and qemu backends' VMs.
    vm_root: Path = Path("vms")
    #: qemu: the emulator binary.
    qemu_binary: str = "qemu-system-x86_64"
    #: qemu: "auto" (KVM when a short probe shows it works, TCG otherwise), "kvm" or "tcg".
    accel: str = "auto"
    #: qemu: seconds a guest has to power off after the ACPI power button before QEMU quits.
    stop_timeout: float = 60.0


@dataclasses.dataclass(frozen=True)
class ReplicationConfig:
    #: Address the replication receiver listens on: 127.0.0.1 (the default) takes replicas from
    #: this machine only; another host's agent needs an address it can reach, or 0.0.0.0 / ``::``
    #: (every interface) with ``advertise_host`` (``register --listen`` / ``--advertise``).
    listen_host: str = "127.0.0.1"
    #: Mutual-TLS (certificate) replication port.
    certificate_port: int = 8084
    #: TLS + broker ticket replication port.
    ticket_port: int = 8083
    #: Where replica disks go when no storage mapping names a classification.
    default_replica_path: Path = Path("replicas")
    #: What other hosts should connect to, when it is not the listen address (NAT, a proxy, a
    #: load balancer in front of the receiver). Empty / 0 = the listen host and bound ports.
    advertise_host: str = ""
    advertise_certificate_port: int = 0
    advertise_ticket_port: int = 0
    #: How a policy's "compression on" is carried out by this host as a source: "adaptive"
    #: (compress when that delivers more per second, agent/replication/adapt.py) or "always"
    #: (every batch that shrinks, e.g. on a metered link).
    compression: str = "adaptive"


@dataclasses.dataclass(frozen=True)
class LogConfig:
    #: debug, info, warning, error or critical (sitepair.log.LEVELS); reloaded on SIGHUP.
    level: str = "info"
    #: "json" (one object per line) or "text".
    format: str = "json"
    #: Log file; empty = standard error.
    file: str = ""
    #: Rotate the file at this size (0 = never: rotate it with logrotate and SIGHUP).
    max_bytes: int = sitepair_log.DEFAULT_MAX_BYTES
    #: Rotated files kept (FILE.1 ... FILE.N).
    backups: int = sitepair_log.DEFAULT_BACKUPS


@dataclasses.dataclass(frozen=True)
class AgentConfig:
    home: Path
    #: Cloud this host belongs to, as the host itself declares it ("" = set by the broker).
    cloud: str = ""
    backend: BackendConfig = BackendConfig()
    #: Storage classifications: name -> folder.
    storage: tuple[tuple[str, Path], ...] = ()
    networks: tuple[NetworkConfig, ...] = ()
    replication: ReplicationConfig = ReplicationConfig()
    log: LogConfig = LogConfig()
    #: The Prometheus endpoint (off by default): :mod:`sitepair.metrics`, docs/metrics.md.
    metrics: MetricsConfig = dataclasses.field(default_factory=AgentMetricsConfig)

    @property
    def scripts_dir(self) -> Path:
        return self.home / "scripts"


def _path(home: Path, value: Any, where: str) -> Path:
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{where} must be a path")
    p = Path(value)
    return p if p.is_absolute() else home / p


def _int(value: Any, where: str) -> int:
    if type(value) is not int:
        raise ConfigError(f"{where} must be an integer, not {value!r}")
    return value


def _check_keys(data: dict[str, Any], known: set[str], where: str) -> None:
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"unknown setting(s) in {where}: {', '.join(unknown)}")


def parse(text: str, home: Path, *, source: str = "agent.toml") -> AgentConfig:
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{source} is not valid TOML: {exc}") from exc
    sections = {"cloud", "backend", "storage", "networks", "replication", "log", "metrics"}
    _check_keys(doc, sections, source)
    cloud = doc.get("cloud", "")
    if not isinstance(cloud, str):
        raise ConfigError(f"{source}: cloud must be a string")
    if cloud:
        try:
            pki.check_identifier(cloud, "cloud name")
        except InvalidArgument as exc:
            raise ConfigError(f"{source}: {exc}") from exc

    b = doc.get("backend", {})
    _check_keys(
        b, {"kind", "vm_root", "qemu_binary", "accel", "stop_timeout"}, f"{source} [backend]"
    )
    kind = b.get("kind", "directory")
    if kind not in BACKENDS:
        raise ConfigError(f"{source} [backend] kind must be one of {', '.join(BACKENDS)}")
    accel = b.get("accel", "auto")
    if accel not in ACCELS:
        raise ConfigError(f"{source} [backend] accel must be one of {', '.join(ACCELS)}")
    stop_timeout = b.get("stop_timeout", 60)
    if not isinstance(stop_timeout, int | float) or not 1 <= stop_timeout <= 3600:
        raise ConfigError(f"{source} [backend] stop_timeout must be 1 to 3600 seconds")
    qemu_binary = b.get("qemu_binary", "qemu-system-x86_64")
    if not isinstance(qemu_binary, str) or not qemu_binary:
        raise ConfigError(f"{source} [backend] qemu_binary must be a program name or path")
    backend = BackendConfig(
        kind=kind,
        vm_root=_path(home, b.get("vm_root", "vms"), f"{source} [backend] vm_root"),
        qemu_binary=qemu_binary,
        accel=accel,
        stop_timeout=float(stop_timeout),
    )

    storage_doc = doc.get("storage", {})
    if not isinstance(storage_doc, dict):
        raise ConfigError(f'{source} [storage] must be a table of name = "folder"')
    storage = tuple(
        (
            pki.check_identifier(name, "storage classification"),
            _path(home, path, f"[storage] {name}"),
        )
        for name, path in sorted(storage_doc.items())
    )

    nets = []
    for i, n in enumerate(doc.get("networks", [])):
        if not isinstance(n, dict) or not isinstance(n.get("name"), str):
            raise ConfigError(f"{source} [[networks]] #{i + 1} needs a name")
        _check_keys(n, {"name", "subnets", "qemu"}, f"{source} [[networks]] {n['name']}")
        subnets = n.get("subnets", [])
        if not isinstance(subnets, list) or not all(isinstance(s, str) for s in subnets):
            raise ConfigError(f"{source} [[networks]] {n['name']}: subnets must be strings")
        net = NetworkConfig(name=n["name"], subnets=tuple(subnets), qemu=str(n.get("qemu", "")))
        net.qemu_netdev()  # refuses a bad value now rather than at a VM's start
        nets.append(net)

    r = doc.get("replication", {})
    _check_keys(
        r,
        {
            "listen_host",
            "certificate_port",
            "ticket_port",
            "default_replica_path",
            "advertise_host",
            "advertise_certificate_port",
            "advertise_ticket_port",
            "compression",
        },
        f"{source} [replication]",
    )
    compression = r.get("compression", "adaptive")
    if compression not in ("adaptive", "always"):
        raise ConfigError(
            f'{source} [replication] compression must be "adaptive" or "always", '
            f"not {compression!r}"
        )
    for port_key in (
        "certificate_port",
        "ticket_port",
        "advertise_certificate_port",
        "advertise_ticket_port",
    ):
        port = r.get(port_key, 0)
        if not isinstance(port, int) or not 0 <= port <= 65535:
            raise ConfigError(f"{source} [replication] {port_key} must be a port number")
    listen_host, advertise_host = _replication_hosts(r, source)
    replication = ReplicationConfig(
        listen_host=listen_host,
        certificate_port=int(r.get("certificate_port", 8084)),
        ticket_port=int(r.get("ticket_port", 8083)),
        default_replica_path=_path(
            home, r.get("default_replica_path", "replicas"), "[replication] default_replica_path"
        ),
        advertise_host=advertise_host,
        advertise_certificate_port=int(r.get("advertise_certificate_port", 0)),
        advertise_ticket_port=int(r.get("advertise_ticket_port", 0)),
        compression=str(compression),
    )

    lg = doc.get("log", {})
    _check_keys(lg, {"level", "format", "file", "max_bytes", "backups"}, f"{source} [log]")
    log_cfg = LogConfig(
        level=str(lg.get("level", "info")),
        format=str(lg.get("format", "json")),
        file=str(lg.get("file", "")),
        max_bytes=_int(
            lg.get("max_bytes", sitepair_log.DEFAULT_MAX_BYTES), f"{source} [log] max_bytes"
        ),
        backups=_int(lg.get("backups", sitepair_log.DEFAULT_BACKUPS), f"{source} [log] backups"),
    )
    sitepair_log.check(log_cfg, f"{source} [log]")
    return AgentConfig(
        home=home,
        cloud=cloud,
        backend=backend,
        storage=storage,
        networks=tuple(nets),
        replication=replication,
        log=log_cfg,
        metrics=parse_table(doc.get("metrics", {}), AgentMetricsConfig, f"{source} [metrics]"),
    )


def _replication_hosts(r: dict[str, Any], source: str) -> tuple[str, str]:
    """``[replication]`` listen_host and advertise_host, checked: other hosts must be able to dial
    what this host reports (a wildcard listen host needs an advertised one)."""
    where = f"{source} [replication]"
    try:
        listen = addresses.check_host(
            str(r.get("listen_host", "127.0.0.1")), f"{where} listen_host"
        )
        advertise = str(r.get("advertise_host", ""))
        if advertise:
            advertise = addresses.check_host(advertise, f"{where} advertise_host")
            if addresses.is_wildcard(advertise):
                raise InvalidArgument(f"{where} advertise_host {advertise} cannot be dialled")
    except InvalidArgument as exc:
        raise ConfigError(exc.message, hint=exc.hint) from exc
    if addresses.is_wildcard(listen) and not advertise:
        raise ConfigError(
            f"{where} listen_host {listen} (every interface) needs advertise_host: the address "
            "other hosts dial",
            hint="register with --listen 0.0.0.0 --advertise HOST, or set advertise_host",
        )
    return listen, advertise


def load(home: Path) -> AgentConfig:
    path = home / "agent.toml"
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        raise ConfigError(
            f"no agent configuration at {path}",
            hint="register this host first: sitepair-agent register --credentials FILE "
            "--name NAME --home DIR",
        ) from exc
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}") from exc
    return parse(text, home, source=str(path))


def render(
    *,
    vm_root: str = "vms",
    cloud: str = "",
    storage: dict[str, str] | None = None,
    networks: list[tuple[str, list[str]]] | None = None,
    certificate_port: int = 8084,
    ticket_port: int = 8083,
    listen_host: str = "127.0.0.1",
    advertise_host: str = "",
    advertise_certificate_port: int = 0,
    advertise_ticket_port: int = 0,
    backend: str = "directory",
    accel: str = "auto",
    qemu_networks: dict[str, str] | None = None,
) -> str:
    """The agent.toml that ``register`` writes. ``qemu_networks``: VM network -> what its
    NICs attach to on a qemu host ("bridge:br0", "tap:tap3", "user", "isolated")."""
    if backend not in BACKENDS:
        raise ConfigError(f"backend must be one of {', '.join(BACKENDS)}, not {backend!r}")
    if accel not in ACCELS:
        raise ConfigError(f"accel must be one of {', '.join(ACCELS)}, not {accel!r}")
    lines = [
        "# sitepair agent configuration. Relative paths are relative to this folder.",
        f'cloud = "{cloud}"            # cloud this host joins ("" = assigned by the broker)',
        "",
        "[backend]",
        f'kind = "{backend}"  # "directory" (portable), "hyperv" (Windows), "qemu" (Linux)',
        f'vm_root = "{vm_root}"',
        *(
            [
                f'accel = "{accel}"   # qemu: "auto" (KVM if a probe guest runs), "kvm", "tcg"',
                "stop_timeout = 60  # qemu: seconds a guest has to power off before QEMU quits",
            ]
            if backend == "qemu"
            else []
        ),
        "",
        "[storage]                  # storage classifications: name = folder",
    ]
    for name, path in sorted((storage or {}).items()):
        lines.append(f'{name} = "{path}"')
    for name, subnets in networks or []:
        lines += [
            "",
            "[[networks]]",
            f'name = "{name}"',
            f"subnets = {list(subnets)!r}".replace("'", '"'),
        ]
        if name in (qemu_networks or {}):
            lines.append(f'qemu = "{(qemu_networks or {})[name]}"')
    lines += [
        "",
        "[replication]",
        "# Where the replica receiver listens (127.0.0.1: replicas from this machine only), and",
        "# what other hosts dial (empty / 0: the listen host and ports).",
        f'listen_host = "{listen_host}"',
        f"certificate_port = {certificate_port}   # mutual TLS",
        f"ticket_port = {ticket_port}        # TLS + broker-signed ticket",
        f'advertise_host = "{advertise_host}"',
        f"advertise_certificate_port = {advertise_certificate_port}",
        f"advertise_ticket_port = {advertise_ticket_port}",
        'default_replica_path = "replicas"',
        '# With a policy\'s compression on: "adaptive" compresses when that is faster (it',
        '# measures); "always" compresses every batch that shrinks (metered links).',
        'compression = "adaptive"',
        "",
        "[metrics]                  # a Prometheus endpoint (docs/metrics.md); off by default",
        "enabled = false",
        'listen = "127.0.0.1:9465"  # not loopback: needs tls_cert and tls_key',
        'tls_cert = ""',
        'tls_key = ""',
        'client_ca = ""              # scrapers must show a certificate this CA issued',
        "",
        "[log]",
        'level = "info"',
        'format = "json"',
        'file = ""                  # empty = standard error',
        "max_bytes = 104857600      # rotate the file at this size (0 = never; logrotate + SIGHUP)",
        "backups = 5                # rotated files kept",
        "",
    ]
    return "\n".join(lines)
