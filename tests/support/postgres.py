"""A throwaway PostgreSQL server of our own: ``initdb`` + ``pg_ctl`` in a temp folder.

Used by the store tests (``tests/store_pg/conftest.py``) and the cross-site harness
(``--store postgresql``). The server comes from the Debian ``postgresql`` package
(``scripts/setup.sh`` installs it); the distribution's own cluster is never used or needed. As
root, ``initdb`` and the server run as the ``postgres`` user (PostgreSQL refuses to run as root)
with the data folder owned by that user. It listens on a free loopback port with password
(SCRAM) authentication over TCP, and on a private Unix socket (trust) for its owner's own work.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

#: The role the broker logs in as, and its password (tests only).
ROLE = "sitepair"
PASSWORD = "test-only-secret"  # a throwaway server on loopback, deleted after the run


def bin_dir() -> Path | None:
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))
    if found:
        return found[-1].parent
    initdb = shutil.which("initdb")
    return Path(initdb).resolve().parent if initdb else None


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class PostgresCluster:
    """A PostgreSQL server of our own: created, started, asked for databases, removed."""

    def __init__(self, binaries: Path) -> None:
        self.bin_dir = binaries
        self.root = Path(tempfile.mkdtemp(prefix="sitepair-pg-"))
        self.data = self.root / "data"
        self.socket_dir = self.root / "sock"
        self.port = _free_port()
        self.log = self.root / "server.log"
        self._as_postgres = os.geteuid() == 0
        self._names = itertools.count(1)
        self.running = False

    # -- running the server's tools ------------------------------------------------------
    def _run(self, *args: str, timeout: float = 60) -> None:
        cmd = [str(self.bin_dir / args[0]), *args[1:]]
        if self._as_postgres:
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        if proc.returncode != 0:
            raise RuntimeError(f"{args[0]} failed ({proc.returncode}): {proc.stderr[-2000:]}")

    def start(self) -> None:
        self.socket_dir.mkdir()
        if self._as_postgres:
            user = pwd.getpwnam("postgres")
            # The temp folder is root's and private: let the postgres user in, and own its part.
            self.root.chmod(0o755)
            os.chown(self.socket_dir, user.pw_uid, user.pw_gid)
            self.data.mkdir(mode=0o700)
            os.chown(self.data, user.pw_uid, user.pw_gid)
            self.log.touch()
            os.chown(self.log, user.pw_uid, user.pw_gid)
        pwfile = self.root / "pw"
        pwfile.write_text(PASSWORD + "\n")
        if self._as_postgres:
            os.chown(pwfile, pwd.getpwnam("postgres").pw_uid, -1)
        self._run(
            "initdb",
            "-D",
            str(self.data),
            "-U",
            "postgres",
            "--pwfile",
            str(pwfile),
            "--auth-local=trust",
            "--auth-host=scram-sha-256",
            "--encoding=UTF8",
            "--locale=C.UTF-8",
            "--no-sync",
        )
        pwfile.unlink()
        options = " ".join(
            [
                f"-p {self.port}",
                "-c listen_addresses=127.0.0.1",
                f"-c unix_socket_directories={self.socket_dir}",
                # A test server: durability buys nothing here, speed does.
                "-c fsync=off",
                "-c synchronous_commit=off",
                "-c full_page_writes=off",
                "-c max_connections=200",
            ]
        )
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.log), "-o", options, "-w", "start")
        self.running = True
        self.admin_sql(f"CREATE ROLE {ROLE} LOGIN PASSWORD '{PASSWORD}'")

    def stop(self) -> None:
        if self.running:
            with contextlib.suppress(RuntimeError, subprocess.TimeoutExpired):
                self._run("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop")
            self.running = False
        shutil.rmtree(self.root, ignore_errors=True)

    # -- databases -----------------------------------------------------------------------
    def admin_dsn(self, dbname: str = "postgres") -> str:
        """Superuser access over the private socket (trust), for the fixture's own work."""
        return f"host={self.socket_dir} port={self.port} user=postgres dbname={dbname}"

    def admin_sql(self, sql: str, dbname: str = "postgres") -> None:
        import psycopg

        with psycopg.connect(self.admin_dsn(dbname), autocommit=True) as conn:
            conn.execute(sql)

    def create_database(self) -> str:
        """A new empty database owned by the test role; returns the broker's DSN for it."""
        name = f"t{next(self._names)}"
        self.admin_sql(f"CREATE DATABASE {name} OWNER {ROLE} STRATEGY FILE_COPY")
        return f"postgresql://{ROLE}@127.0.0.1:{self.port}/{name}"

    def admin_query(self, sql: str, dbname: str = "postgres") -> list[tuple[object, ...]]:
        """Rows of ``sql`` run as the superuser (for checks)."""
        import psycopg

        with psycopg.connect(self.admin_dsn(dbname), autocommit=True) as conn:
            return list(conn.execute(sql).fetchall())

    def socket_dsn(self, dbname: str) -> str:
        """The role's DSN for ``dbname`` over the Unix socket, which reaches the server from
        inside any network namespace (the harness's broker runs in one)."""
        return f"postgresql://{ROLE}@/{dbname}?host={self.socket_dir}&port={self.port}"


def unavailable_reason() -> str | None:
    """None when a throwaway server can be started here, else why not."""
    if bin_dir() is None:
        return (
            "PostgreSQL server binaries (initdb, pg_ctl) not found: install the Debian "
            "`postgresql` package (scripts/setup.sh does)"
        )
    if os.geteuid() == 0 and shutil.which("runuser") is None:
        return "running as root needs `runuser` to start PostgreSQL as its own user"
    return None
