"""The dashboard's TLS: its certificate, reloaded when it changes, and operator certificates.

By default the dashboard serves the broker's own serving certificate (``<home>/tls``), which the
broker renews at half life; ``[dashboard] tls_cert``/``tls_key`` name a certificate from the
operator's own PKI instead (a name browsers already trust). Either way, client certificates are
asked for but optional (``CERT_OPTIONAL``): a browser without one may still sign in with a login
token. One presented is verified against the vault's trust bundle, the same one the gRPC ports
accept (both CAs during a rotation), before any request is read; one of another CA, or expired,
ends the handshake.

Reloading without a restart: before each handshake (the ``sni_callback``, which OpenSSL calls
for every ClientHello, with or without SNI) the files' stamps and the CA's generation are
compared with the loaded ones; on a change a new :class:`ssl.SSLContext` is built and the
connection switched to it. Established connections keep theirs, as on the gRPC ports.
"""

from __future__ import annotations

import logging
import ssl
from pathlib import Path

from broker.ca import CertificateAuthority, ServerCertificate
from broker.config import DashboardConfig
from broker.home import BrokerHome
from sitepair.errors import ConfigError

log = logging.getLogger("sitepair.broker.web")

_Stamp = tuple[int, int, int, int, int]


class DashboardTls:
    """The server-side :class:`ssl.SSLContext` of the dashboard, following its files."""

    def __init__(
        self,
        config: DashboardConfig,
        home: BrokerHome,
        ca: CertificateAuthority,
        server_cert: ServerCertificate,
    ) -> None:
        self._ca = ca
        self._server_cert = server_cert
        self.own_certificate = not config.tls_cert
        if self.own_certificate:
            self.cert_path, self.key_path = home.server_cert, home.server_key
        else:
            self.cert_path = _configured(home, config.tls_cert, "tls_cert")
            self.key_path = _configured(home, config.tls_key, "tls_key")
        self._stamp: _Stamp | None = None
        self._current: ssl.SSLContext | None = None

    def context(self) -> ssl.SSLContext:
        """The context to listen with (blocking: reads the files). ConfigError if the
        certificate or key cannot be used."""
        if self.own_certificate:
            self._server_cert.ensure_fresh()
        try:
            first = self._build()
        except (OSError, ssl.SSLError, ValueError) as exc:
            raise ConfigError(
                f"the dashboard cannot use {self.cert_path} with {self.key_path}: {exc}",
                hint="[dashboard] tls_cert must be a PEM certificate (chain) and tls_key its "
                "PEM private key, readable by the broker",
            ) from exc
        first.sni_callback = self._before_handshake
        return first

    def _file_stamp(self) -> _Stamp:
        c, k = self.cert_path.stat(), self.key_path.stat()
        return (c.st_mtime_ns, c.st_size, k.st_mtime_ns, k.st_size, self._ca.generation)

    def _build(self) -> ssl.SSLContext:
        self._stamp = self._file_stamp()  # before reading: a change while reading shows next time
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.load_cert_chain(self.cert_path, self.key_path)
        context.verify_mode = ssl.CERT_OPTIONAL
        context.load_verify_locations(cadata=self._ca.pem.decode("ascii"))
        self._current = context
        return context

    def _before_handshake(
        self, connection: ssl.SSLObject | ssl.SSLSocket, server_name: str | None, _: ssl.SSLContext
    ) -> None:
        try:
            if self._file_stamp() != self._stamp:
                self._build()
                log.info(
                    "dashboard certificate loaded", extra={"fields": {"cert": str(self.cert_path)}}
                )
        except (OSError, ssl.SSLError, ValueError) as exc:
            # Keep serving with what is loaded (said once per change of the files).
            log.error(
                "cannot reload the dashboard certificate", extra={"fields": {"error": str(exc)}}
            )
        assert self._current is not None
        connection.context = self._current


def _configured(home: BrokerHome, value: str, what: str) -> Path:
    path = Path(value)
    path = path if path.is_absolute() else home.root / path
    if not path.is_file():
        raise ConfigError(
            f"[dashboard] {what} {path} does not exist",
            hint=f"write the PEM file there, or change [dashboard] {what} "
            "(empty tls_cert and tls_key: the broker's own certificate)",
        )
    return path
