"""Back up a broker while it runs, and restore the backup into a new home.

A backup is one folder, every file mode 0600 (folders 0700)::

    manifest.json        what follows, with versions, the schema version and a SHA-256 per file
    broker.toml          the configuration
    ca/ca.key, ca.crt    the vault's certificate authority: the root of trust of every identity
    ca/...               a CA rotation's files too: the other CA, rotation.json, the archive
    tickets/signing.key  the key that signs replication tickets
    admin/               the home's local operator profile
    store/broker.db      the SQLite store, or
    store/broker.pgdump  the PostgreSQL store (``pg_dump`` custom format)

The store copy is consistent while the broker writes: SQLite's online backup API copies one
read snapshot (never a file copy of a live WAL database, which can tear), and ``pg_dump`` reads
one snapshot of the vault's schema. The serving certificate (``tls/``) is not kept: the
restored broker issues a new one at its first start, for the names its ``broker.toml`` lists.
``run/`` is a running broker's, never a backup's.

The backup is written into a hidden folder beside ``DEST`` and renamed to ``DEST`` once
complete, so a folder called ``DEST`` is always a whole backup.

``restore`` checks the manifest and every checksum before it writes anything, refuses a backup
whose store schema is newer than this broker knows, and writes into an empty (or new) home under
the home's lock. A PostgreSQL backup is restored with ``pg_restore`` into a database that holds
no vault (by default the one the backup's ``broker.toml`` names; ``--dsn`` another, which the
restored ``broker.toml`` then names). A restore that fails removes what it wrote.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import re
import shutil
import sqlite3
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from broker import config as config_mod
from broker.home import BrokerHome
from broker.store.base import migrations
from sitepair import PROTOCOL_VERSION, __version__
from sitepair.clock import iso
from sitepair.errors import FailedPrecondition, InvalidArgument, NotFound
from sitepair.fsutil import ensure_private_dir, fsync_dir
from sitepair.homelock import HomeLock

#: What ``manifest.json`` says it is, and the newest layout this code reads.
FORMAT = "sitepair-broker-backup"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
SQLITE_FILE = "store/broker.db"
PGDUMP_FILE = "store/broker.pgdump"
#: Where the PostgreSQL password comes from (as the store takes it; never the DSN).
PASSWORD_ENV = "SITEPAIR_DB_PASSWORD"  # noqa: S105 - the variable's name, not a password
#: Folders of the home a backup keeps whole, beside broker.toml.
_HOME_DIRS = ("ca", "tickets", "admin")
#: The top-level names a manifest may list (anything else is refused, never written).
_ALLOWED_TOP = frozenset({"broker.toml", "store", *_HOME_DIRS})
_CHUNK = 1 << 20


class BackupError(FailedPrecondition):
    """A backup cannot be made, or a backup cannot be restored as it is."""


@dataclasses.dataclass(frozen=True)
class BackupFile:
    path: str
    sha256: str
    size: int
    mode: int


@dataclasses.dataclass(frozen=True)
class Manifest:
    """What ``manifest.json`` holds."""

    vault: str
    created_at: float
    sitepair_version: str
    protocol_version: int
    store_backend: str
    schema_version: int
    files: tuple[BackupFile, ...]
    format_version: int = FORMAT_VERSION

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "format_version": self.format_version,
            "vault": self.vault,
            "created_at": iso(self.created_at),
            "created_at_unix": self.created_at,
            "sitepair_version": self.sitepair_version,
            "protocol_version": self.protocol_version,
            "store": {"backend": self.store_backend, "schema_version": self.schema_version},
            "files": {
                f.path: {"sha256": f.sha256, "size": f.size, "mode": f"{f.mode:04o}"}
                for f in self.files
            },
        }

    @classmethod
    def load(cls, folder: Path) -> Manifest:
        path = folder / MANIFEST
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise BackupError(
                f"{folder} is not a sitepair broker backup: it has no {MANIFEST}",
                hint="name the folder `sitepair-broker backup` wrote",
            ) from None
        except (OSError, ValueError) as exc:
            raise BackupError(f"backup file {path} cannot be read: {exc}") from exc
        try:
            if doc.get("format") != FORMAT:
                raise BackupError(f"{path} is not a sitepair broker backup manifest")
            version = int(doc["format_version"])
            if version > FORMAT_VERSION:
                raise BackupError(
                    f"backup {folder} has layout version {version}, newer than this sitepair "
                    f"reads ({FORMAT_VERSION})",
                    hint=f"restore it with sitepair {doc.get('sitepair_version')} or newer",
                )
            files = tuple(
                BackupFile(name, str(v["sha256"]), int(v["size"]), int(str(v["mode"]), 8))
                for name, v in doc["files"].items()
            )
            return cls(
                vault=str(doc["vault"]),
                created_at=float(doc["created_at_unix"]),
                sitepair_version=str(doc["sitepair_version"]),
                protocol_version=int(doc["protocol_version"]),
                store_backend=str(doc["store"]["backend"]),
                schema_version=int(doc["store"]["schema_version"]),
                files=files,
                format_version=version,
            )
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise BackupError(
                f"backup file {path} is damaged: {type(exc).__name__}: {exc}",
                hint="use another backup",
            ) from exc


# -- backup ---------------------------------------------------------------------------------


def backup(home: BrokerHome, dest: Path, *, now: float | None = None) -> Manifest:
    """Write a consistent backup of the broker ``home`` (running or not) to the new folder
    ``dest``; return its manifest."""
    dest = Path(dest)
    if not home.config.exists():
        raise NotFound(
            f"{home.root} is not a broker home (no {home.config.name})",
            hint="pass the home `sitepair-broker init` made with --home DIR",
        )
    cfg = config_mod.load(home.config)
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise BackupError(f"{dest} already exists", hint="name a new folder for each backup")
    dest.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".partial", dir=dest.parent))
    try:
        work.chmod(0o700)
        (work / "store").mkdir(mode=0o700)
        if cfg.store.backend == "postgresql":
            schema, vault = _dump_postgres(cfg.store.dsn, work / PGDUMP_FILE)
        else:
            schema, vault = _copy_sqlite(home.database, work / SQLITE_FILE)
        if vault != cfg.vault:
            raise BackupError(
                f"{home.config} names vault {cfg.vault!r} but its store belongs to {vault!r}"
            )
        _copy_private(home.config, work / "broker.toml")
        for name in _HOME_DIRS:
            src = home.root / name
            if src.is_dir():
                for f in sorted(p for p in src.rglob("*") if p.is_file()):
                    _copy_private(f, work / f.relative_to(home.root))
        files = tuple(_describe(work, p) for p in _files(work))
        manifest = Manifest(
            vault=vault,
            created_at=time.time() if now is None else now,
            sitepair_version=__version__,
            protocol_version=PROTOCOL_VERSION,
            store_backend=cfg.store.backend,
            schema_version=schema,
            files=files,
        )
        _write_private(work / MANIFEST, json.dumps(manifest.to_json(), indent=2).encode() + b"\n")
        for folder in sorted({p.parent for p in work.rglob("*")}, key=lambda p: -len(p.parts)):
            fsync_dir(folder)
        if dest.exists():
            dest.rmdir()  # an empty folder the operator made for it
        work.rename(dest)
        fsync_dir(dest.parent)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return manifest


def _copy_sqlite(database: Path, out: Path) -> tuple[int, str]:
    """Copy a (possibly live, WAL) SQLite store with the online backup API; return its schema
    version and vault, read from the copy."""
    if not database.exists():
        raise BackupError(f"the store {database} does not exist")
    out.touch(mode=0o600)
    try:
        src = sqlite3.connect(database.resolve().as_uri() + "?mode=ro", uri=True, timeout=30)
        try:
            dst = sqlite3.connect(out)
            try:
                # pages=-1: the whole database in one step, from one read snapshot.
                src.backup(dst, pages=-1)
                dst.execute("PRAGMA journal_mode=DELETE")  # one self-contained file
                check = dst.execute("PRAGMA integrity_check").fetchone()
                if check is None or check[0] != "ok":
                    raise BackupError(f"the store {database} is damaged: {check}")
                version = dst.execute("SELECT max(version) FROM schema_migrations").fetchone()
                vault = dst.execute("SELECT value FROM meta WHERE key = 'vault'").fetchone()
            finally:
                dst.close()
        finally:
            src.close()
    except sqlite3.Error as exc:
        raise BackupError(f"cannot back up the store {database}: {exc}") from exc
    out.chmod(0o600)
    if version is None or vault is None:
        raise BackupError(f"the store {database} holds no vault: was the home made by `init`?")
    return int(version[0] or 0), str(vault[0])


def _pg_tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise BackupError(
            f"{name} is not installed, and a PostgreSQL store is backed up and restored with it",
            hint="install the PostgreSQL client tools (Debian: `apt install postgresql-client`), "
            "of the server's major version or newer",
        )
    return path


def _pg_env() -> dict[str, str]:
    """The environment of pg_dump / pg_restore: the store's password as libpq reads it."""
    env = dict(os.environ)
    password = os.environ.get(PASSWORD_ENV)
    if password:
        env["PGPASSWORD"] = password
    return env


def _pg_connect(dsn: str) -> Any:
    import psycopg

    password = os.environ.get(PASSWORD_ENV) or None
    try:
        if password is None:
            return psycopg.connect(dsn, autocommit=True, connect_timeout=10)
        return psycopg.connect(dsn, autocommit=True, connect_timeout=10, password=password)
    except psycopg.Error as exc:
        raise BackupError(
            f"cannot connect to the store {_shown(dsn)}: {exc}",
            hint=f"set {PASSWORD_ENV} (or ~/.pgpass) as for the broker itself",
        ) from exc


def _shown(dsn: str) -> str:
    """The DSN without a password, for messages."""
    from psycopg.conninfo import conninfo_to_dict, make_conninfo

    with contextlib.suppress(Exception):
        params = {k: v for k, v in conninfo_to_dict(dsn).items() if k != "password"}
        return "postgresql:" + make_conninfo("", **params)
    return "postgresql:(DSN)"


def _pg_state(conn: Any) -> tuple[str, int | None, str | None]:
    """The vault schema's name, and its schema version and vault (None: no vault there)."""
    schema = str(conn.execute("SELECT current_schema()").fetchone()[0])
    has = conn.execute("SELECT to_regclass('schema_migrations')").fetchone()[0]
    if has is None:
        return schema, None, None
    version = conn.execute("SELECT max(version) FROM schema_migrations").fetchone()[0]
    vault = None
    if conn.execute("SELECT to_regclass('meta')").fetchone()[0] is not None:
        row = conn.execute("SELECT value FROM meta WHERE key = 'vault'").fetchone()
        vault = None if row is None else str(row[0])
    return schema, int(version or 0), vault


def _dump_postgres(dsn: str, out: Path) -> tuple[int, str]:
    """``pg_dump`` the vault's schema (one snapshot) in custom format."""
    tool = _pg_tool("pg_dump")
    with _pg_connect(dsn) as conn:
        schema, _, _ = _pg_state(conn)
    out.touch(mode=0o600)
    _pg_run(
        [tool, "--format=custom", f"--schema={schema}", f"--file={out}", f"--dbname={dsn}"],
        f"pg_dump of {_shown(dsn)}",
    )
    out.chmod(0o600)
    # Read after the dump: the schema only moves forward, so the manifest never claims less.
    with _pg_connect(dsn) as conn:
        _, version, vault = _pg_state(conn)
    if version is None or vault is None:
        raise BackupError(f"the store {_shown(dsn)} holds no vault")
    return version, vault


def _copy_private(src: Path, dst: Path) -> None:
    ensure_private_dir(dst.parent)
    _write_private(dst, src.read_bytes())


def _write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file() and p.name != MANIFEST)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _describe(root: Path, path: Path) -> BackupFile:
    rel = path.relative_to(root).as_posix()
    return BackupFile(rel, _sha256(path), path.stat().st_size, _home_mode(rel))


def _home_mode(rel: str) -> int:
    """The mode a file gets in the restored home (every file is 0600 in the backup itself):
    keys, the configuration and the store 0600, certificates and the profile 0644."""
    private = rel.endswith(".key") or rel.startswith("store/") or rel == "broker.toml"
    return 0o600 if private else 0o644


# -- restore --------------------------------------------------------------------------------


def verify(src: Path) -> Manifest:
    """Check the backup ``src`` whole: its manifest, every listed file's size and checksum,
    and that this broker knows its store schema. Raises :class:`BackupError` naming the file."""
    src = Path(src)
    if not src.is_dir():
        raise NotFound(f"no backup at {src}", hint="name the folder `sitepair-broker backup` wrote")
    manifest = Manifest.load(src)
    names = {f.path for f in manifest.files}
    for f in manifest.files:
        parts = Path(f.path).parts
        if Path(f.path).is_absolute() or ".." in parts or parts[0] not in _ALLOWED_TOP:
            raise BackupError(f"backup {src} lists a file outside a broker home: {f.path!r}")
        path = src / f.path
        if not path.is_file():
            raise BackupError(f"backup file {f.path} is missing from {src}", hint="use another")
        if path.stat().st_size != f.size or _sha256(path) != f.sha256:
            raise BackupError(
                f"backup file {f.path} in {src} does not match its checksum in {MANIFEST}: "
                "the backup is damaged",
                hint="use another backup",
            )
    store_file = SQLITE_FILE if manifest.store_backend == "sqlite" else PGDUMP_FILE
    for needed in ("broker.toml", "ca/ca.key", "ca/ca.crt", "tickets/signing.key", store_file):
        if needed not in names:
            raise BackupError(f"backup {src} has no {needed}", hint="use another backup")
    known = len(migrations())
    if manifest.schema_version > known:
        raise BackupError(
            f"backup {src} holds store schema version {manifest.schema_version}, newer than this "
            f"broker knows ({known})",
            hint=f"restore it with sitepair {manifest.sitepair_version}, which made it",
        )
    return manifest


def restore(src: Path, home_root: Path, *, dsn: str | None = None) -> Manifest:
    """Restore the backup ``src`` into the empty or new home ``home_root``.

    ``dsn`` (PostgreSQL only): the database to restore into, instead of the one the backup's
    ``broker.toml`` names; it must hold no vault.
    """
    src, home = Path(src), BrokerHome(Path(home_root))
    manifest = verify(src)
    if dsn and manifest.store_backend != "postgresql":
        raise InvalidArgument("--dsn is for a backup of a PostgreSQL store")
    if home.root.exists() and (not home.root.is_dir() or any(home.root.iterdir())):
        raise BackupError(
            f"{home.root} is not empty", hint="restore into a new or empty folder (--home)"
        )
    created_root = not home.root.exists()
    ensure_private_dir(home.root)
    lock: HomeLock | None = None
    try:
        lock = HomeLock.acquire(home.root, what="broker home", holder="sitepair-broker restore")
        for f in manifest.files:
            target = home.root / f.path
            if f.path.startswith("store/"):
                continue
            ensure_private_dir(target.parent)
            fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, f.mode & 0o644)
            with os.fdopen(fd, "wb") as out:
                out.write((src / f.path).read_bytes())
                out.flush()
                os.fsync(out.fileno())
        if manifest.store_backend == "postgresql":
            text = home.config.read_text(encoding="utf-8")
            if dsn:
                text = _set_dsn(text, dsn)
                home.config.write_text(text, encoding="utf-8")
            cfg = config_mod.load(home.config)
            _restore_postgres(src / PGDUMP_FILE, cfg.store.dsn, manifest.vault)
        else:
            _restore_sqlite(src / SQLITE_FILE, home.database, manifest.vault)
        fsync_dir(home.root)
    except BaseException:
        if lock is not None:
            lock.release()
            lock = None
        _undo(home.root, created_root)
        raise
    finally:
        if lock is not None:
            lock.release()
    return manifest


def _restore_sqlite(copy: Path, database: Path, vault: str) -> None:
    fd = os.open(database, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as out, copy.open("rb") as f:
        shutil.copyfileobj(f, out, _CHUNK)
        out.flush()
        os.fsync(out.fileno())
    try:
        conn = sqlite3.connect(database.resolve().as_uri() + "?mode=ro", uri=True)
        try:
            row = conn.execute("SELECT value FROM meta WHERE key = 'vault'").fetchone()
        finally:
            conn.close()
    except sqlite3.Error as exc:
        raise BackupError(f"the restored store {database} cannot be read: {exc}") from exc
    if row is None or row[0] != vault:
        raise BackupError(f"the backup's store belongs to {row and row[0]!r}, not vault {vault!r}")


def _restore_postgres(dump: Path, dsn: str, vault: str) -> None:
    tool = _pg_tool("pg_restore")
    with _pg_connect(dsn) as conn:
        _, version, existing = _pg_state(conn)
    if version is not None:
        raise BackupError(
            f"the database {_shown(dsn)} already holds a sitepair store"
            + (f" (vault {existing!r})" if existing else ""),
            hint="restore into an empty database: create one, and pass its DSN with --dsn",
        )
    listing = _pg_run([tool, "--list", str(dump)], f"pg_restore --list {dump}")
    # The schema itself is created here, if missing: the dump's CREATE SCHEMA fails on one that
    # exists, as "public" does in every new database.
    entries, schemas = [], []
    for line in listing.splitlines():
        m = _SCHEMA_ENTRY.match(line)
        if m:
            schemas.append(m.group(1))
        elif not _SCHEMA_COMMENT.match(line):
            entries.append(line)
    with _pg_connect(dsn) as conn:
        from psycopg import sql

        for name in schemas:
            conn.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(name)))
    with tempfile.TemporaryDirectory(prefix="sitepair-restore-") as tmp:
        use = Path(tmp) / "toc.list"
        use.write_text("\n".join(entries) + "\n", encoding="utf-8")
        _pg_run(
            [
                tool,
                "--no-owner",
                "--no-privileges",
                "--exit-on-error",
                "--single-transaction",
                f"--use-list={use}",
                f"--dbname={dsn}",
                str(dump),
            ],
            f"pg_restore into {_shown(dsn)}",
        )
    with _pg_connect(dsn) as conn:
        _, _, restored = _pg_state(conn)
    if restored != vault:
        raise BackupError(
            f"after pg_restore, {_shown(dsn)} holds vault {restored!r}, not {vault!r}"
        )


#: ``pg_restore --list`` lines of the schema's own entries: "4; 2615 2200 SCHEMA - public owner".
_SCHEMA_ENTRY = re.compile(r"^\d+; \d+ \d+ SCHEMA - (\S+) ")
_SCHEMA_COMMENT = re.compile(r"^\d+; \d+ \d+ COMMENT - SCHEMA ")


def _pg_run(cmd: list[str], what: str) -> str:
    proc = subprocess.run(cmd, capture_output=True, text=True, env=_pg_env(), check=False)
    if proc.returncode != 0:
        raise BackupError(f"{what} failed: {proc.stderr.strip()[-2000:]}")
    return proc.stdout


_DSN_LINE = re.compile(r'(?m)^dsn = "[^"\n]*"')


def _set_dsn(text: str, dsn: str) -> str:
    """``broker.toml`` with ``[store] dsn`` set to ``dsn`` (the only ``dsn`` key in the file)."""
    if '"' in dsn or "\\" in dsn or "\n" in dsn:
        raise InvalidArgument("--dsn must not hold quotes, backslashes or line breaks")
    new, n = _DSN_LINE.subn(f'dsn = "{dsn}"', text, count=1)
    if n != 1:
        raise BackupError("the backup's broker.toml has no [store] dsn line to change")
    config_mod.check_store(config_mod.StoreConfig(backend="postgresql", dsn=dsn), "--dsn")
    return new


def _undo(root: Path, created_root: bool) -> None:
    """Remove what a failed restore wrote, so the home is as empty as it was."""
    if created_root:
        shutil.rmtree(root, ignore_errors=True)
        return
    for entry in list(root.iterdir()):
        with contextlib.suppress(OSError):
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()


__all__ = ["BackupError", "Manifest", "backup", "restore", "verify"]
