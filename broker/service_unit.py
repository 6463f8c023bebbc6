"""The broker's systemd unit: ``sitepair-broker serve --home DIR`` under a sandbox.

Writable: the home only (store, certificates, run file, log file), plus the folder of a log
file configured outside it. ``EnvironmentFile=-/etc/sitepair/NAME.env`` carries
``SITEPAIR_DB_PASSWORD`` for a PostgreSQL store (broker/config.py: the password is never in the
DSN); the file is optional, so a SQLite broker needs none.
"""

from __future__ import annotations

from pathlib import Path

from broker import config as config_mod
from broker.home import BrokerHome
from sitepair.service.cli import InstallOptions, ServiceProgram
from sitepair.service.systemd import UnitSpec, entry_point

PROG = "sitepair-broker"


def unit(options: InstallOptions) -> UnitSpec:
    home = BrokerHome(options.home)
    cfg = config_mod.load(home.config)  # a folder that is no broker home stops here
    writable = [home.root]
    if cfg.log.file:
        writable.append(Path(cfg.log.file).absolute().parent)
    return UnitSpec(
        name=options.name,
        description=f"sitepair broker (vault {cfg.vault})",
        exec_start=(*entry_point(PROG, "broker.cli"), "serve", "--home", str(home.root)),
        writable=tuple(writable),
        user=options.user,
        environment_file=Path("/etc/sitepair") / f"{options.name}.env",
        # The broker stops in a few seconds: a 5 s drain, then the store closes.
        stop_timeout_sec=30,
    )


PROGRAM = ServiceProgram(prog=PROG, unit=unit)
