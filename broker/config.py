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
from sitepair import log as sitepair_log
from sitepair import pki
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
    """Addresses written into credentials files and handed to agents; empty = the listen ones."""

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
    #: Extra DNS names and IP addresses for the broker's serving certificate.
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
    check_store(cfg.store, f"{source} [store]")
    check_metrics(cfg.metrics, f"{source} [metrics]")
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
) -> str:
    """The commented broker.toml that ``init`` writes."""
    name_list = ", ".join(f'"{n}"' for n in names)
    store = store or StoreConfig()
    check_store(store)
    return f"""# sitepair broker configuration. Durations: 30s, 10m, 24h, 5d.
vault = "{vault}"

[listen]
# Agents enroll here (server TLS; the registration secret authenticates the agent).
enrollment = "{enrollment}"
# Control stream and admin API (mutual TLS).
control = "{control}"

[advertise]
# Addresses written into credentials files and given to agents; empty = the listen addresses.
enrollment = []
control = []

[certificates]
agent_lifetime = "24h"       # agents renew at half life
operator_lifetime = "365d"
server_lifetime = "90d"      # the broker renews its own at half life, without a restart
server_names = [{name_list}]
server_ips = ["127.0.0.1"]

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
"""


def _toml_string(value: str) -> str:
    """A TOML basic string (a DSN may hold quotes or backslashes)."""
    escaped = value.replace("\\", "\\\\").replace('"', '\\"')
    return f'"{escaped}"'
