"""The broker's composition root: build every component, serve, shut down gracefully.

``Broker.start()`` first locks the home (:mod:`sitepair.homelock`): a second broker on the same
home refuses before it opens the store or changes anything, since a broker that has just started
marks every host disconnected and writes ``run/broker.json``. It then opens the store (SQLite
in the home, or the PostgreSQL database that ``[store]`` names), joins the brokers sharing it
(leader election), loads the CA, binds the enrollment port (server TLS) and the control/admin
port (mutual TLS, ``require_client_auth``) and, when ``[dashboard] enabled``, the web dashboard
(HTTPS, :mod:`broker.web`), and starts the sibling tasks (heartbeat writer,
liveness monitor, certificate renewal); the liveness monitor, the health loop and job recovery
run on the leader only (:mod:`broker.store.postgres` says why). ``Broker.shutdown()`` is
idempotent: it stops accepting, tells connected agents Goodbye(SHUTTING_DOWN), lets calls drain
for a grace period, flushes heartbeats, gives the leader lease up, closes the store, removes the
run file it wrote and unlocks the home. If a sibling task fails, or ``start()`` fails half-way,
the broker shuts down rather than limp on half-alive.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc.aio

from broker import config as config_mod
from broker import operators
from broker.agent_commands import AgentCommands
from broker.auth import BrokerAuthorizer
from broker.ca import (
    CertificateAuthority,
    ServerCertificate,
    refresh_local_operator,
    write_operator_profile,
)
from broker.ca_rotation import CaRotation
from broker.clouds import CloudManager
from broker.commands import CommandDispatcher
from broker.drill_schedule import DrillScheduler
from broker.drills import DrillManager
from broker.failback import FailbackManager
from broker.failover import FailoverManager
from broker.heartbeats import HeartbeatWriter, LivenessMonitor
from broker.home import BrokerHome
from broker.jobs import JobManager, new_id
from broker.metrics import BrokerMetrics
from broker.orchestration import Orchestration
from broker.plans import PlanManager
from broker.protection import ProtectionManager
from broker.reports import ReplicationReports
from broker.servers import ServerOperations
from broker.services.admin import AdminService
from broker.services.ca import CaAdminService
from broker.services.context import BrokerContext
from broker.services.control import ControlService
from broker.services.enrollment import EnrollmentService
from broker.sessions import SessionRegistry
from broker.store.base import Store
from broker.store.leadership import Leadership, LeaseLeadership, SoleLeadership
from broker.store.sqlite import SqliteStore
from broker.verify import VerifyScheduler
from broker.web.server import DashboardServer
from sitepair import pki, tickets
from sitepair.clock import SYSTEM_CLOCK, Clock
from sitepair.errors import ConfigError, FailedPrecondition
from sitepair.fsutil import atomic_write, ensure_private_dir
from sitepair.homelock import HomeLock
from sitepair.rpc import CONTROL_MAX_RECEIVE, add_servicer, server_options
from sitepair.v1 import admin_pb2_grpc, control_pb2, control_pb2_grpc, enrollment_pb2_grpc

#: BrokerContext is defined beside the servicers (broker/services/context.py) and exported here
#: too, as what :meth:`Broker.start` returns.
__all__ = ["Broker", "BrokerContext", "init_home", "open_store"]

log = logging.getLogger("sitepair.broker")


def open_store(config: config_mod.StoreConfig, home: BrokerHome) -> Store:
    """The store ``[store]`` names, migrated to this version's schema (blocking)."""
    if config.backend == "postgresql":
        # Imported here: a SQLite broker never loads the PostgreSQL driver.
        from broker.store.postgres import PostgresStore

        return PostgresStore.open(config.dsn)
    return SqliteStore.open(home.database)


def init_home(
    root: Path,
    *,
    vault: str,
    enrollment: str = "127.0.0.1:8444",
    control: str = "127.0.0.1:8443",
    server_names: tuple[str, ...] = ("localhost",),
    clock: Clock = SYSTEM_CLOCK,
    store: config_mod.StoreConfig | None = None,
    advertise: tuple[str, ...] = (),
) -> BrokerHome:
    """Create a broker home: config, CA, serving certificate, ticket key, store, local admin.

    With a PostgreSQL ``store`` the database must not hold a vault yet: a second broker of the
    same vault is a copy of this home (it needs the same CA and ticket key), not a new ``init``.
    The home is locked while it is written, so two ``init`` on one folder cannot interleave; a
    running broker's home already holds a configuration, which ``init`` refuses.
    """
    pki.check_vault_name(vault)
    # Addresses are checked before anything is written (``advertise``: names and IPs agents dial).
    network = config_mod.network_settings(
        enrollment=enrollment, control=control, advertise=advertise, server_names=server_names
    )
    store_config = store or config_mod.StoreConfig()
    config_mod.check_store(store_config)
    home = BrokerHome(Path(root))
    _check_no_broker(home)
    # The store first: a database that already belongs to a vault stops init before it writes.
    opened = open_store(store_config, home) if store_config.backend == "postgresql" else None
    lock: HomeLock | None = None
    try:
        if opened is not None:
            with opened.read() as tx:
                existing = tx.get_meta("vault")
            if existing is not None:
                raise FailedPrecondition(
                    f"{opened.description} already holds vault {existing!r}",
                    hint="for another broker of that vault, copy the first broker's home "
                    "(see docs/operations.md); for a new vault, use another database or schema",
                )
        ensure_private_dir(home.root)
        lock = HomeLock.acquire(home.root, what="broker home", holder="sitepair-broker init")
        _check_no_broker(home)  # again, under the lock: another init may have just finished
        now = clock.now()
        atomic_write(
            home.config,
            config_mod.render(
                vault,
                enrollment=enrollment,
                control=control,
                names=server_names,
                store=store_config,
                advertise=advertise,
            ).encode(),
        )
        cfg = config_mod.load(home.config)
        _init_credentials(home, cfg, vault, now=now, clock=clock, control=network.local_control)
        if opened is None:
            opened = open_store(store_config, home)
        with opened.write() as tx:
            tx.set_meta("vault", vault)
            tx.set_meta("created_at", str(now))
    finally:
        if opened is not None:
            opened.close()
        if lock is not None:
            lock.release()
    return home


def _check_no_broker(home: BrokerHome) -> None:
    if home.config.exists() or home.ca_key.exists():
        raise FailedPrecondition(
            f"{home.root} already holds a broker",
            hint="use another folder, or `serve` the existing one",
        )


def _init_credentials(
    home: BrokerHome,
    cfg: config_mod.BrokerConfig,
    vault: str,
    *,
    now: float,
    clock: Clock,
    control: str,
) -> None:
    """The CA, the serving certificate, the ticket key and a local operator of a new home."""
    ca = CertificateAuthority.create(home, vault, now=now)
    ServerCertificate(
        home,
        ca,
        clock,
        lifetime=cfg.certificates.server_lifetime,
        dns_names=cfg.certificates.server_names,
        ip_addresses=cfg.certificates.server_ips,
    ).ensure_fresh()
    ensure_private_dir(home.ticket_key.parent)
    tickets.write_signing_key(home.ticket_key, tickets.generate_signing_key())
    # A local operator so `sitepair-broker ... --home DIR` works on this machine at once.
    key = pki.generate_key()
    cert = ca.issue(
        key.public_key(),
        pki.Identity(vault=vault, role=pki.Role.ADMIN, id="local-admin"),
        common_name="local admin",
        now=now,
        lifetime=cfg.certificates.operator_lifetime,
    )
    write_operator_profile(
        home.admin_dir, key=key, cert=cert, ca_pem=ca.pem, vault=vault, addresses=[control]
    )


class Broker:
    def __init__(
        self,
        home: Path,
        *,
        clock: Clock = SYSTEM_CLOCK,
        config: config_mod.BrokerConfig | None = None,
    ) -> None:
        self.home = BrokerHome(Path(home))
        self.config = config or config_mod.load(self.home.config)
        self.clock = clock
        self.ctx: BrokerContext | None = None
        self._enroll_server: grpc.aio.Server | None = None
        self._control_server: grpc.aio.Server | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._stopped = asyncio.Event()
        self._shutdown_started = False
        self._liveness: LivenessMonitor | None = None
        self._failure: BaseException | None = None
        self._heartbeat_task: asyncio.Task[Any] | None = None
        #: Held from the start of :meth:`start` to the end of :meth:`shutdown`.
        self._home_lock: HomeLock | None = None
        #: Whether this broker wrote ``run/broker.json`` (only then does it remove it).
        self._wrote_run_file = False
        #: This broker process among those sharing the store (job owner, leader election).
        self.broker_id = new_id("broker")
        self.leadership: Leadership = SoleLeadership(self.broker_id)
        #: The Prometheus registry and endpoint (:mod:`broker.metrics`); made by :meth:`start`.
        self.metrics: BrokerMetrics | None = None
        #: Where the metrics endpoint listens ("" = off).
        self.metrics_address = ""
        #: Starts the scheduled drills (:mod:`broker.drills`); made by :meth:`start`.
        self.drill_scheduler: DrillScheduler | None = None
        #: The web dashboard (:mod:`broker.web`), when ``[dashboard] enabled``.
        self.dashboard: DashboardServer | None = None

    # -- lifecycle --------------------------------------------------------------------------
    async def start(self) -> BrokerContext:
        """Lock the home, then open the store, bind, serve and start the sibling tasks.

        The lock comes before anything else: a broker refused because another one serves this
        home has opened nothing, written nothing (no hosts disconnected, no run file) and has
        nothing to shut down. A failure after the lock shuts down what was started, which also
        unlocks the home.
        """
        self._home_lock = await asyncio.to_thread(
            HomeLock.acquire, self.home.root, what="broker home", holder="sitepair-broker serve"
        )
        try:
            return await self._start()
        except BaseException:
            await self.shutdown(grace=0)
            raise

    async def _start(self) -> BrokerContext:
        cfg, home, clock = self.config, self.home, self.clock
        store = await asyncio.to_thread(open_store, cfg.store, home)
        vault = await store.reading(lambda tx: tx.get_meta("vault"))
        if vault is None:
            store.close()
            raise ConfigError(
                f"store {store.description} has no vault: was the home made by `init`?"
            )
        if vault != cfg.vault:
            store.close()
            raise ConfigError(
                f"{home.config} names vault {cfg.vault!r} but the store belongs to {vault!r}"
            )
        ca = CertificateAuthority.load(home, cfg.vault)
        server_cert = ServerCertificate(
            home,
            ca,
            clock,
            lifetime=cfg.certificates.server_lifetime,
            dns_names=cfg.certificates.server_names,
            ip_addresses=cfg.certificates.server_ips,
        )
        # A home whose ca/ was copied from the broker that ran a CA rotation phase (several
        # brokers on one store): its own operator follows here.
        await asyncio.to_thread(
            refresh_local_operator,
            home,
            ca,
            now=clock.now(),
            lifetime=cfg.certificates.operator_lifetime,
        )
        removed = await store.reading(lambda tx: tx.removed_server_ids())
        # A broker that has just started has no agent connected. On a shared store, agents are
        # connected to the other brokers; the leader's liveness monitor disconnects those of a
        # broker that died.
        disconnected = (
            0
            if store.shared
            else await store.writing(lambda tx: tx.disconnect_all_servers(clock.now()))
        )
        revoked = await store.reading(lambda tx: tx.revoked_operator_ids())
        authorizer = BrokerAuthorizer(cfg.vault, removed_servers=removed, revoked_operators=revoked)
        sessions = SessionRegistry()
        jobs = JobManager(store, clock, owner=self.broker_id)
        dispatcher = CommandDispatcher(store, sessions, clock)
        heartbeats = HeartbeatWriter(store)
        servers = ServerOperations(
            store=store,
            clock=clock,
            jobs=jobs,
            sessions=sessions,
            dispatcher=dispatcher,
            authorizer=authorizer,
            spawn=self.spawn,
        )
        ticket_key = tickets.load_signing_key(home.ticket_key)
        orchestration = Orchestration(
            store=store,
            clock=clock,
            jobs=jobs,
            dispatcher=dispatcher,
            sessions=sessions,
            spawn=self.spawn,
        )
        commands = AgentCommands(store=store, ticket_key=ticket_key)
        reports = ReplicationReports(
            store=store,
            clock=clock,
            agent_lifetime=cfg.certificates.agent_lifetime,
            health=cfg.health,
        )
        clouds = CloudManager(orchestration, commands=commands)
        protection = ProtectionManager(orchestration, commands=commands, reports=reports)
        failback = FailbackManager(orchestration, commands=commands, reports=reports)
        failover = FailoverManager(
            orchestration, commands=commands, reports=reports, failback=failback
        )
        plans = PlanManager(orchestration, failover=failover, failback=failback)
        drills = DrillManager(orchestration, plans=plans, failover=failover, reports=reports)
        ctx = BrokerContext(
            config=cfg,
            clock=clock,
            store=store,
            ca=ca,
            server_cert=server_cert,
            authorizer=authorizer,
            sessions=sessions,
            jobs=jobs,
            dispatcher=dispatcher,
            heartbeats=heartbeats,
            servers=servers,
            clouds=clouds,
            protection=protection,
            reports=reports,
            failover=failover,
            failback=failback,
            plans=plans,
            drills=drills,
            ticket_key=ticket_key,
            started_at=clock.now(),
            ca_rotation=CaRotation(
                home=home,
                ca=ca,
                server_cert=server_cert,
                store=store,
                dispatcher=dispatcher,
                sessions=sessions,
                clock=clock,
                operator_lifetime=cfg.certificates.operator_lifetime,
            ),
        )
        self.ctx = ctx
        limits = cfg.limits
        self._enroll_server = grpc.aio.server(
            options=server_options(max_message_bytes=256 * 1024, max_concurrent_streams=8),
            maximum_concurrent_rpcs=limits.max_concurrent_enrollments * 2,
        )
        add_servicer(
            enrollment_pb2_grpc.add_EnrollmentServicer_to_server,
            EnrollmentService(ctx),
            self._enroll_server,
        )
        enroll_port = self._bind(
            self._enroll_server,
            cfg.listen.enrollment,
            server_cert.credentials(require_client_auth=False),
        )
        self._control_server = grpc.aio.server(
            options=server_options(
                max_message_bytes=limits.max_message_bytes,
                # Agents and operators send small messages; a bigger one is refused by gRPC
                # before it is read into memory (broker/bounds.py checks what is below).
                max_receive_bytes=CONTROL_MAX_RECEIVE,
                max_concurrent_streams=limits.max_streams_per_connection,
            ),
            maximum_concurrent_rpcs=limits.max_concurrent_rpcs,
        )
        add_servicer(
            control_pb2_grpc.add_ControlServicer_to_server,
            ControlService(ctx),
            self._control_server,
        )
        add_servicer(
            admin_pb2_grpc.add_AdminServicer_to_server, AdminService(ctx), self._control_server
        )
        add_servicer(
            admin_pb2_grpc.add_CertificateAuthorityServicer_to_server,
            CaAdminService(ctx),
            self._control_server,
        )
        control_port = self._bind(
            self._control_server,
            cfg.listen.control,
            server_cert.credentials(require_client_auth=True),
        )
        ctx.bound_enrollment = _with_port(cfg.listen.enrollment, enroll_port)
        ctx.bound_control = _with_port(cfg.listen.control, control_port)
        await self._enroll_server.start()
        await self._control_server.start()
        self.metrics = BrokerMetrics(
            store=store,
            clock=clock,
            sessions=sessions,
            serving_not_after=lambda: server_cert.not_after,
            ca_cert_not_after=lambda: pki.not_after(ca.cert),
            agent_lifetime=cfg.certificates.agent_lifetime,
        )
        if cfg.metrics.enabled:
            self.metrics_address = await asyncio.to_thread(
                self.metrics.serve, cfg.metrics, home.root
            )
        if cfg.dashboard.enabled:
            self.dashboard = DashboardServer(ctx, home, requests=self.metrics.dashboard_requests)
            ctx.bound_dashboard = await self.dashboard.start()

        if store.shared:
            self.leadership = LeaseLeadership(
                store,
                self.broker_id,
                lease=cfg.store.leader_lease,
                description=f"{socket.gethostname()} pid {os.getpid()} control {ctx.bound_control}",
            )
        leadership = self.leadership
        await leadership.join()
        self._liveness = LivenessMonitor(
            store,
            sessions,
            clock,
            interval=cfg.heartbeat.interval,
            missed=cfg.heartbeat.missed,
            leader=leadership,
        )
        self._heartbeat_task = self.spawn(heartbeats.run(), essential=True)
        self.spawn(self._liveness.run(), essential=True)
        self.spawn(self._renew_serving_certificate(), essential=True)
        self.spawn(reports.run_health(cfg.heartbeat.interval, leader=leadership), essential=True)
        verifier = VerifyScheduler(
            store=store, clock=clock, jobs=jobs, protection=protection, config=cfg.verify
        )
        self.spawn(verifier.run(leader=leadership), essential=True)
        self.drill_scheduler = DrillScheduler(store=store, clock=clock, drills=drills)
        self.spawn(self.drill_scheduler.run(leader=leadership), essential=True)
        if store.shared:  # other brokers of the store revoke operators too
            self.spawn(operators.follow_revocations(store, authorizer), essential=True)
        if leadership.is_leader:
            await jobs.recover()
        # A leader that takes over from a broker that is gone recovers that broker's jobs.
        self.spawn(leadership.run(on_lead=jobs.recover), essential=True)
        await asyncio.to_thread(self._write_run_file)
        log.info(
            "broker started",
            extra={
                "fields": {
                    "vault": cfg.vault,
                    "enrollment": ctx.bound_enrollment,
                    "control": ctx.bound_control,
                    "dashboard": ctx.bound_dashboard,
                    "store": store.description,
                    "broker": self.broker_id,
                    "leader": leadership.is_leader,
                    "was_connected": disconnected,
                }
            },
        )
        return ctx

    def _bind(self, server: grpc.aio.Server, address: str, creds: grpc.ServerCredentials) -> int:
        try:
            port = server.add_secure_port(address, creds)
        except RuntimeError as exc:
            raise ConfigError(
                f"cannot listen on {address}: {exc}",
                hint="is another broker running, or the port in use?",
            ) from exc
        if port == 0:
            raise ConfigError(f"cannot listen on {address}", hint="is the port in use?")
        return port

    def _write_run_file(self) -> None:
        assert self.ctx is not None
        doc = {
            "pid": os.getpid(),
            "vault": self.config.vault,
            "enrollment": self.ctx.bound_enrollment,
            "control": self.ctx.bound_control,
        }
        if self.ctx.bound_dashboard:
            doc["dashboard"] = self.ctx.bound_dashboard
        atomic_write(self.home.run_file, (json.dumps(doc, indent=2) + "\n").encode())
        self._wrote_run_file = True

    def spawn(self, coro: Awaitable[Any], *, essential: bool = False) -> asyncio.Task[Any]:
        """Run ``coro`` as a sibling task; if ``essential`` and it fails, the broker stops."""
        task: asyncio.Task[Any] = asyncio.ensure_future(coro)
        self._tasks.add(task)

        def done(t: asyncio.Task[Any]) -> None:
            self._tasks.discard(t)
            if t.cancelled():
                return
            exc = t.exception()
            if exc is not None:
                log.error("background task failed", exc_info=exc)
                if essential and not self._shutdown_started:
                    self._failure = exc
                    self._stopped.set()

        task.add_done_callback(done)
        return task

    async def _renew_serving_certificate(self) -> None:
        assert self.ctx is not None
        while True:
            await asyncio.sleep(600)
            await asyncio.to_thread(self.ctx.server_cert.ensure_fresh)

    async def run(self, *, on_ready: Callable[[BrokerContext], None] | None = None) -> None:
        """Start, serve until :meth:`shutdown` is called (or an essential task fails).

        ``on_ready`` is called once the store is open and both ports listen: the broker is
        ready (sitepair.service.runtime tells systemd so)."""
        ctx = await self.start()
        if on_ready is not None:
            on_ready(ctx)
        await self._stopped.wait()
        await self.shutdown()
        if self._failure is not None:
            raise self._failure

    def request_stop(self) -> None:
        """Ask :meth:`run` to shut down (safe from a signal handler on the loop)."""
        self._stopped.set()

    async def shutdown(self, grace: float = 5.0) -> None:
        if self._shutdown_started:
            return
        self._shutdown_started = True
        self._stopped.set()
        ctx = self.ctx
        if ctx is not None:
            ctx.sessions.close_all(
                control_pb2.Goodbye(
                    reason=control_pb2.Goodbye.SHUTTING_DOWN, message="the broker is shutting down"
                )
            )
        for server in (self._enroll_server, self._control_server):
            if server is not None:
                await server.stop(grace)
        if self.dashboard is not None:
            await self.dashboard.stop()
        if self._liveness is not None:
            await self._liveness.shutdown()
        # Give the leader lease up while the store is still open: another broker leads at once.
        await self.leadership.shutdown()
        if ctx is not None:
            await ctx.heartbeats.shutdown()
            if self._heartbeat_task is not None:
                # Let the heartbeat writer flush its last batch.
                await asyncio.wait([self._heartbeat_task], timeout=5)
        pending = [t for t in self._tasks if not t.done()]
        for t in pending:
            t.cancel()
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)
        if self.metrics is not None:
            await asyncio.to_thread(self.metrics.shutdown)
        if ctx is not None:
            ctx.store.close()
        # Only the broker that wrote the run file removes it; the home lock guarantees no other
        # broker has written it since.
        if self._wrote_run_file:
            with contextlib.suppress(OSError):
                self.home.run_file.unlink()
        if self._home_lock is not None:
            self._home_lock.release()
        log.info("broker stopped")


def _with_port(address: str, port: int) -> str:
    host = address.rsplit(":", 1)[0]
    return f"{host}:{port}"
