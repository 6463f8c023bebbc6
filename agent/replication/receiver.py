"""The replication receiver on the replica host: port 8084 (mutual TLS) and 8083 (TLS + ticket).

Both ports present this agent's certificate, so a sender that targets
``<host id>.agent.sitepair`` knows it reached the host the broker named. On 8084 the sender
must present a broker-CA agent certificate whose host id is the grant's source host; on 8083 it
presents no certificate but a broker-signed ticket for this replica host, relationship, VM and
epoch, used once. A relationship's grant names its authentication; the other port refuses it.
Disk data never travels unencrypted.

The data path is blocking code (disk I/O, hashing, decompression) on gRPC's synchronous server,
one thread per stream, so cycles of different relationships use both cores.
"""

from __future__ import annotations

import concurrent.futures
import errno
import logging
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc

from agent.identity import AgentIdentity
from agent.replication.blocks import BadBatch
from agent.replication.replica import Incoming, Refusal, ReplicaStore, iter_digest_batches
from agent.replication.state import Grant, ReplicationState
from sitepair import pki, tickets
from sitepair.clock import Clock
from sitepair.errors import NotFound, PermissionDenied, SitepairError, StaleEpoch, Unauthenticated
from sitepair.protoconv import timestamp
from sitepair.rpc import REPLICATION_MAX_MESSAGE, Malformed, peer_identity, server_options
from sitepair.v1 import replication_pb2

log = logging.getLogger("sitepair.agent.receiver")

SERVICE = "sitepair.v1.Replication"
#: How long a new cycle waits for an older stream of the same relationship to let go.
BUSY_WAIT = 30.0


def _safe_parse(cls: Any) -> Callable[[bytes], Any]:
    def parse(data: bytes) -> Any:
        try:
            return cls.FromString(data)
        except Exception as exc:  # noqa: BLE001 - any parse failure is bad input
            return Malformed(exc)

    return parse


class ReplicaRegistry:
    """Grants and their opened replica stores."""

    def __init__(self, state: ReplicationState, clock: Clock) -> None:
        self.state = state
        self.clock = clock
        self._stores: dict[str, ReplicaStore] = {}
        self._busy: dict[str, threading.Lock] = {}
        self._lock = threading.Lock()

    def grant(self, relationship: str) -> Grant:
        grant = self.state.grant(relationship)
        if grant is None:
            raise NotFound(f"no replication grant for relationship {relationship} on this host")
        return grant

    def store(self, grant: Grant) -> ReplicaStore:
        with self._lock:
            store = self._stores.get(grant.relationship)
            if store is None:
                store = ReplicaStore.create(
                    Path(grant.folder),
                    relationship=grant.relationship,
                    vm_id=grant.vm_id,
                    epoch=grant.epoch,
                    clock=self.clock,
                    adopt=grant.adopt,
                )
                store.recover()
                self._stores[grant.relationship] = store
            return store

    def busy_lock(self, relationship: str) -> threading.Lock:
        with self._lock:
            return self._busy.setdefault(relationship, threading.Lock())

    def forget(self, relationship: str) -> None:
        with self._lock:
            self._stores.pop(relationship, None)


class ReplicationServicer:
    """The Replication service for one port (``mode`` is "certificate" or "ticket")."""

    def __init__(
        self,
        registry: ReplicaRegistry,
        *,
        mode: str,
        host_id: str,
        vault: str,
        verifier: tickets.TicketVerifier,
        on_commit: Callable[[Grant, ReplicaStore, replication_pb2.CycleHeader], None] | None = None,
    ) -> None:
        self.registry = registry
        self.mode = mode
        self.host_id = host_id
        self.vault = vault
        self.verifier = verifier
        self.on_commit = on_commit
        self.cycles_committed = 0
        self.refusals: list[tuple[str, str]] = []

    # -- authorization ----------------------------------------------------------------------
    def _authorize(self, context: grpc.ServicerContext, grant: Grant, epoch: int) -> None:
        if grant.auth != self.mode:
            raise PermissionDenied(
                f"relationship {grant.relationship} uses {grant.auth} authentication; "
                f"this port accepts {self.mode}"
            )
        if self.mode == "certificate":
            ident = peer_identity(context)
            if ident.vault != self.vault or ident.role != pki.Role.AGENT:
                raise PermissionDenied(f"{ident} may not replicate to this host")
            if ident.id != grant.source_host:
                raise PermissionDenied(
                    f"host {ident.id} is not the source of relationship {grant.relationship} "
                    f"(the grant names {grant.source_host})"
                )
        else:
            metadata = dict(context.invocation_metadata())
            text = metadata.get(tickets.METADATA_KEY, "")
            if not isinstance(text, str):
                raise Unauthenticated("the replication ticket must be text")
            self.verifier.verify(
                text,
                public_key=bytes.fromhex(grant.ticket_public_key),
                relationship=grant.relationship,
                vm=grant.vm_id,
                source_host=grant.source_host,
                epoch=epoch,
                now=self.registry.clock.now(),
            )
        highest = self.registry.state.epoch(grant.relationship)
        if epoch < highest:
            raise StaleEpoch(
                f"epoch {epoch} is older than {highest} for relationship {grant.relationship}: "
                "the sender was failed over from and is fenced"
            )

    def _abort(self, context: grpc.ServicerContext, exc: SitepairError) -> None:
        log.warning(
            "replication call refused", extra={"fields": {"status": exc.status, "error": str(exc)}}
        )
        code = getattr(grpc.StatusCode, exc.status, grpc.StatusCode.INTERNAL)
        context.abort(code, str(exc))

    # -- Cycle ------------------------------------------------------------------------------
    def Cycle(
        self, requests: Iterator[Any], context: grpc.ServicerContext
    ) -> Iterator[replication_pb2.CycleReply]:
        try:
            first = next(requests)
        except StopIteration:
            return
        if isinstance(first, Malformed) or first.WhichOneof("body") != "header":
            yield _refused("protocol", "a cycle must start with its header")
            return
        header = first.header
        try:
            grant = self.registry.grant(header.relationship_id)
            self._authorize(context, grant, header.epoch)
        except SitepairError as exc:
            self._abort(context, exc)
            return
        busy = self.registry.busy_lock(grant.relationship)
        if not busy.acquire(timeout=BUSY_WAIT):
            yield _refused("busy", "another cycle of this relationship is still in progress")
            return
        try:
            yield from self._cycle(grant, header, requests, context)
        finally:
            busy.release()

    def _cycle(
        self,
        grant: Grant,
        header: replication_pb2.CycleHeader,
        requests: Iterator[Any],
        context: grpc.ServicerContext,
    ) -> Iterator[replication_pb2.CycleReply]:
        fields = {"relationship": grant.relationship, "sequence": header.sequence}
        incoming: Incoming | None = None
        try:
            store = self.registry.store(grant)
            incoming = store.begin(header)
            yield replication_pb2.CycleReply(
                accepted=replication_pb2.Accepted(resume_from_batch=incoming.resume)
            )
            for message in requests:
                if isinstance(message, Malformed):
                    raise BadBatch(f"a malformed message arrived: {message.error}")
                kind = message.WhichOneof("body")
                if kind == "batch":
                    if incoming.add(message.batch):
                        acked = incoming.make_durable()
                        yield replication_pb2.CycleReply(
                            batch_ack=replication_pb2.BatchAck(index=acked)
                        )
                elif kind == "trailer":
                    applied = incoming.finish(message.trailer)
                    incoming = None
                    self.cycles_committed += 1
                    log.info(
                        "cycle committed",
                        extra={
                            "fields": {
                                **fields,
                                "kind": replication_pb2.CycleKind.Name(header.kind),
                                "bytes": applied,
                            }
                        },
                    )
                    if self.on_commit is not None:
                        try:
                            self.on_commit(grant, store, header)
                        except (SitepairError, OSError) as exc:
                            # The cycle is committed whatever happens here: sealing a
                            # recovery point is retried after the next commit.
                            log.error(
                                "after-commit step failed",
                                extra={"fields": {**fields, "error": str(exc)}},
                            )
                    yield replication_pb2.CycleReply(
                        committed=replication_pb2.Committed(
                            sequence=header.sequence,
                            committed_at=timestamp(self.registry.clock.now()),
                            applied_bytes=applied,
                        )
                    )
                    return
                else:
                    raise Refusal("protocol", f"unexpected {kind} in the middle of a cycle")
            log.info(
                "cycle stream ended before its trailer; kept for resume", extra={"fields": fields}
            )
        except Refusal as exc:
            self._note_refusal(exc.code, str(exc), fields)
            yield _refused(exc.code, str(exc))
        except BadBatch as exc:
            self._note_refusal("bad-digest", str(exc), fields)
            yield _refused("bad-digest", str(exc))
        except OSError as exc:
            code = "disk-full" if exc.errno == errno.ENOSPC else "io-error"
            message = (
                "the replica's disk is full; nothing was applied"
                if code == "disk-full"
                else f"I/O error on the replica: {exc}"
            )
            self._note_refusal(code, message, fields)
            yield _refused(code, message)
        except SitepairError as exc:
            self._note_refusal("error", str(exc), fields)
            yield _refused("error", str(exc))
        finally:
            if incoming is not None:
                incoming.abort()

    def _note_refusal(self, code: str, message: str, fields: dict[str, Any]) -> None:
        self.refusals.append((code, message))
        del self.refusals[:-100]
        log.warning("cycle refused", extra={"fields": {**fields, "code": code, "error": message}})

    # -- GetState and Digests ---------------------------------------------------------------
    def GetState(self, request: Any, context: grpc.ServicerContext) -> replication_pb2.ReplicaState:
        if isinstance(request, Malformed):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "malformed request")
        try:
            grant = self.registry.grant(request.relationship_id)
            self._authorize(context, grant, self.registry.state.epoch(grant.relationship))
            store = self.registry.store(grant)
        except SitepairError as exc:
            self._abort(context, exc)
            raise AssertionError("unreachable") from exc
        seq, acked, digest = store.partial()
        return replication_pb2.ReplicaState(
            relationship_id=grant.relationship,
            committed_sequence=store.state.committed_sequence,
            epoch=max(store.state.epoch, self.registry.state.epoch(grant.relationship)),
            partial_sequence=seq,
            partial_acked_batches=acked,
            partial_header_digest=digest,
        )

    def Digests(
        self, request: Any, context: grpc.ServicerContext
    ) -> Iterator[replication_pb2.DigestBatch]:
        if isinstance(request, Malformed):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "malformed request")
        try:
            grant = self.registry.grant(request.relationship_id)
            self._authorize(context, grant, request.epoch)
            store = self.registry.store(grant)
            block = request.block_size or 65536
            digests = store.digests(request.disk_id, block)
            allocated = store.allocated_blocks(request.disk_id, block)
        except SitepairError as exc:
            self._abort(context, exc)
            return
        yield from iter_digest_batches(digests, allocated, request.disk_id)

    def handler(self) -> grpc.GenericRpcHandler[Any, Any]:
        return grpc.method_handlers_generic_handler(
            SERVICE,
            {
                "Cycle": grpc.stream_stream_rpc_method_handler(
                    self.Cycle,
                    request_deserializer=_safe_parse(replication_pb2.CycleMessage),
                    response_serializer=replication_pb2.CycleReply.SerializeToString,
                ),
                "GetState": grpc.unary_unary_rpc_method_handler(
                    self.GetState,
                    request_deserializer=_safe_parse(replication_pb2.ReplicaStateRequest),
                    response_serializer=replication_pb2.ReplicaState.SerializeToString,
                ),
                "Digests": grpc.unary_stream_rpc_method_handler(
                    self.Digests,
                    request_deserializer=_safe_parse(replication_pb2.DigestsRequest),
                    response_serializer=replication_pb2.DigestBatch.SerializeToString,
                ),
            },
        )


def _refused(code: str, message: str) -> replication_pb2.CycleReply:
    return replication_pb2.CycleReply(refused=replication_pb2.Refused(code=code, message=message))


class ReceiverServer:
    """Both replication ports of one agent, with certificates that follow renewals."""

    def __init__(
        self,
        *,
        registry: ReplicaRegistry,
        identity: Callable[[], AgentIdentity],
        on_commit: Callable[[Grant, ReplicaStore, replication_pb2.CycleHeader], None] | None = None,
        workers: int = 16,
    ) -> None:
        self.registry = registry
        self._identity = identity
        ident = identity()
        verifier = tickets.TicketVerifier(ident.host_id, remember=registry.state.remember_nonce)
        self.servicers = {
            mode: ReplicationServicer(
                registry,
                mode=mode,
                host_id=ident.host_id,
                vault=ident.vault,
                verifier=verifier,
                on_commit=on_commit,
            )
            for mode in ("certificate", "ticket")
        }
        self._servers: list[grpc.Server] = []
        self._pool = concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="receiver")
        self.ports: dict[str, int] = {}

    def _credentials(self, *, client_auth: bool) -> grpc.ServerCredentials:
        loaded = [self._identity().cert_pem]

        def config() -> grpc.ServerCertificateConfiguration:
            ident = self._identity()
            return grpc.ssl_server_certificate_configuration(
                [(ident.key_pem, ident.cert_pem)], root_certificates=ident.ca_pem
            )

        def fetch() -> grpc.ServerCertificateConfiguration | None:
            ident = self._identity()
            if ident.cert_pem == loaded[0]:
                return None
            loaded[0] = ident.cert_pem
            return config()

        return grpc.dynamic_ssl_server_credentials(
            config(),
            fetch,  # type: ignore[arg-type]  # grpc-stubs omit that None means "unchanged"
            require_client_authentication=client_auth,
        )

    def start(self, *, host: str, certificate_port: int, ticket_port: int) -> dict[str, int]:
        for mode, port in (("certificate", certificate_port), ("ticket", ticket_port)):
            server = grpc.server(
                self._pool,
                options=server_options(
                    max_message_bytes=REPLICATION_MAX_MESSAGE, max_concurrent_streams=16
                ),
                maximum_concurrent_rpcs=64,
            )
            server.add_generic_rpc_handlers((self.servicers[mode].handler(),))
            address = f"{host}:{port}"
            bound = server.add_secure_port(
                address, self._credentials(client_auth=mode == "certificate")
            )
            if bound == 0:
                raise SitepairError(
                    f"cannot listen for replication on {address}", hint="is the port in use?"
                )
            server.start()
            self._servers.append(server)
            self.ports[mode] = bound
        log.info("replication receiver listening", extra={"fields": {"host": host, **self.ports}})
        return dict(self.ports)

    def stop(self, grace: float = 5.0) -> None:
        events = [s.stop(grace) for s in self._servers]
        deadline = time.monotonic() + grace + 1
        for e in events:
            e.wait(max(0.0, deadline - time.monotonic()))
        self._servers.clear()
        self._pool.shutdown(wait=False, cancel_futures=True)
