"""Authorization of every RPC from the verified peer certificate.

gRPC has already checked the certificate chains to our CA (mutual TLS with
``require_client_auth``); here we check what the identity may do: the vault must be ours, the
role must be one the method accepts, and a removed server or a revoked operator is refused at
once even though its certificate has not expired yet (the deny-lists; revoked operators are
kept in the store and followed by :mod:`broker.operators`).

This runs before a method is authorized, so what it logs or echoes from the certificate is cut
to a short bound (:func:`~sitepair.logsafe.shown`), like every request field a caller controls.
"""

from __future__ import annotations

import logging

from sitepair import pki
from sitepair.errors import PermissionDenied
from sitepair.logsafe import shown

log = logging.getLogger("sitepair.broker.auth")


class BrokerAuthorizer:
    def __init__(
        self,
        vault: str,
        *,
        removed_servers: set[str] | None = None,
        revoked_operators: set[str] | None = None,
    ) -> None:
        self.vault = vault
        self._removed_servers = set(removed_servers or ())
        self._revoked_operators = set(revoked_operators or ())

    def deny_server(self, server_id: str) -> None:
        self._removed_servers.add(server_id)

    def deny_operators(self, operator_ids: set[str]) -> None:
        """Refuse these operators' certificates from now on (revocation is never undone)."""
        self._revoked_operators |= operator_ids

    def authorize(self, identity: pki.Identity, roles: frozenset[pki.Role]) -> None:
        if identity.vault != self.vault:
            raise PermissionDenied(
                f"certificate belongs to vault {shown(identity.vault)!r}; "
                f"this broker serves {self.vault!r}"
            )
        if identity.role not in roles:
            allowed = ", ".join(sorted(r.value for r in roles))
            log.warning(
                "role refused",
                extra={"fields": {"identity": shown(identity.uri, 256), "allowed": allowed}},
            )
            raise PermissionDenied(
                f"a certificate with role {identity.role.value!r} may not call this API "
                f"(allowed: {allowed})"
            )
        if identity.role == pki.Role.ADMIN and identity.id in self._revoked_operators:
            raise PermissionDenied(
                f"operator {shown(identity.id)} was revoked; this certificate no longer "
                "operates the vault",
                hint="ask another operator for a new profile: sitepair-broker operators add NAME",
            )
        if identity.role == pki.Role.AGENT and identity.id in self._removed_servers:
            raise PermissionDenied(
                f"server {shown(identity.id)} was removed from the vault",
                hint="register the host again with a new registration key",
            )
