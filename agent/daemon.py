"""The agent's composition root: build the components, run them as siblings, stop them all.

Sibling tasks (control stream, certificate renewal, later the replication receiver and
senders) run under one :meth:`AgentDaemon.run`; when one fails, the others are cancelled and the
failure is reported, so the agent never limps on half-alive. :meth:`shutdown` is idempotent and
is all the service wrappers (systemd, Windows service) ever call.

One agent per home: the constructor locks the home (:mod:`sitepair.homelock`) right after reading
the configuration, before it repairs identity files, opens the journal or connects, and
:meth:`run` unlocks it last. Two agents on one home would steal the control stream from each
other forever and share a journal; the second one refuses instead and changes nothing.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from pathlib import Path

from agent import config as config_mod
from agent.commands import CommandExecutor, run_script
from agent.control import ControlClient
from agent.exporter import AgentMetrics
from agent.facts import host_facts
from agent.hosts import make_backend
from agent.identity import AgentIdentity, repair_pair
from agent.journal import CommandJournal
from agent.renewal import CertificateRenewer, IdentityHolder
from agent.replication.service import ReplicationService
from sitepair.clock import SYSTEM_CLOCK, Clock
from sitepair.homelock import HomeLock
from sitepair.v1 import common_pb2, control_pb2

log = logging.getLogger("sitepair.agent")


class AgentDaemon:
    def __init__(self, home: Path, *, clock: Clock = SYSTEM_CLOCK) -> None:
        self.home = Path(home)
        self.clock = clock
        # The configuration first: a folder that is no agent home gets no run/ folder.
        self.config = config_mod.load(self.home)
        self._home_lock = HomeLock.acquire(
            self.home, what="agent home", holder="sitepair-agent run"
        )
        try:
            self._build(clock)
        except BaseException:
            self._home_lock.release()
            raise
        self._stopping = False

    def _build(self, clock: Clock) -> None:
        """Everything that reads or writes the home; runs under the home lock."""
        repair_pair(self.home)
        self.identity = IdentityHolder(AgentIdentity.load(self.home))
        self.backend = make_backend(self.config)
        self.journal = CommandJournal(self.home / "state" / "agent.db")
        interrupted = self.journal.interrupted(clock.now())
        if interrupted:
            log.warning(
                "commands interrupted by the last stop were not re-run",
                extra={"fields": {"commands": interrupted}},
            )
        self.executor = CommandExecutor(self.journal, clock)
        self.replication = ReplicationService(
            home=self.home,
            config=self.config,
            backend=self.backend,
            identity=self.identity.get,
            clock=clock,
        )
        self.control = ControlClient(
            identity=self.identity.get,
            backend=self.backend,
            executor=self.executor,
            clock=clock,
            cloud=self.config.cloud,
            facts=self.facts,
            reports=self._reports,
        )
        self.renewer = CertificateRenewer(self.home, self.identity, clock)
        self.metrics = AgentMetrics(self.replication, self.identity.get)
        #: Where the metrics endpoint listens ("" = off); known once :meth:`run` started it.
        self.metrics_address = ""
        self._register_handlers()

    def _register_handlers(self) -> None:
        Result = control_pb2.CommandResult

        async def ping(cmd: control_pb2.Command) -> control_pb2.CommandResult:
            ident = self.identity.get()
            return Result(
                ping=control_pb2.PingResult(
                    note=cmd.ping.note, host_id=ident.host_id, name=ident.name
                )
            )

        async def refresh(cmd: control_pb2.Command) -> control_pb2.CommandResult:
            vms = await self.control.send_inventory()
            return Result(refresh_inventory=control_pb2.RefreshInventoryResult(vms=vms))

        async def script(cmd: control_pb2.Command) -> control_pb2.CommandResult:
            return Result(run_script=await run_script(self.config.scripts_dir, cmd.run_script))

        rep = self.replication

        async def configure_replica(cmd: control_pb2.Command) -> control_pb2.CommandResult:
            return Result(configure_replica=await rep.configure_replica(cmd.configure_replica))

        async def configure_source(cmd: control_pb2.Command) -> control_pb2.CommandResult:
            return Result(configure_source=await rep.configure_source(cmd.configure_source))

        async def remove(cmd: control_pb2.Command) -> control_pb2.CommandResult:
            return Result(remove_relationship=await rep.remove(cmd.remove_relationship))

        async def action(cmd: control_pb2.Command) -> control_pb2.CommandResult:
            return Result(replication_action=await rep.action(cmd.replication_action))

        async def bandwidth(cmd: control_pb2.Command) -> control_pb2.CommandResult:
            return Result(set_bandwidth=await rep.set_bandwidth(cmd.set_bandwidth))

        async def failover(cmd: control_pb2.Command) -> control_pb2.CommandResult:
            return Result(failover=await rep.failover(cmd.failover))

        async def failover_control(cmd: control_pb2.Command) -> control_pb2.CommandResult:
            return Result(failover_control=await rep.failover_control(cmd.failover_control))

        async def guest_run(cmd: control_pb2.Command) -> control_pb2.CommandResult:
            return Result(guest_run=await rep.guest_run(cmd.guest_run))

        async def vm_power(cmd: control_pb2.Command) -> control_pb2.CommandResult:
            return Result(vm_power=await rep.vm_power(cmd.vm_power))

        async def fence(cmd: control_pb2.Command) -> control_pb2.CommandResult:
            return Result(fence=await rep.fence(cmd.fence))

        async def revoke_host(cmd: control_pb2.Command) -> control_pb2.CommandResult:
            return Result(revoke_host=await rep.revoke_host(cmd.revoke_host))

        async def trust_bundle(cmd: control_pb2.Command) -> control_pb2.CommandResult:
            return Result(trust_bundle=await self.renewer.apply_trust(cmd.trust_bundle))

        handlers = {
            "ping": ping,
            "refresh_inventory": refresh,
            "run_script": script,
            "configure_replica": configure_replica,
            "configure_source": configure_source,
            "remove_relationship": remove,
            "replication_action": action,
            "set_bandwidth": bandwidth,
            "failover": failover,
            "failover_control": failover_control,
            "guest_run": guest_run,
            "vm_power": vm_power,
            "fence": fence,
            "revoke_host": revoke_host,
            "trust_bundle": trust_bundle,
        }
        for kind, handler in handlers.items():
            self.executor.register(kind, handler)

    def facts(self) -> common_pb2.HostFacts:
        facts = host_facts(backend=self.backend.kind, cloud=self.config.cloud)
        r = self.config.replication
        facts.replication_host = r.advertise_host or r.listen_host
        facts.certificate_port = r.advertise_certificate_port or self.replication.ports.get(
            "certificate", 0
        )
        facts.ticket_port = r.advertise_ticket_port or self.replication.ports.get("ticket", 0)
        facts.default_replica_path = str(self.config.replication.default_replica_path)
        return facts

    def _reports(self) -> list[control_pb2.AgentMessage]:
        report = self.replication.report()
        if not report.relationships:
            return []
        return [control_pb2.AgentMessage(replication=report)]

    async def run(self, *, on_ready: Callable[[], None] | None = None) -> None:
        """Run until :meth:`shutdown`. ``on_ready`` is called once the replication ports listen:
        the agent is ready (it serves its peers; the broker connection comes and goes)."""
        ident = self.identity.get()
        log.info(
            "agent starting",
            extra={"fields": {"host_id": ident.host_id, "name": ident.name, "site": ident.site}},
        )
        try:
            if self.config.metrics.enabled:
                self.metrics_address = await asyncio.to_thread(
                    self.metrics.serve, self.config.metrics, self.home
                )
            await self.replication.start()
        except BaseException:
            await asyncio.to_thread(self.metrics.shutdown)
            # Nothing runs yet; let the home go, so a retry in this process is not refused.
            self.journal.close()
            self._home_lock.release()
            raise
        if on_ready is not None:
            on_ready()
        tasks = [
            asyncio.create_task(self.replication.run(), name="replication"),
            asyncio.create_task(self.control.run(), name="control"),
            asyncio.create_task(self.renewer.run(), name="renewal"),
        ]
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            for t in done:
                if not t.cancelled() and t.exception() is not None and not self._stopping:
                    raise t.exception()  # type: ignore[misc]
        finally:
            await self.shutdown()
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await asyncio.to_thread(self.metrics.shutdown)
            self.journal.close()
            self._home_lock.release()
            log.info("agent stopped")

    async def shutdown(self) -> None:
        if self._stopping:
            return
        self._stopping = True
        await self.control.shutdown()
        await self.renewer.shutdown()
        await self.replication.shutdown()
