"""Clouds, the hosts in them, cloud pairs with their replication policy, and mappings.

What an operator sets up before protecting a VM, as Azure Site Recovery does it between two
on-premises sites: a cloud is a set of hosts of one site; a pair says which cloud's VMs
replicate to which, under which policy; network and storage mappings say what a VM's networks
and storage become on the recovery side. Pairing, or changing a pair's policy, is a job
(``configure-pair``) that checks the recovery hosts and gives the policy to every protected VM.
"""

from __future__ import annotations

import logging
from typing import Any

from broker.agent_commands import REPLICATING, AgentCommands, replication_endpoint
from broker.orchestration import Orchestration, Orchestrator, Step, StepFailed, StepRun
from broker.policy import Policy, validate
from broker.store.models import Cloud, CloudPair, Job, Relationship, Server
from broker.store.sqlite import Tx
from sitepair import pki
from sitepair.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound

log = logging.getLogger("sitepair.broker.clouds")

#: The second step of a configure-pair job (the first one's name says the authentication).
APPLY_POLICY = "apply the policy to protected VMs"


class CloudManager(Orchestrator):
    def __init__(self, orchestration: Orchestration, *, commands: AgentCommands) -> None:
        super().__init__(orchestration)
        self._commands = commands
        self.declare("configure-pair", self._pair_steps)

    # -- clouds -----------------------------------------------------------------------------
    async def create_cloud(self, name: str, site: str, description: str = "") -> Cloud:
        pki.check_identifier(name, "cloud name")
        pki.check_identifier(site, "site")
        cloud = Cloud(name=name, site=site, description=description, created_at=self.clock.now())
        await self.write(lambda tx: tx.insert_cloud(cloud))
        log.info("cloud created", extra={"fields": {"cloud": name, "site": site}})
        return cloud

    async def delete_cloud(self, name: str) -> None:
        def run(tx: Tx) -> None:
            if tx.get_cloud(name) is None:
                raise NotFound(f"no cloud {name!r}")
            pair = tx.pair_of(name)
            if pair is not None:
                raise FailedPrecondition(
                    f"cloud {name} is paired ({pair.primary_cloud} -> {pair.recovery_cloud})",
                    hint=f"remove the pairing first: clouds unpair {pair.primary_cloud}",
                )
            tx.delete_cloud(name)

        await self.write(run)

    async def add_host(self, cloud: str, server_ref: str) -> Server:
        now = self.clock.now()

        def run(tx: Tx) -> Server:
            c = tx.get_cloud(cloud)
            if c is None:
                raise NotFound(f"no cloud {cloud!r}", hint="create it with `clouds create`")
            server = tx.find_server(server_ref)
            if server.removed_at is not None:
                raise FailedPrecondition(f"server {server.name} was removed")
            if server.site != c.site:
                raise FailedPrecondition(
                    f"server {server.name} is at site {server.site}, cloud {cloud} at {c.site}"
                )
            current = tx.cloud_of(server.id)
            if current == cloud:
                return server
            if current is not None and _active_on(tx, server.id):
                raise FailedPrecondition(
                    f"server {server.name} is in cloud {current} and protects VMs there",
                    hint="disable their protection before moving the host",
                )
            tx.set_host_cloud(server.id, cloud, now)
            return server

        return await self.write(run)

    async def remove_host(self, cloud: str, server_ref: str) -> Server:
        now = self.clock.now()

        def run(tx: Tx) -> Server:
            server = tx.find_server(server_ref)
            if tx.cloud_of(server.id) != cloud:
                raise FailedPrecondition(f"server {server.name} is not in cloud {cloud}")
            if _active_on(tx, server.id):
                raise FailedPrecondition(
                    f"server {server.name} takes part in protected VMs",
                    hint="disable their protection first",
                )
            tx.set_host_cloud(server.id, None, now)
            return server

        return await self.write(run)

    # -- pairs ------------------------------------------------------------------------------
    async def pair(self, primary: str, recovery: str, policy: Policy, *, by: str) -> Job:
        validate(policy)
        now = self.clock.now()

        def run(tx: Tx) -> None:
            for name in (primary, recovery):
                if tx.get_cloud(name) is None:
                    raise NotFound(f"no cloud {name!r}")
            if primary == recovery:
                raise InvalidArgument("a cloud cannot be paired with itself")
            for name in (primary, recovery):
                existing = tx.pair_of(name)
                if existing is not None:
                    raise AlreadyExists(
                        f"cloud {name} already belongs to the pair {existing.primary_cloud} -> "
                        f"{existing.recovery_cloud}; a cloud belongs to one pair at most",
                        hint="to change the target, remove the pairing first: "
                        f"clouds unpair {existing.primary_cloud}",
                    )
            tx.insert_pair(CloudPair(primary, recovery, policy.to_json(), now, now))

        await self.write(run)
        log.info("clouds paired", extra={"fields": {"primary": primary, "recovery": recovery}})
        return await self._apply_policy_job(primary, recovery, policy, by=by)

    async def set_policy(self, primary: str, policy: Policy, *, by: str) -> Job:
        validate(policy)
        now = self.clock.now()

        def run(tx: Tx) -> CloudPair:
            pair = tx.pair_of(primary)
            if pair is None or pair.primary_cloud != primary:
                raise NotFound(f"cloud {primary} is not the primary of a pair")
            tx.update_pair_policy(primary, policy.to_json(), now)
            return pair

        pair = await self.write(run)
        return await self._apply_policy_job(pair.primary_cloud, pair.recovery_cloud, policy, by=by)

    async def _apply_policy_job(
        self, primary: str, recovery: str, policy: Policy, *, by: str
    ) -> Job:
        return await self.start_job(
            "configure-pair",
            f"pair/{primary}",
            {"primary": primary, "recovery": recovery, "authentication": policy.authentication},
            by=by,
        )

    def _pair_steps(self, target: str, params: dict[str, Any]) -> list[Step]:
        primary, recovery = params["primary"], params["recovery"]

        async def check_hosts(step: StepRun) -> str:
            def read(tx: Tx) -> tuple[Policy, list[Server]]:
                pair = tx.pair_of(primary)
                if pair is None:
                    raise StepFailed(f"the pair {primary} -> {recovery} was removed meanwhile")
                return Policy.from_json(pair.policy_json), [
                    s for s in (tx.get_server(i) for i in tx.cloud_hosts(recovery)) if s is not None
                ]

            policy, hosts = await self.read(read)
            problems = []
            for host in hosts:
                _, certificate_port, ticket_port = replication_endpoint(host.facts_json)
                port = certificate_port if policy.authentication == "certificate" else ticket_port
                if not port:
                    problems.append(
                        f"{host.name} reports no {policy.authentication} replication listener"
                    )
            if problems:
                raise StepFailed("; ".join(problems))
            return (
                f"{len(hosts)} recovery host(s) ready"
                if hosts
                else f"cloud {recovery} has no hosts yet"
            )

        async def apply_to_relationships(step: StepRun) -> str:
            def read(tx: Tx) -> tuple[CloudPair | None, list[Relationship], set[str]]:
                rels = [r for r in tx.list_relationships() if r.primary_cloud == primary]
                return tx.pair_of(primary), rels, tx.removed_server_ids()

            pair, rels, removed = await self.read(read)
            if pair is None:
                raise StepFailed(f"the pair {primary} -> {recovery} was removed meanwhile")
            updated, waiting = 0, []
            for rel in rels:
                # Every relationship gets the policy in the store; those replicating get it on
                # their hosts too, each its own commands (one per relationship and host).
                # Others take it when they next configure their hosts (cancel, reverse); a
                # failed-over VM's old primary must not be told to replicate again.
                def update(tx: Tx, rel_id: str = rel.id) -> None:
                    tx.update_relationship(rel_id, self.clock.now(), policy_json=pair.policy_json)

                await self.write(update)
                if rel.state not in REPLICATING:
                    waiting.append(f"{rel.vm_name} ({rel.state.value})")
                    continue
                gone = [s for s in (rel.primary_server, rel.replica_server) if s in removed]
                if gone:
                    waiting.append(f"{rel.vm_name} (a host was removed)")
                    continue
                fresh = await self.relationship(rel.id)
                await step.send(fresh.replica_server, self._commands.configure_replica(fresh))
                await step.send(fresh.primary_server, await self._commands.configure_source(fresh))
                updated += 1
                await step.progress(done=updated, total=len(rels))
            message = f"{updated} protected VM(s) updated"
            if waiting:
                message += f"; stored for {len(waiting)} not replicating now: " + ", ".join(
                    waiting[:20]
                )
            return message

        # Jobs created before the name of the policy's authentication was kept say "ticket" or
        # "certificate" in their first step's name as the policy had it then.
        authentication = params.get("authentication", "")
        return [
            Step(f"check the hosts of {recovery} accept {authentication} replication", check_hosts),
            Step(APPLY_POLICY, apply_to_relationships),
        ]

    async def unpair(self, primary: str) -> None:
        def run(tx: Tx) -> None:
            pair = tx.pair_of(primary)
            if pair is None or pair.primary_cloud != primary:
                raise NotFound(f"cloud {primary} is not the primary of a pair")
            rels = [r for r in tx.list_relationships() if r.primary_cloud == primary]
            if rels:
                raise FailedPrecondition(
                    f"{len(rels)} VM(s) of cloud {primary} are protected",
                    hint="disable their protection before removing the pairing",
                )
            tx.delete_pair(primary)

        await self.write(run)

    # -- mappings ---------------------------------------------------------------------------
    async def map(self, kind: str, source: str, target: str) -> None:
        if kind not in ("network", "storage"):
            raise InvalidArgument(f"unknown mapping kind {kind!r}")
        if not source or not target:
            raise InvalidArgument("a mapping needs a source and a target")
        await self.write(lambda tx: tx.put_mapping(kind, source, target, self.clock.now()))

    async def unmap(self, kind: str, source: str) -> None:
        removed = await self.write(lambda tx: tx.delete_mapping(kind, source))
        if not removed:
            raise NotFound(f"no {kind} mapping for {source!r}")

    async def mappings(self, kind: str) -> list[dict[str, Any]]:
        """Each mapping with the clouds whose hosts offer its source and target."""

        def read(tx: Tx) -> list[dict[str, Any]]:
            offered: dict[str, set[str]] = {}
            if kind == "network":
                for server_id, name, _ in tx.host_networks():
                    cloud = tx.cloud_of(server_id)
                    if cloud:
                        offered.setdefault(name, set()).add(cloud)
            else:
                for st in tx.host_storage():
                    cloud = tx.cloud_of(st.server_id)
                    if cloud:
                        offered.setdefault(st.name, set()).add(cloud)
            return [
                {
                    "source": m.source,
                    "target": m.target,
                    "source_clouds": sorted(offered.get(m.source, ())),
                    "target_clouds": sorted(offered.get(m.target, ())),
                }
                for m in tx.list_mappings(kind)
            ]

        return await self.read(read)


def _active_on(tx: Tx, server_id: str) -> bool:
    return bool(tx.relationships_of_server(server_id))
