"""Broker configuration (``<home>/broker.toml``), parsed once into frozen dataclasses.

``sitepair-broker init`` writes a commented file with every setting; each field below documents
what it does. Unknown keys are an error (a typo must not be silently ignored).
"""

from __future__ import annotations

import dataclasses
import tomllib
from pathlib import Path
from typing import Any

from broker.health import HealthConfig
from broker.verify import VerifyConfig
from sitepair import addresses, pki
from sitepair import log as sitepair_log
from sitepair.durations import format_duration, parse_duration
from sitepair.errors import ConfigError, InvalidArgument
from sitepair.metrics import MetricsConfig
from sitepair.metrics import check as check_metrics


@dataclasses.dataclass(frozen=True)
class ListenConfig:
    #: Where agents enroll (server TLS only; the registration secret authenticates the agent).
    enrollment: str = "127.0.0.1:8444"
    #: Control stream and admin API (mutual TLS). Port 0 picks a free port (tests).
    control: str = "127.0.0.1:8443"


@dataclasses.dataclass(frozen=True)
class AdvertiseConfig:
    """Addresses written into credentials files and handed to agents; empty = the listen ones.
    Needed when the broker listens on 0.0.0.0 or ``::``, which another machine cannot dial."""

    enrollment: tuple[str, ...] = ()
    control: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class CertificateConfig:
    #: Lifetime of agent certificates; agents renew at half of it.
    agent_lifetime: float = 24 * 3600.0
    #: Lifetime of operator (admin) certificates.
    operator_lifetime: float = 365 * 86400.0
    #: Lifetime of the broker's own serving certificate; renewed at half life without restart.
    server_lifetime: float = 90 * 86400.0
    #: Extra DNS names and IP addresses for the broker's serving certificate (``init`` puts the
    #: advertised ones here; agents verify the name ``broker.sitepair``, always present).
    server_names: tuple[str, ...] = ("localhost",)
    server_ips: tuple[str, ...] = ("127.0.0.1",)


@dataclasses.dataclass(frozen=True)
class KeysConfig:
    #: Default validity of a registration key.
    default_validity: float = 5 * 86400.0
    #: Longest validity an operator may ask for.
    max_validity: float = 90 * 86400.0


@dataclasses.dataclass(frozen=True)
class HeartbeatConfig:
    #: How often agents send a heartbeat (the broker tells them in Welcome).
    interval: float = 10.0
    #: Heartbeats missed in a row before a server is marked disconnected.
    missed: int = 3


@dataclasses.dataclass(frozen=True)
class LimitsConfig:
    #: Concurrent RPCs the control/admin server accepts (each connected agent holds one stream).
    max_concurrent_rpcs: int = 20_000
    #: Concurrent HTTP/2 streams per client connection.
    max_streams_per_connection: int = 32
    #: Largest message on the control and admin channels.
    max_message_bytes: int = 8 * 1024 * 1024
    #: Concurrent enrollment calls.
    max_concurrent_enrollments: int = 256


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


#: Store backends: the embedded default, and the one several brokers can share.
STORE_BACKENDS = ("sqlite", "postgresql")


@dataclasses.dataclass(frozen=True)
class StoreConfig:
    """Where the broker keeps its state."""

    #: "sqlite" (``<home>/broker.db``, one broker) or "postgresql" (several brokers may share it).
    backend: str = "sqlite"
    #: PostgreSQL only: libpq connection string or URI, without a password. The password comes
    #: from the ``SITEPAIR_DB_PASSWORD`` environment variable or libpq's ``~/.pgpass``.
    dsn: str = ""
    #: PostgreSQL only: how long a broker's leader lease lasts; renewed every third of it. A dead
    #: leader's periodic work moves to another broker within this time.
    leader_lease: float = 15.0


#: The dashboard's default port (docs/dashboard.md): beside the control port 8443.
DASHBOARD_PORT = 9443


@dataclasses.dataclass(frozen=True)
class DashboardConfig:
    """``[dashboard]``: the web dashboard (:mod:`broker.web`), HTTPS only, off by default.
    Relative paths are relative to the home."""

    #: Serve the dashboard at all.
    enabled: bool = False
    #: HOST:PORT to listen on (port 0 picks a free one: tests). Operators' browsers dial it.
    listen: str = f"127.0.0.1:{DASHBOARD_PORT}"
    #: PEM certificate (chain) and key from the operator's own PKI, both or neither; empty =
    #: the broker's own serving certificate (``tls/``), renewed and reloaded automatically.
    tls_cert: str = ""
    tls_key: str = ""
    #: How long a browser session lasts after ``operators login --browser`` signs it in.
    session_lifetime: float = 8 * 3600.0


#: Longest and shortest session a browser may keep.
MAX_SESSION_LIFETIME = 24 * 3600.0
MIN_SESSION_LIFETIME = 60.0


def check_dashboard(dashboard: DashboardConfig, where: str = "[dashboard]") -> None:
    """Refuse dashboard settings that cannot work (ConfigError naming the setting)."""
    try:
        addresses.check_host_port(dashboard.listen, f"{where} listen", allow_zero=True)
    except InvalidArgument as exc:
        raise ConfigError(
            exc.message, hint=exc.hint or f'for example listen = "127.0.0.1:{DASHBOARD_PORT}"'
        ) from exc
    if bool(dashboard.tls_cert) != bool(dashboard.tls_key):
        raise ConfigError(
            f"{where} tls_cert and tls_key go together: set both, or neither",
            hint="leave both empty to serve with the broker's own certificate (tls/)",
        )
    if not MIN_SESSION_LIFETIME <= dashboard.session_lifetime <= MAX_SESSION_LIFETIME:
        raise ConfigError(
            f"{where} session_lifetime must be between 1m and 24h, "
            f"not {format_duration(dashboard.session_lifetime)}",
            hint='the default is "8h": a working day, then `operators login --browser` again',
        )


def check_store(store: StoreConfig, where: str = "[store]") -> None:
    """Refuse a store setting that cannot work, and a password written into the DSN."""
    if store.backend not in STORE_BACKENDS:
        raise ConfigError(
            f'{where} backend must be "sqlite" or "postgresql", not {store.backend!r}'
        )
    if store.backend == "sqlite":
        if store.dsn:
            raise ConfigError(f'{where} dsn is for backend = "postgresql" only')
        return
    if not store.dsn:
        raise ConfigError(
            f'{where} backend = "postgresql" needs dsn = "postgresql://USER@HOST/DATABASE"'
        )
    from psycopg import Error as PsycopgError
    from psycopg.conninfo import conninfo_to_dict

    try:
        params = conninfo_to_dict(store.dsn)
    except PsycopgError as exc:
        raise ConfigError(f"{where} dsn is not a PostgreSQL connection string: {exc}") from exc
    if "password" in params:
        raise ConfigError(
            f"{where} dsn must not hold the password",
            hint="set SITEPAIR_DB_PASSWORD in the broker's environment, or use ~/.pgpass",
        )
    if store.leader_lease < 1:
        raise ConfigError(f"{where} leader_lease must be at least 1s")


@dataclasses.dataclass(frozen=True)
class NetworkSettings:
    """What ``init`` derives from its address options: where to listen, what to advertise, and
    the names and IPs of the serving certificate."""

    listen: ListenConfig
    advertise: AdvertiseConfig
    server_names: tuple[str, ...]
    server_ips: tuple[str, ...]

    @property
    def local_control(self) -> str:
        """The control address the home's own operator dials (loopback for a wildcard)."""
        host, port = self.listen.control.rsplit(":", 1)
        host = host.strip("[]")
        if addresses.is_wildcard(host):
            host = "::1" if ":" in host else "127.0.0.1"
        return addresses.join(host, int(port))


def _unique(items: list[str]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(items))


def network_settings(
    *,
    enrollment: str,
    control: str,
    advertise: tuple[str, ...] = (),
    server_names: tuple[str, ...] = ("localhost",),
) -> NetworkSettings:
    """Check ``init``'s address options and derive the settings they make.

    ``advertise`` holds the DNS names and IPs other machines dial; each is advertised with the
    enrollment and the control port. The certificate keeps ``localhost`` and ``127.0.0.1`` (the
    local operator) and gains every advertised or listened-on name and IP. InvalidArgument, naming
    the option, for a bad address, a wildcard listen address without ``advertise``, or an
    advertised address with a port chosen at random (0)."""
    e_host, e_port = addresses.check_host_port(enrollment, "--enrollment", allow_zero=True)
    c_host, c_port = addresses.check_host_port(control, "--control", allow_zero=True)
    hosts = [addresses.check_host(h, "--advertise") for h in advertise]
    for host in hosts:
        if addresses.is_wildcard(host):
            raise InvalidArgument(
                f"--advertise {host} is not an address another machine can dial",
                hint="advertise this machine's IP address or DNS name",
            )
    if hosts and 0 in (e_port, c_port):
        raise InvalidArgument(
            "--advertise needs fixed ports: --enrollment and --control must not use port 0"
        )
    for option, host in (("--enrollment", e_host), ("--control", c_host)):
        if addresses.is_wildcard(host) and not hosts:
            raise InvalidArgument(
                f"{option} listens on {host}, which agents cannot dial: say what they dial",
                hint="add --advertise HOST (this machine's IP or DNS name; repeat for several)",
            )
    extra = [addresses.check_host(n, "--server-name") for n in server_names]
    named = [h for h in [*extra, *hosts, e_host, c_host] if not addresses.is_wildcard(h)]
    return NetworkSettings(
        listen=ListenConfig(
            enrollment=addresses.join(e_host, e_port), control=addresses.join(c_host, c_port)
        ),
        advertise=AdvertiseConfig(
            enrollment=tuple(addresses.join(h, e_port) for h in hosts),
            control=tuple(addresses.join(h, c_port) for h in hosts),
        ),
        server_names=_unique(["localhost", *(h for h in named if not addresses.is_ip(h))]),
        server_ips=_unique(["127.0.0.1", *(h for h in named if addresses.is_ip(h))]),
    )


def check_network(cfg: BrokerConfig, source: str) -> None:
    """Refuse listen, advertise and certificate addresses that cannot work (ConfigError)."""
    try:
        for key in ("enrollment", "control"):
            host, _ = addresses.check_host_port(
                getattr(cfg.listen, key), f"{source} [listen] {key}", allow_zero=True
            )
            advertised = getattr(cfg.advertise, key)
            for item in advertised:
                where = f"{source} [advertise] {key}"
                a_host, _ = addresses.check_host_port(item, where)
                if addresses.is_wildcard(a_host):
                    raise InvalidArgument(f"{where}: {item} is not an address agents can dial")
            if addresses.is_wildcard(host) and not advertised:
                raise InvalidArgument(
                    f"{source} [listen] {key} is on {host}, which agents cannot dial",
                    hint=f'set [advertise] {key} = ["HOST:PORT"] (this machine\'s IP or name)',
                )
        for name in cfg.certificates.server_names:
            if addresses.is_ip(addresses.check_host(name, f"{source} [certificates] server_names")):
                raise InvalidArgument(
                    f"{source} [certificates] server_names: {name} is an IP address",
                    hint="put it in server_ips",
                )
        for ip in cfg.certificates.server_ips:
            if not addresses.is_ip(ip):
                raise InvalidArgument(
                    f"{source} [certificates] server_ips: {ip!r} is not an IP address"
                )
    except InvalidArgument as exc:
        raise ConfigError(exc.message, hint=exc.hint) from exc


@dataclasses.dataclass(frozen=True)
class BrokerConfig:
    vault: str
    listen: ListenConfig = ListenConfig()
    advertise: AdvertiseConfig = AdvertiseConfig()
    certificates: CertificateConfig = CertificateConfig()
    keys: KeysConfig = KeysConfig()
    heartbeat: HeartbeatConfig = HeartbeatConfig()
    limits: LimitsConfig = LimitsConfig()
    log: LogConfig = LogConfig()
    health: HealthConfig = dataclasses.field(default_factory=HealthConfig)
    store: StoreConfig = StoreConfig()
    verify: VerifyConfig = dataclasses.field(default_factory=VerifyConfig)
    #: The Prometheus endpoint (off by default): :mod:`sitepair.metrics`, docs/metrics.md.
    metrics: MetricsConfig = dataclasses.field(default_factory=MetricsConfig)
    #: The web dashboard (off by default): :mod:`broker.web`, docs/dashboard.md.
    dashboard: DashboardConfig = DashboardConfig()


_KIND_NAMES = {int: "an integer", str: "a string", bool: "true or false", float: "a number"}

_DURATION_FIELDS = {
    "offline_critical_after",
    "window",
    "agent_lifetime",
    "operator_lifetime",
    "server_lifetime",
    "default_validity",
    "max_validity",
    "interval",
    "leader_lease",
    "retry",
    "check_every",
    "clock_skew_warning",
    "clock_skew_critical",
    "session_lifetime",
}


def _section(cls: type[Any], data: Any, where: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{where} must be a table")
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise ConfigError(f"unknown setting(s) in {where}: {', '.join(unknown)}")
    values: dict[str, Any] = {}
    for name, value in data.items():
        key = f"{where}.{name}"
        default = getattr(cls(), name)
        try:
            if name in _DURATION_FIELDS:
                values[name] = parse_duration(value, what=key)
            elif isinstance(default, tuple):
                if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                    raise ConfigError(f"{key} must be a list of strings")
                values[name] = tuple(value)
            elif type(value) is not type(default):
                raise ConfigError(f"{key} must be {_KIND_NAMES.get(type(default), 'a value')}")
            else:
                values[name] = value
        except InvalidArgument as exc:
            raise ConfigError(exc.message) from exc
    return cls(**values)


def parse(text: str, *, source: str = "broker.toml") -> BrokerConfig:
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{source} is not valid TOML: {exc}") from exc
    vault = doc.pop("vault", None)
    if not isinstance(vault, str):
        raise ConfigError(f'{source} must set vault = "<name>"')
    try:
        pki.check_vault_name(vault)
    except InvalidArgument as exc:
        raise ConfigError(f"{source}: {exc}") from exc
    sections = {
        "listen": ListenConfig,
        "advertise": AdvertiseConfig,
        "certificates": CertificateConfig,
        "keys": KeysConfig,
        "heartbeat": HeartbeatConfig,
        "limits": LimitsConfig,
        "log": LogConfig,
        "health": HealthConfig,
        "store": StoreConfig,
        "verify": VerifyConfig,
        "metrics": MetricsConfig,
        "dashboard": DashboardConfig,
    }
    unknown = sorted(set(doc) - set(sections))
    if unknown:
        raise ConfigError(f"{source}: unknown section(s): {', '.join(unknown)}")
    parts = {
        name: _section(cls, doc.get(name, {}), f"{source} [{name}]")
        for name, cls in sections.items()
    }
    cfg = BrokerConfig(vault=vault, **parts)
    if cfg.heartbeat.missed < 1 or cfg.heartbeat.interval <= 0:
        raise ConfigError(f"{source} [heartbeat]: interval must be > 0 and missed >= 1")
    sitepair_log.check(cfg.log, f"{source} [log]")
    check_network(cfg, source)
    check_store(cfg.store, f"{source} [store]")
    check_metrics(cfg.metrics, f"{source} [metrics]")
    check_dashboard(cfg.dashboard, f"{source} [dashboard]")
    v = cfg.verify
    if v.interval < 0 or v.concurrent < 1 or v.retry <= 0 or v.check_every <= 0:
        raise ConfigError(
            f"{source} [verify]: interval must be >= 0 (0 = off), concurrent >= 1, "
            "retry and check_every > 0"
        )
    return cfg


def load(path: Path) -> BrokerConfig:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        raise ConfigError(
            f"no broker configuration at {path}",
            hint="create a broker home with `sitepair-broker init --home DIR`",
        ) from exc
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}") from exc
    return parse(text, source=str(path))


def render(
    vault: str,
    *,
    enrollment: str,
    control: str,
    names: tuple[str, ...],
    store: StoreConfig | None = None,
    advertise: tuple[str, ...] = (),
) -> str:
    """The commented broker.toml that ``init`` writes (addresses checked by
    :func:`network_settings`, which raises InvalidArgument)."""
    net = network_settings(
        enrollment=enrollment, control=control, advertise=advertise, server_names=names
    )

    def strings(items: tuple[str, ...]) -> str:
        return ", ".join(_toml_string(i) for i in items)

    store = store or StoreConfig()
    check_store(store)
    return f"""# sitepair broker configuration. Durations: 30s, 10m, 24h, 5d.
vault = "{vault}"

[listen]
# Agents enroll here (server TLS; the registration secret authenticates the agent).
enrollment = "{net.listen.enrollment}"
# Control stream and admin API (mutual TLS).
control = "{net.listen.control}"

[advertise]
# Addresses written into credentials files and given to agents; empty = the listen addresses.
# Needed when listening on 0.0.0.0 or ::, which another machine cannot dial.
enrollment = [{strings(net.advertise.enrollment)}]
control = [{strings(net.advertise.control)}]

[certificates]
agent_lifetime = "24h"       # agents renew at half life
operator_lifetime = "365d"
server_lifetime = "90d"      # the broker renews its own at half life, without a restart
# The serving certificate's names and IPs (agents verify "broker.sitepair", always present).
server_names = [{strings(net.server_names)}]
server_ips = [{strings(net.server_ips)}]

[keys]
default_validity = "5d"
max_validity = "90d"

[heartbeat]
interval = "10s"
missed = 3                   # a server is disconnected after this many missed heartbeats

[limits]
max_concurrent_rpcs = 20000
max_streams_per_connection = 32
max_message_bytes = 8388608
max_concurrent_enrollments = 256

[log]
level = "info"
format = "json"              # or "text"
file = ""                    # empty = standard error
max_bytes = 104857600        # rotate the file at this size (0 = never; logrotate + SIGHUP)
backups = 5                  # rotated files kept

[health]
lag_warning_cycles = 3.0     # Warning: no successful cycle for this many copy intervals
lag_critical_cycles = 12.0   # Critical beyond this many
offline_critical_after = "5m"  # a host offline turns its VMs Warning, then Critical after this
missed_rate_warning = 0.2    # Warning: more than this fraction of cycles missed in the window
window = "1h"
certificate_warning_fraction = 0.25
clock_skew_warning = "1m"    # a host's clock this far from the broker's: Warning
clock_skew_critical = "4m"   # and Critical (tickets allow 5 min)

[verify]
# Compare every protected replica with its source, block by block, this often ("0" = never).
# Each verification reads the VM's disks on both hosts; at most `concurrent` run at once.
interval = "7d"
repair = true                # send mismatching blocks again (false: report them only)
concurrent = 1
retry = "1h"                 # after a failed verification, wait this long before the next try
check_every = "1m"

[store]
# "sqlite": <home>/broker.db, for one broker. "postgresql": several brokers may share the
# database; they elect a leader for the periodic work (see docs/operations.md).
backend = "{store.backend}"
# PostgreSQL only, without a password: SITEPAIR_DB_PASSWORD or ~/.pgpass supplies it.
dsn = {_toml_string(store.dsn)}
# PostgreSQL only: a leader lease's length; renewed every third of it.
leader_lease = "{format_duration(store.leader_lease)}"

[metrics]
# A Prometheus endpoint (docs/metrics.md). Off by default; a listen address that is not
# loopback needs tls_cert and tls_key (client_ca: scrapers must show a certificate it issued).
enabled = false
listen = "127.0.0.1:9464"
tls_cert = ""
tls_key = ""
client_ca = ""

[dashboard]
# The web dashboard (docs/dashboard.md), HTTPS only. Off by default. Operators sign in with
# their admin certificate, or with `sitepair-broker operators login --browser`.
enabled = false
listen = "127.0.0.1:{DASHBOARD_PORT}"
# Empty: the broker's own serving certificate (tls/), renewed and reloaded automatically; or
# a certificate and key from your own PKI (PEM; both or neither).
tls_cert = ""
tls_key = ""
session_lifetime = "8h"      # a browser session, at most; 1m to 24h
"""


def _toml_string(value: str) -> str:
    """A TOML basic string (a DSN may hold quotes or backslashes)."""
    escaped = value.replace("\\", "\\\\").replace('"', '\\"')
    return f'"{escaped}"'
