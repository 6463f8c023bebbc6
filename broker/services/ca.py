"""The CA rotation API (port 8443, mutual TLS, role ``admin``): see :mod:`broker.ca_rotation`."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import grpc.aio

from sitepair import pki
from sitepair.rpc import rpc
from sitepair.v1 import admin_pb2, admin_pb2_grpc

if TYPE_CHECKING:
    from broker.services.context import BrokerContext


class CaAdminService(admin_pb2_grpc.CertificateAuthorityServicer):
    def __init__(self, ctx: BrokerContext) -> None:
        self.ctx = ctx
        self.authorizer = ctx.authorizer

    @rpc(roles=[pki.Role.ADMIN])
    async def GetCaStatus(
        self,
        request: admin_pb2.GetCaStatusRequest,
        context: grpc.aio.ServicerContext[Any, Any],
        identity: pki.Identity,
    ) -> admin_pb2.CaStatus:
        return await self.ctx.ca_rotation.status()

    @rpc(roles=[pki.Role.ADMIN])
    async def RotateCa(
        self,
        request: admin_pb2.RotateCaRequest,
        context: grpc.aio.ServicerContext[Any, Any],
        identity: pki.Identity,
    ) -> admin_pb2.CaStatus:
        return await self.ctx.ca_rotation.rotate(request.phase, force=request.force, by=identity.id)
