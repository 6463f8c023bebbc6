"""The agent's replication service: the receiver, one runner per protected VM, the commands.

It is a sibling task of the control stream in the agent daemon. The broker configures it with
commands (ConfigureReplica on the recovery host, ConfigureSource on the primary), which are
persisted so replication continues across agent restarts without the broker. Each source
relationship has a runner (:mod:`agent.replication.runners`) that starts a cycle every
copy-frequency interval (counting the intervals a slow cycle overran as missed), backs off after
failures, and stops for good when the replica reports a higher epoch (this host was failed over
from: fenced). The replica side is :mod:`agent.replication.receiver`; the statuses reported to
the broker are built by :mod:`agent.replication.report`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import shutil
import threading
from collections.abc import Callable
from pathlib import Path

import grpc
from google.protobuf import json_format

from agent.config import AgentConfig
from agent.hosts.base import HostBackend
from agent.identity import AgentIdentity
from agent.replication import failover as failover_mod
from agent.replication import guest
from agent.replication.engine import SourceRelationship
from agent.replication.failover import LATEST, LATEST_APP, adopt_vm_as_replica, check_point_kind
from agent.replication.incoming import MAX_DISKS
from agent.replication.offline import import_export
from agent.replication.receiver import ReceiverServer, ReplicaRegistry
from agent.replication.replica import ReplicaStore
from agent.replication.report import replication_report
from agent.replication.runners import SourceRunners
from agent.replication.state import (
    DiskGrant,
    Grant,
    ReplicationState,
    SenderState,
    SourceConfig,
)
from sitepair import paths, pki
from sitepair.clock import Clock
from sitepair.errors import (
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
)
from sitepair.protoconv import seconds
from sitepair.rpc import channel_options, error_from_rpc
from sitepair.v1 import control_pb2, control_pb2_grpc, replication_pb2

log = logging.getLogger("sitepair.agent.replication")

COPY_FREQUENCIES = (30, 300, 900)

#: The authentication modes of the wire, by the names the agent's records keep.
AUTH_MODES = {control_pb2.AUTH_CERTIFICATE: "certificate", control_pb2.AUTH_TICKET: "ticket"}

#: The trackers of the wire, by the names the agent's records keep.
TRACKERS = {control_pb2.TRACKER_CHANGELOG: "changelog", control_pb2.TRACKER_SCAN: "scan"}


def auth_mode(mode: control_pb2.AuthMode.ValueType) -> str:
    """The agent's name of a command's authentication mode; an unset or unknown one is refused."""
    name = AUTH_MODES.get(mode)
    if name is None:
        shown = "none" if mode == control_pb2.AUTH_MODE_UNSPECIFIED else f"unknown mode {mode}"
        raise InvalidArgument(
            f"the command names no authentication mode this agent knows ({shown}): "
            "it must be certificate or ticket",
            hint="a broker that sends no mode is older or newer than this agent: upgrade both",
        )
    return name


def tracker_name(tracker: control_pb2.Tracker.ValueType) -> str:
    """The agent's name of a command's tracker; an unknown one is refused."""
    name = TRACKERS.get(tracker)
    if name is None:
        raise InvalidArgument(f"the command names an unknown change tracker ({tracker})")
    return name


class BrokerTickets:
    """Asks the broker for a ticket per replication call (ticket authentication), over one
    channel kept open for the agent's identity.

    A ticket cannot be kept for a second call: the receiver remembers every ticket's nonce and
    refuses it the second time (sitepair.tickets), so each call still costs one ``IssueTicket``.
    What is saved is the TLS handshake with the broker: the channel is built once and rebuilt
    only when the identity (a renewed certificate, a CA rotation's trust bundle) or the broker
    address changes. ``issued`` and ``channels_opened`` count both, for tests and benchmarks."""

    def __init__(self, identity: Callable[[], AgentIdentity]) -> None:
        self._identity = identity
        self._lock = threading.Lock()
        self._channel: grpc.Channel | None = None
        self._key: tuple[str, bytes, bytes, bytes] | None = None
        #: The channel an identity change replaced: calls still on it finish there (closing
        #: it at once would cancel another relationship's ticket request); closed at the next
        #: change, hours later, or at close().
        self._retired: grpc.Channel | None = None
        self.issued = 0
        self.channels_opened = 0

    def _stub(self, ident: AgentIdentity, address: str) -> control_pb2_grpc.ControlStub:
        key = (address, ident.key_pem, ident.cert_pem, ident.ca_pem)
        with self._lock:
            if self._channel is None or self._key != key:
                if self._retired is not None:
                    self._retired.close()
                self._retired = self._channel
                self._channel = grpc.secure_channel(
                    address,
                    ident.channel_credentials(),
                    options=channel_options(target_name=pki.BROKER_DNS_NAME),
                )
                self._key = key
                self.channels_opened += 1
            return control_pb2_grpc.ControlStub(self._channel)

    def __call__(self, relationship: str) -> str:
        ident = self._identity()
        address = ident.control_addresses[0]
        stub = self._stub(ident, address)
        try:
            resp = stub.IssueTicket(
                control_pb2.TicketRequest(relationship_id=relationship), timeout=30
            )
        except grpc.RpcError as exc:
            raise error_from_rpc(exc, peer=f"broker at {address}") from None
        with self._lock:
            self.issued += 1
        return str(resp.ticket)

    def close(self) -> None:
        with self._lock:
            for channel in (self._channel, self._retired):
                if channel is not None:
                    channel.close()
            self._channel = self._retired = None
            self._key = None


class ReplicationService:
    def __init__(
        self,
        *,
        home: Path,
        config: AgentConfig,
        backend: HostBackend,
        identity: Callable[[], AgentIdentity],
        clock: Clock,
        tickets: Callable[[str], str] | None = None,
    ) -> None:
        self.home = home
        self.config = config
        self.backend = backend
        self.identity = identity
        self.clock = clock
        self.tickets = tickets or BrokerTickets(identity)
        self.state = ReplicationState(home / "state" / "replication.db")
        self.registry = ReplicaRegistry(self.state, clock)
        self.receiver = ReceiverServer(
            registry=self.registry, identity=identity, on_commit=self._replica_committed
        )
        self.runners = SourceRunners(
            state=self.state,
            backend=backend,
            identity=identity,
            clock=clock,
            work_dir=home / "state" / "replication",
            tickets=self.tickets,
            adaptive_compression=config.replication.compression == "adaptive",
        )
        self._stop = asyncio.Event()
        self._started = False
        self._closed = False
        self.ports: dict[str, int] = {}

    # -- lifecycle --------------------------------------------------------------------------
    async def start(self) -> None:
        """Open the receiver ports and start the runners (idempotent)."""
        if self._started:
            return
        self._started = True
        r = self.config.replication
        self.ports = await asyncio.to_thread(
            self.receiver.start,
            host=r.listen_host,
            certificate_port=r.certificate_port,
            ticket_port=r.ticket_port,
        )
        for grant in await asyncio.to_thread(self.state.grants):
            await asyncio.to_thread(self.registry.store, grant)  # finishes interrupted applies
        for source, sender in await asyncio.to_thread(self.state.sources):
            await self.runners.start(source, sender)

    @property
    def sources(self) -> dict[str, SourceRelationship]:
        """The source relationships being replicated now, by relationship id."""
        return self.runners.sources

    async def run(self) -> None:
        await self.start()
        await self._stop.wait()

    async def shutdown(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._stop.set()
        await self.runners.shutdown()
        if isinstance(self.tickets, BrokerTickets):
            self.tickets.close()
        await asyncio.to_thread(self.receiver.stop, 2.0)
        await asyncio.to_thread(self.state.close)

    # -- commands ---------------------------------------------------------------------------
    def replica_roots(self) -> list[Path]:
        """The folders replicas may live in: the default replica path and the storage
        classifications this host reports (agent.toml [storage])."""
        return [
            self.config.replication.default_replica_path,
            *(path for _name, path in self.config.storage),
        ]

    def _replica_folder(self, cmd: control_pb2.ConfigureReplica) -> Path:
        """Where the replica of ``cmd`` goes: a folder strictly below one of
        :meth:`replica_roots`, symlinks resolved (the broker derives it from names other hosts
        reported; it is checked here again, whoever built it)."""
        roots = self.replica_roots()
        if not cmd.folder:
            return paths.inside(roots[0], cmd.relationship_id, what="replica folder")
        for root in roots:
            try:
                folder = paths.check_inside(root, cmd.folder, "replica folder")
            except InvalidArgument:
                continue
            if folder != Path(os.path.realpath(root)):
                return folder
        raise PermissionDenied(
            f"replica folder {cmd.folder[:200]!r} is not inside this host's replica locations "
            f"({', '.join(str(r) for r in roots)})",
            hint="replicas go only below the default replica path or a storage classification "
            "of agent.toml; check the storage mapping at the broker",
        )

    async def configure_replica(
        self, cmd: control_pb2.ConfigureReplica
    ) -> control_pb2.ConfigureReplicaResult:
        paths.check_component(cmd.relationship_id, "relationship id")
        paths.check_component(cmd.vm_id, "VM id")
        pki.check_identifier(cmd.source_host, "source host")
        auth = auth_mode(cmd.auth)
        if cmd.recovery_points > 24:
            raise InvalidArgument("at most 24 additional recovery points")
        if len(cmd.disks) > MAX_DISKS:
            raise InvalidArgument(f"a VM may have at most {MAX_DISKS} replicated disks")
        disks = tuple(
            DiskGrant(
                disk_id=paths.check_component(d.disk_id, "disk id"),
                virtual_size=d.virtual_size,
                format=d.format or "vhdx",
            )
            for d in cmd.disks
        )
        if len({d.disk_id for d in disks}) != len(disks):
            raise InvalidArgument("the grant names a disk twice")
        if await asyncio.to_thread(self.state.is_revoked, cmd.source_host):
            raise FailedPrecondition(
                f"host {cmd.source_host} was removed from the vault; it may not replicate here"
            )
        folder = self._replica_folder(cmd)
        grant = Grant(
            relationship=cmd.relationship_id,
            vm_id=cmd.vm_id,
            vm_name=cmd.vm_name,
            source_host=cmd.source_host,
            epoch=cmd.epoch,
            folder=str(folder),
            auth=auth,
            ticket_public_key=cmd.ticket_public_key.hex(),
            recovery_points=cmd.recovery_points,
            point_interval=float(cmd.point_interval_seconds or 3600),
            adopt=cmd.adopt,
            disks=disks,
        )
        if cmd.from_vm:
            # Reverse replication: this host's old VM becomes the replica of the new direction.
            await self._stop_source(cmd.relationship_id)
            await asyncio.to_thread(
                adopt_vm_as_replica,
                folder,
                self.backend,
                relationship=cmd.relationship_id,
                vm_id=cmd.from_vm,
                epoch=cmd.epoch,
                committed_sequence=max(1, cmd.from_sequence),
                clock=self.clock,
            )
            self.registry.forget(cmd.relationship_id)
        await asyncio.to_thread(self.state.put_grant, grant)
        store = await asyncio.to_thread(self.registry.store, grant)
        log.info(
            "replica configured",
            extra={
                "fields": {
                    "relationship": grant.relationship,
                    "source": grant.source_host,
                    "folder": str(folder),
                }
            },
        )
        return control_pb2.ConfigureReplicaResult(
            relationship_id=grant.relationship,
            folder=str(folder),
            committed_sequence=store.state.committed_sequence,
            certificate_port=self.ports.get("certificate", 0),
            ticket_port=self.ports.get("ticket", 0),
        )

    async def configure_source(
        self, cmd: control_pb2.ConfigureSource
    ) -> control_pb2.ConfigureSourceResult:
        pki.check_identifier(cmd.relationship_id, "relationship id")
        auth = auth_mode(cmd.auth)
        tracker = tracker_name(cmd.tracker)
        if cmd.copy_frequency_seconds not in COPY_FREQUENCIES and cmd.copy_frequency_seconds > 0:
            log.info(
                "non-standard copy frequency",
                extra={"fields": {"seconds": cmd.copy_frequency_seconds}},
            )
        await asyncio.to_thread(self.backend_vm_check, cmd.vm_id)
        source = SourceConfig(
            relationship=cmd.relationship_id,
            vm_id=cmd.vm_id,
            replica_host=cmd.replica_host,
            address=cmd.address,
            epoch=cmd.epoch,
            auth=auth,
            compression=cmd.compression,
            copy_frequency=float(cmd.copy_frequency_seconds or 300),
            app_consistent_interval=float(cmd.app_consistent_interval_seconds),
            bandwidth_limit=float(cmd.bandwidth_limit),
        )
        previous = await asyncio.to_thread(self.state.source, cmd.relationship_id)
        sender = dataclasses.replace(
            previous[1] if previous else SenderState(),
            tracker=tracker,
            initial_method=control_pb2.InitialReplication.Method.Name(cmd.initial.method),
            initial_at=seconds(cmd.initial.start_at),
            export_path=cmd.initial.export_path,
        )
        if cmd.resync_first and not previous:
            sender = dataclasses.replace(
                sender,
                needs_resync=True,
                resync_reason="the replica holds an older copy of this VM",
            )
        self.runners.retire(cmd.relationship_id)
        await asyncio.to_thread(self.state.put_source, source, sender)
        await self.runners.stop(cmd.relationship_id)
        await self.runners.start(source, sender)
        log.info(
            "source configured",
            extra={
                "fields": {
                    "relationship": source.relationship,
                    "vm": source.vm_id,
                    "replica": source.address,
                }
            },
        )
        return control_pb2.ConfigureSourceResult(relationship_id=source.relationship)

    def backend_vm_check(self, vm_id: str) -> None:
        inv = self.backend.inventory()
        if not any(vm_id in (vm.id, vm.name) for vm in inv.vms):
            raise NotFound(f"no VM {vm_id} on this host")

    async def _stop_source(self, rel: str) -> bool:
        stopped = await self.runners.stop(rel)
        if await asyncio.to_thread(self.state.source, rel) is not None:
            await asyncio.to_thread(self.state.remove_source, rel)
            stopped = True
        return stopped

    async def failover(self, cmd: control_pb2.Failover) -> control_pb2.FailoverResult:
        grant = await asyncio.to_thread(self.registry.grant, cmd.relationship_id)
        store = await asyncio.to_thread(self.registry.store, grant)
        check_point_kind(cmd.point or "latest")
        kind = (
            cmd.point
            if cmd.point in (LATEST, LATEST_APP)
            else ("latest" if not cmd.point else "sequence")
        )
        vm = json_format.MessageToDict(cmd.vm, preserving_proto_field_name=True)
        vm.setdefault("name", grant.vm_name)
        vm.setdefault("id", grant.vm_id)
        busy = self.registry.busy_lock(cmd.relationship_id)
        # No cycle may be applied while the replica becomes a VM.
        acquired = await asyncio.to_thread(busy.acquire, True, 60)
        if not acquired:
            raise FailedPrecondition(f"a cycle of {cmd.relationship_id} is still being received")
        try:
            result = await asyncio.to_thread(
                failover_mod.failover,
                store,
                self.backend,
                self.state,
                epoch=cmd.epoch,
                point_kind=kind,
                sequence=int(cmd.point) if kind == "sequence" else 0,
                vm=vm,
                nic_networks=dict(cmd.nic_networks),
                start=cmd.start_vm,
                test=cmd.test,
                now=self.clock.now(),
                prove_exact=cmd.prove_exact,
            )
        finally:
            busy.release()
        if cmd.prove_exact:
            # Cycles go on while the test VM's disks are read: its point's layers are pinned.
            result = await asyncio.to_thread(
                failover_mod.prove_test, store, self.backend, start=cmd.start_vm
            )
        if not cmd.test:
            # Cycles of the old epoch are refused from now on.
            await asyncio.to_thread(
                self.state.put_grant, dataclasses.replace(grant, epoch=cmd.epoch)
            )
        return result

    async def guest_run(self, cmd: control_pb2.GuestRun) -> control_pb2.GuestRunResult:
        """Run a program in the relationship's test VM (agent.replication.guest)."""
        request = guest.check_guest_run(cmd)
        grant = await asyncio.to_thread(self.registry.grant, request.relationship)
        store = await asyncio.to_thread(self.registry.store, grant)
        return await asyncio.to_thread(guest.run_in_test_vm, store, self.backend, request)

    async def failover_control(
        self, cmd: control_pb2.FailoverControl
    ) -> control_pb2.FailoverControlResult:
        a = control_pb2.FailoverControl
        grant = await asyncio.to_thread(self.state.grant, cmd.relationship_id)
        if grant is None:
            # After a commit the grant is gone: answer a repeated commit from the replica folder.
            raise NotFound(f"this host holds no replica of {cmd.relationship_id}")
        store = await asyncio.to_thread(self.registry.store, grant)
        if cmd.action == a.CLEANUP_TEST:
            return await asyncio.to_thread(failover_mod.cleanup_test, store, self.backend)
        if cmd.action == a.CANCEL:
            return await asyncio.to_thread(
                failover_mod.cancel, store, self.backend, self.state, epoch=cmd.epoch
            )
        result = await asyncio.to_thread(failover_mod.commit, store, self.state, epoch=cmd.epoch)
        self.registry.forget(cmd.relationship_id)
        return result

    async def vm_power(self, cmd: control_pb2.VmPower) -> control_pb2.VmPowerResult:
        if cmd.relationship_id:
            await asyncio.to_thread(self.state.observe_epoch, cmd.relationship_id, cmd.epoch)
        record = await asyncio.to_thread(self.backend.set_vm_state, cmd.vm_id, cmd.state)
        return control_pb2.VmPowerResult(vm=record.name, state=record.state)

    async def fence(self, cmd: control_pb2.Fence) -> control_pb2.FenceResult:
        """Stop replicating a relationship this host was the primary of, and power its VM off:
        a newer epoch exists, so this copy must not run or replicate."""
        await asyncio.to_thread(self.state.observe_epoch, cmd.relationship_id, cmd.epoch)
        stopped = await self._stop_source(cmd.relationship_id)
        state = ""
        if cmd.vm_id:
            try:
                record = await asyncio.to_thread(self.backend.set_vm_state, cmd.vm_id, "off")
                state = record.state
            except NotFound:
                state = "absent"
        log.warning(
            "fenced",
            extra={
                "fields": {"relationship": cmd.relationship_id, "epoch": cmd.epoch, "vm": state}
            },
        )
        return control_pb2.FenceResult(
            relationship_id=cmd.relationship_id, replication_stopped=stopped, vm_state=state
        )

    async def revoke_host(self, cmd: control_pb2.RevokeHost) -> control_pb2.RevokeHostResult:
        """The broker removed ``host_id`` from the vault: refuse it on both replication ports
        from now on (its certificate may be valid for hours yet), and stop replicating to it.
        Replicas it sent stay: they may be what a failover needs."""
        host = pki.check_identifier(cmd.host_id, "host id")
        if host == self.identity().host_id:
            raise InvalidArgument("a host is not told to revoke itself")
        reason = cmd.reason[:200]
        newly = await asyncio.to_thread(
            self.state.revoke_host, host, reason=reason, now=self.clock.now()
        )
        grants = await asyncio.to_thread(self.state.grants)
        refused = [g.relationship for g in grants if g.source_host == host]
        stopped = []
        for source, _ in await asyncio.to_thread(self.state.sources):
            if source.replica_host == host:
                await self.runners.stop(source.relationship, retire=True)
                stopped.append(source.relationship)
        log.warning(
            "host revoked",
            extra={
                "fields": {
                    "host": host,
                    "reason": reason,
                    "grants_refused": refused,
                    "sources_stopped": stopped,
                }
            },
        )
        return control_pb2.RevokeHostResult(
            host_id=host, newly_revoked=newly, grants_refused=refused, sources_stopped=stopped
        )

    async def remove(
        self, cmd: control_pb2.RemoveRelationship
    ) -> control_pb2.RemoveRelationshipResult:
        rel = cmd.relationship_id
        removed = []
        known = await self.runners.stop(rel)
        if known or await asyncio.to_thread(self.state.source, rel) is not None:
            await asyncio.to_thread(self.state.remove_source, rel)
            removed.append("source")
        grant = await asyncio.to_thread(self.state.grant, rel)
        if grant is not None:
            await asyncio.to_thread(self.state.remove_grant, rel)
            self.registry.forget(rel)
            removed.append("replica")
            if cmd.delete_replica:
                await asyncio.to_thread(shutil.rmtree, grant.folder, True)
                removed.append("replica disks deleted")
        log.info(
            "relationship removed", extra={"fields": {"relationship": rel, "removed": removed}}
        )
        return control_pb2.RemoveRelationshipResult(relationship_id=rel, removed=removed)

    async def action(
        self, cmd: control_pb2.ReplicationAction
    ) -> control_pb2.ReplicationActionResult:
        rel = cmd.relationship_id
        a = control_pb2.ReplicationAction
        Result = control_pb2.ReplicationActionResult
        if cmd.action == a.IMPORT:
            grant = await asyncio.to_thread(self.registry.grant, rel)
            store = await asyncio.to_thread(self.registry.store, grant)
            seq = await asyncio.to_thread(import_export, store, Path(cmd.path))
            return Result(relationship_id=rel, sequence=seq)
        source = self.sources.get(rel)
        if source is None:
            raise NotFound(f"this host is not the primary of relationship {rel}")
        if cmd.action == a.PAUSE:
            await asyncio.to_thread(self.runners.set_paused, rel, True)
            return Result(relationship_id=rel, paused=True)
        if cmd.action == a.RESUME:
            await asyncio.to_thread(self.runners.set_paused, rel, False)
            self.runners.wake(rel)
            return Result(relationship_id=rel, paused=False)
        if cmd.action == a.VERIFY:
            report = await asyncio.to_thread(source.verify, repair=cmd.repair)
            return Result(
                relationship_id=rel,
                sequence=report.sequence,
                mismatched_bytes=report.mismatched_bytes,
                mismatches=[
                    control_pb2.ByteRanges(
                        disk_id=disk,
                        offsets=[off for off, _ in ranges],
                        lengths=[n for _, n in ranges],
                    )
                    for disk, ranges in sorted(report.disks.items())
                ],
                repaired=report.repaired,
            )
        if cmd.action == a.FINAL_CYCLE:
            final = await asyncio.to_thread(source.final_cycle)
            return Result(
                relationship_id=rel,
                sequence=final.sequence,
                final_bytes=final.final_bytes,
                disks_compared=final.disks_compared,
                mismatched_bytes=0,
            )
        if cmd.action == a.RESYNC:
            source.resync_requested = True
        result = await asyncio.to_thread(source.run_cycle)
        if result is not None and source.resent_cut and cmd.action == a.RUN_CYCLE:
            # That finished a cut taken before an interruption; "cycle now" means the VM's state
            # now, so take one more.
            result = await asyncio.to_thread(source.run_cycle) or result
        if result is None:
            return Result(relationship_id=rel)
        return Result(
            relationship_id=rel,
            sequence=result.sequence,
            bytes=result.raw_bytes,
            kind=replication_pb2.CycleKind.ValueType(result.kind),
        )

    async def set_bandwidth(self, cmd: control_pb2.SetBandwidth) -> control_pb2.SetBandwidthResult:
        if not cmd.relationship_id:
            self.runners.host_bucket.set_rate(float(cmd.bytes_per_second))
            return control_pb2.SetBandwidthResult(bytes_per_second=cmd.bytes_per_second)
        source = self.sources.get(cmd.relationship_id)
        if source is None:
            raise NotFound(f"this host is not the primary of relationship {cmd.relationship_id}")
        source.bucket.set_rate(float(cmd.bytes_per_second))
        return control_pb2.SetBandwidthResult(
            relationship_id=cmd.relationship_id, bytes_per_second=cmd.bytes_per_second
        )

    # -- reports ----------------------------------------------------------------------------
    def _replica_committed(
        self, grant: Grant, store: ReplicaStore, header: replication_pb2.CycleHeader
    ) -> None:
        store.maybe_seal(
            max_points=grant.recovery_points,
            interval=grant.point_interval,
            app_consistent=header.app_consistent,
        )

    def report(self) -> control_pb2.ReplicationReport:
        """Every relationship's status (runs in a worker thread, so it works on a snapshot of
        ``sources``, which the event loop changes as relationships come and go)."""
        return replication_report(list(self.sources.values()), self.state, self.registry)
