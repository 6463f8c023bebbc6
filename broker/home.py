"""The broker's home folder: where each file lives, and ``init`` that creates it.

::

    <home>/broker.toml            configuration
    <home>/broker.db              the embedded store (SQLite)
    <home>/ca/ca.key, ca.crt      the vault's certificate authority (key 0600, folder 0700): the
                                  CA that issues
    <home>/ca/next.*, previous.*  during a CA rotation, the other CA every host trusts too
    <home>/ca/rotation.json       the rotation's phase and generation (docs/security.md)
    <home>/ca/archive/<id>/       CAs a finished rotation retired, kept to read old signatures
    <home>/tls/server.key, .crt   the broker's serving certificate (renewed automatically)
    <home>/tickets/signing.key    Ed25519 key that signs replication tickets
    <home>/admin/                 a local operator's credentials (see ``broker.client.Profile``)
    <home>/run/broker.json        written by ``serve``: pid and the addresses actually bound
    <home>/run/home.lock          locked by ``serve`` (and briefly ``init``): one broker per home

The lock (:mod:`sitepair.homelock`) is per home, not per store: brokers on different homes may
share one PostgreSQL database.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from sitepair import homelock


@dataclasses.dataclass(frozen=True)
class BrokerHome:
    root: Path

    @property
    def config(self) -> Path:
        return self.root / "broker.toml"

    @property
    def database(self) -> Path:
        return self.root / "broker.db"

    @property
    def ca_dir(self) -> Path:
        return self.root / "ca"

    @property
    def ca_key(self) -> Path:
        return self.ca_dir / "ca.key"

    @property
    def ca_cert(self) -> Path:
        return self.ca_dir / "ca.crt"

    @property
    def ca_rotation(self) -> Path:
        return self.ca_dir / "rotation.json"

    @property
    def ca_archive(self) -> Path:
        return self.ca_dir / "archive"

    @property
    def tls_dir(self) -> Path:
        return self.root / "tls"

    @property
    def server_key(self) -> Path:
        return self.tls_dir / "server.key"

    @property
    def server_cert(self) -> Path:
        return self.tls_dir / "server.crt"

    @property
    def ticket_key(self) -> Path:
        return self.root / "tickets" / "signing.key"

    @property
    def admin_dir(self) -> Path:
        return self.root / "admin"

    @property
    def run_file(self) -> Path:
        return self.root / "run" / "broker.json"

    @property
    def lock_file(self) -> Path:
        return homelock.lock_path(self.root)
