"""``sitepair-broker ca``: the vault's CA, and rotating it without re-registering a host
(:mod:`broker.ca_rotation`; docs/security.md, "Rotating the CA")."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from broker.cli_support import AddCommand, Subcommands, admin_client, ts
from sitepair.cliutil import EXIT_OK, print_json, print_table
from sitepair.fsutil import atomic_write
from sitepair.protoconv import seconds
from sitepair.v1 import admin_pb2

_PHASES = {
    "start": admin_pb2.RotateCaRequest.START,
    "activate": admin_pb2.RotateCaRequest.ACTIVATE,
    "finish": admin_pb2.RotateCaRequest.FINISH,
}


def _short(key_id: str) -> str:
    return key_id[:16] if key_id else "-"


def status_to_json(status: admin_pb2.CaStatus) -> dict[str, Any]:
    """The status as ``--json`` prints it: times as ISO 8601 and Unix seconds, the bundle as
    PEM text."""
    return {
        "phase": status.phase,
        "generation": status.generation,
        "bundle_sha256": status.bundle_sha256,
        "bundle_pem": status.bundle_pem.decode("ascii"),
        "certificates": [
            {
                "id": c.id,
                "subject": c.subject,
                "fingerprint_sha256": c.fingerprint_sha256,
                "issuing": c.issuing,
                "not_before": ts(c.not_before),
                "not_after": ts(c.not_after),
                "not_after_unix": seconds(c.not_after),
            }
            for c in status.certificates
        ],
        "hosts": [
            {
                "id": h.id,
                "name": h.name,
                "site": h.site,
                "connected": h.connected,
                "bundle_sha256": h.bundle_sha256,
                "bundle_current": h.bundle_current,
                "issuer_id": h.issuer_id,
                "issuer_current": h.issuer_current,
                "certificate_not_after": ts(h.certificate_not_after),
                "error": h.error,
            }
            for h in status.hosts
        ],
        "note": status.note,
        "commands_sent": status.commands_sent,
    }


def _print_status(status: admin_pb2.CaStatus) -> None:
    print(f"phase        {status.phase} (generation {status.generation})")
    print(f"bundle       sha256 {status.bundle_sha256}")
    print()
    print_table(
        ["CA", "ROLE", "NOT AFTER", "SUBJECT"],
        [
            [_short(c.id), "issuing" if c.issuing else "trusted", ts(c.not_after), c.subject]
            for c in status.certificates
        ],
    )
    print()
    print_table(
        ["HOST", "SITE", "STATE", "BUNDLE", "CERTIFICATE FROM", "CERT NOT AFTER", "REFUSED"],
        [
            [
                h.name,
                h.site,
                "connected" if h.connected else "disconnected",
                "current" if h.bundle_current else ("older" if h.bundle_sha256 else "none"),
                ("current CA" if h.issuer_current else _short(h.issuer_id) or "older CA"),
                ts(h.certificate_not_after),
                h.error,
            ]
            for h in status.hosts
        ],
    )


def cmd_status(args: argparse.Namespace) -> int:
    with admin_client(args) as c:
        status = c.call(c.ca.GetCaStatus, admin_pb2.GetCaStatusRequest())
    if args.json:
        print_json(status_to_json(status))
    else:
        _print_status(status)
    return EXIT_OK


def cmd_rotate(args: argparse.Namespace) -> int:
    request = admin_pb2.RotateCaRequest(phase=_PHASES[args.phase], force=args.force)
    with admin_client(args) as c:
        status = c.call(c.ca.RotateCa, request, timeout=max(args.timeout, 120.0))
    if args.json:
        print_json(status_to_json(status))
        return EXIT_OK
    print(f"CA rotation: {args.phase} done; {status.commands_sent} host(s) told")
    print()
    _print_status(status)
    print()
    print(status.note)
    return EXIT_OK


def cmd_bundle(args: argparse.Namespace) -> int:
    with admin_client(args) as c:
        status = c.call(c.ca.GetCaStatus, admin_pb2.GetCaStatusRequest())
    if args.out:
        atomic_write(Path(args.out), status.bundle_pem)
        if args.json:
            print_json({"out": args.out, "bundle_sha256": status.bundle_sha256})
        else:
            print(f"trust bundle ({len(status.certificates)} CA) written to {args.out}")
        return EXIT_OK
    if args.json:
        print_json(
            {"bundle_sha256": status.bundle_sha256, "bundle_pem": status.bundle_pem.decode()}
        )
    else:
        print(status.bundle_pem.decode("ascii"), end="")
    return EXIT_OK


def register(sub: Subcommands, add: AddCommand) -> None:
    """Add the ``ca`` commands."""
    ca = sub.add_parser("ca", help="the vault's CA: status, trust bundle, rotation")
    group = ca.add_subparsers(dest="sub", required=True, metavar="ACTION")
    add(group, "status", cmd_status, "the CAs, the rotation's phase, and each host's trust")
    sp = add(group, "bundle", cmd_bundle, "print the trust bundle (the CAs to trust), as PEM")
    sp.add_argument(
        "--out", metavar="FILE", help="write it to FILE (e.g. an operator profile's ca.crt)"
    )
    sp = add(group, "rotate", cmd_rotate, "run one phase of a CA rotation")
    sp.add_argument(
        "phase",
        choices=list(_PHASES),
        help="start: make a new CA every host trusts beside the current one; activate: the "
        "new CA issues and every host renews; finish: stop trusting the old CA",
    )
    sp.add_argument(
        "--force",
        action="store_true",
        help="go on although hosts have not confirmed the bundle (activate) or still hold a "
        "certificate of the old CA (finish); those hosts must register again",
    )
