"""Where protection happens: clouds and their hosts, cloud pairs and their policy, and the
network and storage mappings from a primary cloud to its recovery cloud."""

from __future__ import annotations

from broker.store.models import Cloud, CloudPair, Mapping
from broker.store.repo.core import Queries
from broker.store.session import Conflict
from sitepair.errors import AlreadyExists

_MAPPING_TABLES = {
    "network": ("network_mappings", "source_network", "target_network"),
    "storage": ("storage_mappings", "source_class", "target_class"),
}


class CloudQueries(Queries):
    # -- clouds ----------------------------------------------------------------------------
    def insert_cloud(self, cloud: Cloud) -> None:
        try:
            with self._db.guarded():
                self._db.execute(
                    "INSERT INTO clouds VALUES (?, ?, ?, ?)",
                    (cloud.name, cloud.site, cloud.description, cloud.created_at),
                )
        except Conflict as exc:
            raise AlreadyExists(f"a cloud named {cloud.name!r} already exists") from exc

    def get_cloud(self, name: str) -> Cloud | None:
        row = self._one("SELECT * FROM clouds WHERE name = ?", (name,))
        return None if row is None else Cloud(*row)

    def list_clouds(self) -> list[Cloud]:
        return [Cloud(*r) for r in self._all("SELECT * FROM clouds ORDER BY name")]

    def delete_cloud(self, name: str) -> None:
        self._db.execute("DELETE FROM cloud_hosts WHERE cloud = ?", (name,))
        self._db.execute("DELETE FROM clouds WHERE name = ?", (name,))

    def set_host_cloud(self, server_id: str, cloud: str | None, now: float) -> None:
        self._db.execute("DELETE FROM cloud_hosts WHERE server_id = ?", (server_id,))
        if cloud is not None:
            self._db.execute("INSERT INTO cloud_hosts VALUES (?, ?, ?)", (server_id, cloud, now))

    def cloud_of(self, server_id: str) -> str | None:
        row = self._one("SELECT cloud FROM cloud_hosts WHERE server_id = ?", (server_id,))
        return None if row is None else str(row[0])

    def cloud_hosts(self, cloud: str) -> list[str]:
        return [
            r[0]
            for r in self._all(
                "SELECT server_id FROM cloud_hosts WHERE cloud = ? ORDER BY server_id", (cloud,)
            )
        ]

    # -- cloud pairs -----------------------------------------------------------------------
    def insert_pair(self, pair: CloudPair) -> None:
        self._db.execute(
            "INSERT INTO cloud_pairs VALUES (?, ?, ?, ?, ?)",
            (
                pair.primary_cloud,
                pair.recovery_cloud,
                pair.policy_json,
                pair.created_at,
                pair.updated_at,
            ),
        )

    def pair_of(self, cloud: str) -> CloudPair | None:
        """The pair a cloud belongs to, as primary or as recovery."""
        row = self._one(
            "SELECT * FROM cloud_pairs WHERE primary_cloud = ? OR recovery_cloud = ?",
            (cloud, cloud),
        )
        return None if row is None else CloudPair(*row)

    def list_pairs(self) -> list[CloudPair]:
        return [
            CloudPair(*r) for r in self._all("SELECT * FROM cloud_pairs ORDER BY primary_cloud")
        ]

    def update_pair_policy(self, primary_cloud: str, policy_json: str, now: float) -> None:
        self._db.execute(
            "UPDATE cloud_pairs SET policy_json = ?, updated_at = ? WHERE primary_cloud = ?",
            (policy_json, now, primary_cloud),
        )

    def delete_pair(self, primary_cloud: str) -> None:
        self._db.execute("DELETE FROM cloud_pairs WHERE primary_cloud = ?", (primary_cloud,))

    # -- mappings --------------------------------------------------------------------------
    def put_mapping(self, kind: str, source: str, target: str, now: float) -> None:
        table, col, target_col = _MAPPING_TABLES[kind]
        self._db.execute(
            f"INSERT INTO {table} VALUES (?, ?, ?) ON CONFLICT ({col}) "
            f"DO UPDATE SET {target_col} = excluded.{target_col}",
            (source, target, now),
        )

    def list_mappings(self, kind: str) -> list[Mapping]:
        table, col, _ = _MAPPING_TABLES[kind]
        return [Mapping(*r) for r in self._all(f"SELECT * FROM {table} ORDER BY {col}")]

    def delete_mapping(self, kind: str, source: str) -> bool:
        table, col, _ = _MAPPING_TABLES[kind]
        return self._db.execute(f"DELETE FROM {table} WHERE {col} = ?", (source,)) == 1
