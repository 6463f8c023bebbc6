"""The operator API (port 8443, mutual TLS, role ``admin``).

Lists that grow with the vault page (:mod:`broker.paging`): ListServers by (site, name, id),
ListJobs newest first, ListRegistrationKeys oldest first; the protection lists are in
:mod:`broker.services.admin_protection`.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import grpc.aio

from broker import dashboard_logins, operators, paging
from broker.convert import job_to_proto, key_to_proto, server_to_proto
from broker.services.admin_checks import check_job_state, check_site
from broker.services.admin_drills import DrillAdmin
from broker.services.admin_protection import ProtectionAdmin
from broker.store.models import Job, Operator, RegistrationKey, Server
from broker.store.sqlite import Tx
from sitepair import __version__, credentials, pki
from sitepair.errors import FailedPrecondition, InvalidArgument, NotFound
from sitepair.protoconv import timestamp
from sitepair.rpc import rpc
from sitepair.v1 import admin_pb2, admin_pb2_grpc

if TYPE_CHECKING:
    from broker.services.context import BrokerContext

log = logging.getLogger("sitepair.broker.admin")

ADMIN = [pki.Role.ADMIN]
MAX_KEY_USES = 1000


def _operator_proto(o: Operator) -> admin_pb2.Operator:
    msg = admin_pb2.Operator(
        id=o.id,
        name=o.name,
        created_at=timestamp(o.created_at),
        certificate_not_after=timestamp(o.cert_not_after),
        local=o.id == operators.LOCAL_OPERATOR,
    )
    if o.removed_at is not None:
        msg.revoked_at.CopyFrom(timestamp(o.removed_at))
    return msg


class AdminService(ProtectionAdmin, DrillAdmin, admin_pb2_grpc.AdminServicer):
    def __init__(self, ctx: BrokerContext) -> None:
        self.ctx = ctx
        self.authorizer = ctx.authorizer

    @rpc(roles=ADMIN)
    async def GetBrokerInfo(
        self,
        request: admin_pb2.GetBrokerInfoRequest,
        context: grpc.aio.ServicerContext[Any, Any],
        identity: pki.Identity,
    ) -> admin_pb2.BrokerInfo:
        ctx = self.ctx
        is_leader, leader = await self._leadership()
        return admin_pb2.BrokerInfo(
            vault=ctx.config.vault,
            version=__version__,
            started_at=timestamp(ctx.started_at),
            enrollment_addresses=ctx.enrollment_addresses(),
            control_addresses=ctx.control_addresses(),
            store=ctx.store.description,
            connected_servers=len(ctx.sessions),
            server_certificate_not_after=timestamp(ctx.server_cert.not_after),
            ca_not_after=timestamp(pki.not_after(ctx.ca.cert)),
            is_leader=is_leader,
            leader=leader,
        )

    async def _leadership(self) -> tuple[bool, str]:
        """A broker alone on its store (SQLite) always leads; brokers sharing one elect the
        broker with the oldest live lease (:mod:`broker.store.leadership`)."""
        ctx = self.ctx
        if not ctx.store.shared:
            return True, ""
        members = await ctx.store.reading(lambda tx: tx.live_brokers())
        if not members:
            return False, ""
        return members[0].id == ctx.jobs.owner, members[0].description

    # -- registration keys ------------------------------------------------------------------
    @rpc(roles=ADMIN)
    async def CreateRegistrationKey(
        self,
        request: admin_pb2.CreateRegistrationKeyRequest,
        context: grpc.aio.ServicerContext[Any, Any],
        identity: pki.Identity,
    ) -> admin_pb2.CreateRegistrationKeyResponse:
        ctx = self.ctx
        site = pki.check_identifier(request.site, "site")
        validity = float(request.valid_seconds) or ctx.config.keys.default_validity
        if validity > ctx.config.keys.max_validity:
            raise InvalidArgument(
                f"a registration key may be valid for at most "
                f"{ctx.config.keys.max_validity / 86400:g} days",
                hint="ask for a shorter validity, or raise [keys] max_validity",
            )
        uses = request.uses or 1
        if uses > MAX_KEY_USES:
            raise InvalidArgument(f"a registration key may have at most {MAX_KEY_USES} uses")
        now = ctx.clock.now()
        key_id = f"key-{uuid.uuid4().hex[:12]}"
        secret = credentials.new_secret()
        key = RegistrationKey(
            id=key_id,
            site=site,
            secret_hash=credentials.hash_secret(key_id, secret),
            created_at=now,
            expires_at=now + validity,
            uses_total=uses,
            uses_remaining=uses,
            revoked_at=None,
            created_by=identity.id,
        )

        def insert(tx: Tx) -> None:
            tx.insert_key(key)

        await ctx.store.writing(insert)
        creds = credentials.Credentials(
            vault=ctx.config.vault,
            site=site,
            enrollment_addresses=tuple(ctx.enrollment_addresses()),
            ca_pem=ctx.ca.pem,
            key_id=key_id,
            secret=secret,
            expires_at=key.expires_at,
            uses=uses,
        )
        log.info(
            "registration key created",
            extra={"fields": {"key": key_id, "site": site, "uses": uses, "by": identity.id}},
        )
        return admin_pb2.CreateRegistrationKeyResponse(
            key=key_to_proto(key, now), credentials_file=creds.to_json()
        )

    @rpc(roles=ADMIN)
    async def ListRegistrationKeys(
        self,
        request: admin_pb2.ListRegistrationKeysRequest,
        context: grpc.aio.ServicerContext[Any, Any],
        identity: pki.Identity,
    ) -> admin_pb2.ListRegistrationKeysResponse:
        after = paging.decode_token(request.page_token, (float, str))
        size = paging.page_size(request.page_size)
        now = self.ctx.clock.now()

        def read(tx: Tx) -> admin_pb2.ListRegistrationKeysResponse:
            # Inactive keys are filtered here (a key's state depends on the time), so a page
            # may hold fewer keys than asked for; the token still moves past every key read.
            rows = tx.key_page(after=after, limit=size + 1)
            keys, token = paging.fill(
                rows, size, lambda k: key_to_proto(k, now), lambda k: (k.created_at, k.id)
            )
            return admin_pb2.ListRegistrationKeysResponse(
                keys=[k for k in keys if request.include_inactive or k.state == "active"],
                next_page_token=token,
            )

        return await self.ctx.store.reading(read)

    @rpc(roles=ADMIN)
    async def RevokeRegistrationKey(
        self,
        request: admin_pb2.RevokeRegistrationKeyRequest,
        context: grpc.aio.ServicerContext[Any, Any],
        identity: pki.Identity,
    ) -> admin_pb2.RegistrationKey:
        now = self.ctx.clock.now()

        def revoke(tx: Tx) -> RegistrationKey:
            return tx.revoke_key(request.id, now)

        key = await self.ctx.store.writing(revoke)
        log.info("registration key revoked", extra={"fields": {"key": key.id, "by": identity.id}})
        return key_to_proto(key, now)

    # -- servers ----------------------------------------------------------------------------
    @rpc(roles=ADMIN)
    async def ListServers(
        self,
        request: admin_pb2.ListServersRequest,
        context: grpc.aio.ServicerContext[Any, Any],
        identity: pki.Identity,
    ) -> admin_pb2.ListServersResponse:
        after = paging.decode_token(request.page_token, (str, str, str))
        size = paging.page_size(request.page_size)

        def read(tx: Tx) -> admin_pb2.ListServersResponse:
            if request.site:
                check_site(tx, request.site)
            rows = tx.server_page(
                site=request.site,
                include_removed=request.include_removed,
                after=after,
                limit=size + 1,
            )
            counts = tx.vm_counts([s.id for s in rows])

            def convert(s: Server) -> admin_pb2.Server:
                msg = server_to_proto(s, vm_count=counts.get(s.id, 0))
                msg.cloud = tx.cloud_of(s.id) or ""
                return paging.trim(msg, ["metrics", "facts"])

            servers, token = paging.fill(rows, size, convert, lambda s: (s.site, s.name, s.id))
            return admin_pb2.ListServersResponse(servers=servers, next_page_token=token)

        return await self.ctx.store.reading(read)

    @rpc(roles=ADMIN)
    async def GetServer(
        self,
        request: admin_pb2.GetServerRequest,
        context: grpc.aio.ServicerContext[Any, Any],
        identity: pki.Identity,
    ) -> admin_pb2.Server:
        def read(tx: Tx) -> admin_pb2.Server:
            server = tx.find_server(request.server)
            count = tx.vm_counts([server.id]).get(server.id, 0)
            msg = server_to_proto(
                server, tx.get_inventory(server.id), with_inventory=True, vm_count=count
            )
            msg.cloud = tx.cloud_of(server.id) or ""
            return paging.trim(
                msg, ["inventory", "metrics", "facts"], limit=paging.MAX_RESPONSE_BYTES
            )

        return await self.ctx.store.reading(read)

    @rpc(roles=ADMIN)
    async def RemoveServer(
        self,
        request: admin_pb2.RemoveServerRequest,
        context: grpc.aio.ServicerContext[Any, Any],
        identity: pki.Identity,
    ) -> admin_pb2.Job:
        return job_to_proto(await self.ctx.servers.remove(request.server, by=identity.id))

    @rpc(roles=ADMIN)
    async def PingServer(
        self,
        request: admin_pb2.PingServerRequest,
        context: grpc.aio.ServicerContext[Any, Any],
        identity: pki.Identity,
    ) -> admin_pb2.Job:
        job = await self.ctx.servers.ping(request.server, request.note, by=identity.id)
        return job_to_proto(job)

    @rpc(roles=ADMIN)
    async def RefreshServer(
        self,
        request: admin_pb2.RefreshServerRequest,
        context: grpc.aio.ServicerContext[Any, Any],
        identity: pki.Identity,
    ) -> admin_pb2.Job:
        return job_to_proto(await self.ctx.servers.refresh(request.server, by=identity.id))

    # -- operators --------------------------------------------------------------------------
    @rpc(roles=ADMIN)
    async def AddOperator(
        self,
        request: admin_pb2.AddOperatorRequest,
        context: grpc.aio.ServicerContext[Any, Any],
        identity: pki.Identity,
    ) -> admin_pb2.AddOperatorResponse:
        ctx = self.ctx
        name = pki.check_identifier(request.name, "operator name")
        public_key = pki.public_key_from_csr(request.csr_der)
        lifetime = float(request.valid_seconds) or ctx.config.certificates.operator_lifetime
        now = ctx.clock.now()
        op_id = f"op-{uuid.uuid4().hex[:12]}"
        cert = ctx.ca.issue(
            public_key,
            pki.Identity(vault=ctx.config.vault, role=pki.Role.ADMIN, id=op_id),
            common_name=name,
            now=now,
            lifetime=lifetime,
        )
        op = Operator(
            id=op_id,
            name=name,
            created_at=now,
            cert_serial=format(cert.serial_number, "x"),
            cert_not_after=pki.not_after(cert),
        )

        def insert(tx: Tx) -> None:
            tx.insert_operator(op)

        await ctx.store.writing(insert)
        log.info(
            "operator added", extra={"fields": {"operator": op_id, "name": name, "by": identity.id}}
        )
        return admin_pb2.AddOperatorResponse(
            certificate_pem=pki.cert_to_pem(cert),
            ca_pem=ctx.ca.pem,
            control_addresses=ctx.control_addresses(),
            vault=ctx.config.vault,
        )

    @rpc(roles=ADMIN)
    async def ListOperators(
        self,
        request: admin_pb2.ListOperatorsRequest,
        context: grpc.aio.ServicerContext[Any, Any],
        identity: pki.Identity,
    ) -> admin_pb2.ListOperatorsResponse:
        everyone = await operators.list_operators(self.ctx.store, self.ctx.server_cert)
        return admin_pb2.ListOperatorsResponse(
            operators=[
                _operator_proto(o)
                for o in everyone
                if request.include_revoked or o.removed_at is None
            ]
        )

    @rpc(roles=ADMIN)
    async def RevokeOperator(
        self,
        request: admin_pb2.RevokeOperatorRequest,
        context: grpc.aio.ServicerContext[Any, Any],
        identity: pki.Identity,
    ) -> admin_pb2.Operator:
        ctx = self.ctx
        op = await operators.revoke(
            request.operator,
            by=identity.id,
            store=ctx.store,
            server_cert=ctx.server_cert,
            authorizer=ctx.authorizer,
            clock=ctx.clock,
        )
        return _operator_proto(op)

    @rpc(roles=ADMIN)
    async def CreateDashboardLogin(
        self,
        request: admin_pb2.CreateDashboardLoginRequest,
        context: grpc.aio.ServicerContext[Any, Any],
        identity: pki.Identity,
    ) -> admin_pb2.DashboardLogin:
        ctx = self.ctx
        if not ctx.bound_dashboard:
            raise FailedPrecondition(
                "this broker does not serve the web dashboard",
                hint="set [dashboard] enabled = true in its broker.toml and restart it "
                "(docs/dashboard.md)",
            )
        login = await dashboard_logins.create_login(ctx.store, ctx.clock, identity)
        log.info("dashboard login token issued", extra={"fields": {"operator": identity.id}})
        return admin_pb2.DashboardLogin(
            token=login.token,
            expires_at=timestamp(login.expires_at),
            address=ctx.bound_dashboard,
        )

    # -- jobs -------------------------------------------------------------------------------
    @rpc(roles=ADMIN)
    async def ListJobs(
        self,
        request: admin_pb2.ListJobsRequest,
        context: grpc.aio.ServicerContext[Any, Any],
        identity: pki.Identity,
    ) -> admin_pb2.ListJobsResponse:
        after = paging.decode_token(request.page_token, (float, str))
        size = paging.page_size(request.page_size or request.limit)

        check_job_state(request.state)

        def read(tx: Tx) -> admin_pb2.ListJobsResponse:
            rows = tx.job_page(state=request.state, kind=request.kind, after=after, limit=size + 1)

            def convert(j: Job) -> admin_pb2.Job:
                return paging.trim(job_to_proto(j), ["result_json", "steps", "error"])

            jobs, token = paging.fill(rows, size, convert, lambda j: (j.created_at, j.id))
            return admin_pb2.ListJobsResponse(jobs=jobs, next_page_token=token)

        return await self.ctx.store.reading(read)

    @rpc(roles=ADMIN)
    async def GetJob(
        self,
        request: admin_pb2.GetJobRequest,
        context: grpc.aio.ServicerContext[Any, Any],
        identity: pki.Identity,
    ) -> admin_pb2.Job:
        return job_to_proto(await self.ctx.jobs.get(request.id))

    @rpc(roles=ADMIN)
    async def WatchJob(
        self,
        request: admin_pb2.GetJobRequest,
        context: grpc.aio.ServicerContext[Any, Any],
        identity: pki.Identity,
    ) -> AsyncIterator[admin_pb2.Job]:
        if not request.id:
            raise NotFound("no job id given")
        async for job in self.ctx.jobs.watch(request.id):
            yield job_to_proto(job)

    @rpc(roles=ADMIN)
    async def CancelJob(
        self,
        request: admin_pb2.GetJobRequest,
        context: grpc.aio.ServicerContext[Any, Any],
        identity: pki.Identity,
    ) -> admin_pb2.Job:
        log.info("job cancel asked", extra={"fields": {"job": request.id, "by": identity.id}})
        return job_to_proto(await self.ctx.jobs.cancel(request.id))
