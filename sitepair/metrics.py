"""The Prometheus endpoint the broker and the agent share: its ``[metrics]`` settings and server.

Metrics are off by default. When on, the endpoint listens on loopback unless TLS is configured:
metrics name every protected VM and host, which is not for the whole network to read, and
``prometheus_client`` has no authentication of its own beyond TLS client certificates. So a
non-loopback ``listen`` needs ``tls_cert`` and ``tls_key``; ``client_ca`` then also requires
every scraper to present a certificate that CA issued (mutual TLS).

Each process builds its own :class:`~prometheus_client.CollectorRegistry` (never the library's
global one), so several brokers and agents can run in one test process, each with its metrics.
The exposition itself is ``prometheus_client``'s: this module only checks the settings and runs
its HTTP server in a thread, with :meth:`MetricsServer.shutdown` to stop it.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import logging
import ssl
import threading
from pathlib import Path
from typing import Any
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, start_http_server

from sitepair.errors import ConfigError

log = logging.getLogger("sitepair.metrics")

#: The default ports: the broker's and the agent's (9464/9465: next to OpenTelemetry's 9464
#: convention for an exporter, and unused by sitepair's other ports).
BROKER_PORT = 9464
AGENT_PORT = 9465


@dataclasses.dataclass(frozen=True)
class MetricsConfig:
    """``[metrics]``: the Prometheus endpoint. Relative paths are relative to the home."""

    #: Serve metrics at all (off by default).
    enabled: bool = False
    #: HOST:PORT to listen on; a host that is not loopback needs ``tls_cert`` and ``tls_key``.
    #: Port 0 picks a free port (tests).
    listen: str = f"127.0.0.1:{BROKER_PORT}"
    #: PEM certificate (chain) and key of the endpoint; both or neither. Set: HTTPS only.
    tls_cert: str = ""
    tls_key: str = ""
    #: PEM CA bundle: scrapers must present a client certificate it issued (mutual TLS).
    client_ca: str = ""


@dataclasses.dataclass(frozen=True)
class AgentMetricsConfig(MetricsConfig):
    """The agent's ``[metrics]``: the same settings, its own default port."""

    listen: str = f"127.0.0.1:{AGENT_PORT}"


def split_address(address: str, where: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[v6]:PORT`` for IPv6) as (host, port); a ConfigError otherwise."""
    host, sep, port_text = address.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    if not sep or not host or not port_text.isdigit() or int(port_text) > 65535:
        raise ConfigError(
            f"{where} listen = {address!r} is not HOST:PORT",
            hint='for example listen = "127.0.0.1:9464"',
        )
    return host, int(port_text)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a DNS name may resolve to anything


def check(config: MetricsConfig, where: str = "[metrics]") -> None:
    """Refuse settings that cannot work or would expose metrics without TLS."""
    host, _ = split_address(config.listen, where)
    if bool(config.tls_cert) != bool(config.tls_key):
        raise ConfigError(f"{where} tls_cert and tls_key go together: set both, or neither")
    if config.client_ca and not config.tls_cert:
        raise ConfigError(f"{where} client_ca needs tls_cert and tls_key (mutual TLS is TLS)")
    if config.enabled and not config.tls_cert and not is_loopback(host):
        raise ConfigError(
            f"{where} listen = {config.listen!r} is not a loopback address, and metrics "
            "without TLS must stay on this machine",
            hint="set tls_cert and tls_key (and client_ca to require scraper certificates), "
            'or listen on "127.0.0.1:PORT" and scrape through a local Prometheus or proxy',
        )


def parse_table(data: Any, cls: type[MetricsConfig], where: str) -> MetricsConfig:
    """``[metrics]`` of a parsed TOML document as ``cls``, checked."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where} must be a table")
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise ConfigError(f"unknown setting(s) in {where}: {', '.join(unknown)}")
    defaults = cls()
    for name, value in data.items():
        if type(value) is not type(getattr(defaults, name)):
            kind = "true or false" if name == "enabled" else "a string"
            raise ConfigError(f"{where} {name} must be {kind}")
    config = cls(**data)
    check(config, where)
    return config


class MetricsServer:
    """``prometheus_client``'s HTTP(S) server for one registry, in a thread of its own."""

    def __init__(self, config: MetricsConfig, registry: CollectorRegistry, *, base: Path) -> None:
        self.config = config
        self.registry = registry
        self.base = base
        self._server: WSGIServer | None = None
        self._thread: threading.Thread | None = None
        #: HOST:PORT actually bound (the port is known after :meth:`start`).
        self.address = ""

    def _path(self, value: str, what: str) -> str | None:
        if not value:
            return None
        path = Path(value)
        path = path if path.is_absolute() else self.base / path
        if not path.is_file():
            raise ConfigError(
                f"[metrics] {what} {path} does not exist",
                hint=f"write the PEM file there, or change [metrics] {what}",
            )
        return str(path)

    def start(self) -> str:
        """Bind and serve (blocking while it binds); returns the bound HOST:PORT."""
        check(self.config)
        host, port = split_address(self.config.listen, "[metrics]")
        certfile = self._path(self.config.tls_cert, "tls_cert")
        keyfile = self._path(self.config.tls_key, "tls_key")
        client_ca = self._path(self.config.client_ca, "client_ca")
        try:
            server, thread = start_http_server(
                port,
                addr=host,
                registry=self.registry,
                certfile=certfile,
                keyfile=keyfile,
                client_cafile=client_ca,
                client_auth_required=client_ca is not None,
                tls_min_version=ssl.TLSVersion.TLSv1_2 if certfile else None,
            )
        except ssl.SSLError as exc:
            raise ConfigError(
                f"[metrics] cannot use the TLS certificate or key: {exc}",
                hint="tls_cert must be a PEM certificate and tls_key its PEM private key",
            ) from exc
        except OSError as exc:
            raise ConfigError(
                f"[metrics] cannot listen on {self.config.listen}: {exc.strerror or exc}",
                hint="is the port in use by another sitepair process? Set another [metrics] listen",
            ) from exc
        self._server, self._thread = server, thread
        shown = f"[{host}]" if ":" in host else host
        self.address = f"{shown}:{server.server_port}"
        log.info(
            "metrics endpoint listening",
            extra={
                "fields": {
                    "address": self.address,
                    "tls": certfile is not None,
                    "client_certificates": client_ca is not None,
                }
            },
        )
        return self.address

    def shutdown(self) -> None:
        """Stop serving and close the socket (idempotent; blocking)."""
        server, self._server = self._server, None
        if server is None:
            return
        server.shutdown()
        server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
