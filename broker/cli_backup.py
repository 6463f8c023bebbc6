"""``sitepair-broker backup`` and ``restore``: a consistent copy of a broker home, and a new home
made from one (:mod:`broker.backup` does the work; docs/operations.md, "Backup and restore")."""

from __future__ import annotations

import argparse
from pathlib import Path

from broker import backup as backup_mod
from broker.cli_support import PROG, AddCommand, Subcommands
from broker.home import BrokerHome
from sitepair.cliutil import EXIT_OK, print_json
from sitepair.errors import InvalidArgument


def cmd_backup(args: argparse.Namespace) -> int:
    if not args.home:
        raise InvalidArgument("backup needs --home DIR (the broker home to back up)")
    manifest = backup_mod.backup(BrokerHome(Path(args.home)), Path(args.dest))
    if args.json:
        print_json({"backup": str(args.dest), **manifest.to_json()})
        return EXIT_OK
    size = sum(f.size for f in manifest.files)
    print(f"backup of vault {manifest.vault} written to {args.dest}")
    print(f"  store          {manifest.store_backend}, schema version {manifest.schema_version}")
    print(f"  files          {len(manifest.files)}, {size} bytes, checksums in manifest.json")
    print(f"restore it with: {PROG} restore {args.dest} --home NEWDIR")
    return EXIT_OK


def cmd_restore(args: argparse.Namespace) -> int:
    if not args.home:
        raise InvalidArgument("restore needs --home NEWDIR (a new or empty folder)")
    manifest = backup_mod.restore(Path(args.src), Path(args.home), dsn=args.dsn)
    if args.json:
        print_json({"home": str(args.home), **manifest.to_json()})
        return EXIT_OK
    print(f"vault {manifest.vault} restored into {args.home}")
    print(f"  from backup    {args.src} (sitepair {manifest.sitepair_version})")
    print(f"  store          {manifest.store_backend}, schema version {manifest.schema_version}")
    print(f"start it with:   {PROG} serve --home {args.home}")
    return EXIT_OK


def register(sub: Subcommands, add: AddCommand) -> None:
    sp = add(sub, "backup", cmd_backup, "copy a broker home consistently, even while it serves")
    sp.add_argument("dest", metavar="DEST", help="new folder to write the backup into")
    sp = add(sub, "restore", cmd_restore, "make a new broker home (--home) from a backup")
    sp.add_argument("src", metavar="SRC", help="the backup folder")
    sp.add_argument(
        "--dsn",
        help="PostgreSQL only: restore into this empty database instead of the backup's "
        "(without a password: SITEPAIR_DB_PASSWORD or ~/.pgpass supplies it)",
    )
