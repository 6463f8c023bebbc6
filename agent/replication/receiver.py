"""The replication receiver on the replica host: port 8084 (mutual TLS) and 8083 (TLS + ticket).

Both ports present this agent's certificate, so a sender that targets
``<host id>.agent.sitepair`` knows it reached the host the broker named. On 8084 the sender
must present a broker-CA agent certificate whose host id is the grant's source host; on 8083 it
presents no certificate but a broker-signed ticket for this replica host, relationship, VM and
epoch, used once. A relationship's grant names its authentication; the other port refuses it.
Disk data never travels unencrypted.

The data path is blocking code (disk I/O, hashing, decompression) on gRPC's synchronous server,
one thread per stream, so cycles of different relationships use both cores. Each port has its own
pool, and no call may hold a thread without doing its part (agent.replication.admission): the
first message must arrive within seconds and each next one within minutes, calls that have not
authenticated yet are capped per address and in all, authenticated ones per source host, and a
call over a cap is refused at once. All three methods are registered as client-streaming on this
side (the wire format of a unary request is the same), so even a state or digests request is
read under the watchdog rather than by gRPC before the handler runs.

What a sender says is checked before it is used: the disk ids of a cycle must be the grant's
(sitepair.paths decides what is a safe name; the replica proves each disk folder stays inside
it), the epoch may not be higher than any this host was given, a host the broker removed is
refused on both ports, digests come only in a fixed set of block sizes, and a batch never
decompresses to more than it declared (agent.replication.blocks).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import errno
import logging
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc

from agent.identity import AgentIdentity
from agent.replication import codes
from agent.replication.admission import (
    FIRST_MESSAGE_TIMEOUT,
    IDLE_TIMEOUT,
    Admission,
    Deadline,
    Ticket,
    Watchdog,
    peer_address,
)
from agent.replication.blocks import BLOCK, BadBatch
from agent.replication.incoming import Incoming, Refusal
from agent.replication.replica import ReplicaStore
from agent.replication.state import Grant, ReplicationState
from agent.replication.stats import NO_OBSERVER, CycleObserver
from sitepair import addresses, pki, tickets
from sitepair.clock import Clock
from sitepair.errors import (
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    SitepairError,
    StaleEpoch,
    Unauthenticated,
    Unavailable,
)
from sitepair.logsafe import clipped, shown
from sitepair.protoconv import timestamp
from sitepair.rpc import REPLICATION_MAX_MESSAGE, Malformed, peer_identity, server_options
from sitepair.v1 import replication_pb2

log = logging.getLogger("sitepair.agent.receiver")

SERVICE = "sitepair.v1.Replication"
#: How long a new cycle waits for an older stream of the same relationship to let go.
BUSY_WAIT = 30.0
#: The block sizes a Digests request may ask for (1-byte blocks would spell out the content;
#: tiny ones cost seconds and hundreds of MiB).
DIGEST_BLOCK_SIZES = frozenset({BLOCK, 256 * 1024, 1024 * 1024, 2 * 1024 * 1024})


@dataclasses.dataclass(frozen=True)
class Limits:
    """How many threads each port has and who may hold them (see agent.replication.admission)."""

    #: Threads per port; calls beyond are refused with RESOURCE_EXHAUSTED, never queued.
    workers: int = 32
    #: Calls of one source host in progress on one port (cycles, state and digests requests).
    per_host: int = 16
    #: Calls not yet authenticated, on one port in all (the rest of the pool stays free for
    #: authenticated work) and from one address.
    unauthenticated: int = 16
    per_address: int = 8
    first_message_timeout: float = FIRST_MESSAGE_TIMEOUT
    idle_timeout: float = IDLE_TIMEOUT


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
        grant = self.state.grant(relationship) if len(relationship) <= 128 else None
        if grant is None:
            raise NotFound(
                f"no replication grant for relationship {shown(relationship, 80)} on this host"
            )
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
        watchdog: Watchdog | None = None,
        limits: Limits | None = None,
    ) -> None:
        self.registry = registry
        self.mode = mode
        self.host_id = host_id
        self.vault = vault
        self.verifier = verifier
        self.on_commit = on_commit
        self.limits = limits or Limits()
        self.watchdog = watchdog or Watchdog()
        self.admission = Admission(
            per_address=self.limits.per_address,
            unauthenticated=self.limits.unauthenticated,
            per_host=self.limits.per_host,
        )
        self.cycles_committed = 0
        #: Told of batches and commits (the agent's metrics, :mod:`agent.exporter`).
        self.observer: CycleObserver = NO_OBSERVER
        self.refusals: list[tuple[codes.ErrorCode, str]] = []

    # -- authorization ----------------------------------------------------------------------
    def _authorize(self, context: grpc.ServicerContext, grant: Grant, epoch: int) -> None:
        if grant.auth != self.mode:
            raise PermissionDenied(
                f"relationship {grant.relationship} uses {grant.auth} authentication; "
                f"this port accepts {self.mode}"
            )
        state = self.registry.state
        if self.mode == "certificate":
            ident = peer_identity(context)
            if ident.vault != self.vault or ident.role != pki.Role.AGENT:
                raise PermissionDenied(f"{ident} may not replicate to this host")
            if state.is_revoked(ident.id):
                raise PermissionDenied(
                    f"host {ident.id} was removed from the vault; its certificate is refused"
                )
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
        if state.is_revoked(grant.source_host):
            raise PermissionDenied(
                f"host {grant.source_host}, the source of relationship {grant.relationship}, "
                "was removed from the vault"
            )
        highest = state.epoch(grant.relationship)
        if epoch < highest:
            raise StaleEpoch(
                f"epoch {epoch} is older than {highest} for relationship {grant.relationship}: "
                "the sender was failed over from and is fenced"
            )
        if epoch > max(highest, grant.epoch):
            # In certificate mode the sender writes the epoch itself; one the broker never gave
            # this host would fence the real source once recorded.
            raise PermissionDenied(
                f"epoch {epoch} of relationship {grant.relationship} was never granted to this "
                f"host (it holds {max(highest, grant.epoch)})"
            )

    def _abort(self, context: grpc.ServicerContext, exc: SitepairError) -> None:
        log.warning(
            "replication call refused",
            extra={"fields": {"status": exc.status, "error": clipped(str(exc), 300)}},
        )
        code = getattr(grpc.StatusCode, exc.status, grpc.StatusCode.INTERNAL)
        context.abort(code, str(exc))

    @contextlib.contextmanager
    def _call(self, context: grpc.ServicerContext) -> Iterator[tuple[Ticket, Deadline]]:
        """Admit a call and watch its deadline; refuses it (RESOURCE_EXHAUSTED) over a cap."""
        try:
            host = None
            if self.mode == "certificate":
                # TLS verified the certificate before the call began: count it by host at once.
                host = peer_identity(context).id
            ticket = self.admission.enter(peer_address(context.peer()), host=host)
        except (ResourceExhausted, Unauthenticated) as exc:
            self._abort(context, exc)
            raise AssertionError("unreachable") from exc
        deadline = self.watchdog.watch(context, self.limits.first_message_timeout)
        try:
            yield ticket, deadline
        finally:
            deadline.done()
            ticket.release()

    def _first(self, requests: Iterator[Any], context: grpc.ServicerContext) -> Any:
        """The call's first message, or None when the peer sent none in time (or hung up)."""
        try:
            return next(requests)
        except (StopIteration, grpc.RpcError):
            return None

    def _admit_peer(self, ticket: Ticket, grant: Grant) -> None:
        """Count an authorised call against its source host."""
        ticket.authenticated(grant.source_host)

    # -- Cycle ------------------------------------------------------------------------------
    def Cycle(
        self, requests: Iterator[Any], context: grpc.ServicerContext
    ) -> Iterator[replication_pb2.CycleReply]:
        with self._call(context) as (ticket, deadline):
            first = self._first(requests, context)
            if first is None:
                return
            if isinstance(first, Malformed) or first.WhichOneof("body") != "header":
                yield _refused(codes.PROTOCOL, "a cycle must start with its header")
                return
            header = first.header
            try:
                grant = self.registry.grant(header.relationship_id)
                self._authorize(context, grant, header.epoch)
                self._admit_peer(ticket, grant)
            except SitepairError as exc:
                self._abort(context, exc)
                return
            busy = self.registry.busy_lock(grant.relationship)
            deadline.touch(BUSY_WAIT + self.limits.first_message_timeout)
            if not busy.acquire(timeout=BUSY_WAIT):
                yield _refused(
                    codes.BUSY, "another cycle of this relationship is still in progress"
                )
                return
            try:
                deadline.touch(self.limits.idle_timeout)
                yield from self._cycle(grant, header, requests, context, deadline)
            finally:
                busy.release()

    def _cycle(
        self,
        grant: Grant,
        header: replication_pb2.CycleHeader,
        requests: Iterator[Any],
        context: grpc.ServicerContext,
        deadline: Deadline,
    ) -> Iterator[replication_pb2.CycleReply]:
        fields = {"relationship": grant.relationship, "sequence": header.sequence}
        incoming: Incoming | None = None
        try:
            store = self.registry.store(grant)
            incoming = store.begin(header, granted=[d.disk_id for d in grant.disks])
            yield replication_pb2.CycleReply(
                accepted=replication_pb2.Accepted(resume_from_batch=incoming.resume)
            )
            for message in requests:
                deadline.touch()
                if isinstance(message, Malformed):
                    raise BadBatch(f"a malformed message arrived: {message.error}")
                kind = message.WhichOneof("body")
                if kind == "batch":
                    self.observer.batch_received(message.ByteSize())
                    if incoming.add(message.batch):
                        acked = incoming.make_durable()
                        yield replication_pb2.CycleReply(
                            batch_ack=replication_pb2.BatchAck(index=acked)
                        )
                elif kind == "trailer":
                    # Applying a committed cycle is the receiver's own work: no deadline.
                    deadline.suspend()
                    applied = incoming.finish(message.trailer)
                    incoming = None
                    self.cycles_committed += 1
                    self.observer.cycle_applied(header.kind, applied)
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
                    deadline.touch()
                    yield replication_pb2.CycleReply(
                        committed=replication_pb2.Committed(
                            sequence=header.sequence,
                            committed_at=timestamp(self.registry.clock.now()),
                            applied_bytes=applied,
                        )
                    )
                    return
                else:
                    raise Refusal(codes.PROTOCOL, f"unexpected {kind} in the middle of a cycle")
            log.info(
                "cycle stream ended before its trailer; kept for resume", extra={"fields": fields}
            )
        except grpc.RpcError:
            # Cancelled: the sender went silent past the deadline, or hung up.
            log.info(
                "cycle stream cancelled before its trailer; kept for resume",
                extra={"fields": {**fields, "deadline_passed": deadline.expired}},
            )
        except Refusal as exc:
            self._note_refusal(exc.code, str(exc), fields)
            yield _refused(exc.code, str(exc))
        except BadBatch as exc:
            self._note_refusal(codes.BAD_DIGEST, str(exc), fields)
            yield _refused(codes.BAD_DIGEST, str(exc))
        except OSError as exc:
            code = codes.DISK_FULL if exc.errno == errno.ENOSPC else codes.IO
            message = (
                "the replica's disk is full; nothing was applied"
                if code == codes.DISK_FULL
                else f"I/O error on the replica: {exc}"
            )
            self._note_refusal(code, message, fields)
            yield _refused(code, message)
        except SitepairError as exc:
            self._note_refusal(codes.REFUSED, str(exc), fields)
            yield _refused(codes.REFUSED, str(exc))
        finally:
            if incoming is not None:
                incoming.abort()

    def _note_refusal(self, code: codes.ErrorCode, message: str, fields: dict[str, Any]) -> None:
        self.refusals.append((code, message))
        del self.refusals[:-100]
        log.warning(
            "cycle refused",
            extra={"fields": {**fields, "code": codes.code_name(code), "error": message}},
        )

    # -- GetState and Digests ---------------------------------------------------------------
    def GetState(
        self, requests: Iterator[Any], context: grpc.ServicerContext
    ) -> replication_pb2.ReplicaState:
        with self._call(context) as (ticket, deadline):
            request = self._first(requests, context)
            if request is None or isinstance(request, Malformed):
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, "malformed or missing request")
            deadline.suspend()
            try:
                grant = self.registry.grant(request.relationship_id)
                self._authorize(context, grant, self.registry.state.epoch(grant.relationship))
                self._admit_peer(ticket, grant)
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
        self, requests: Iterator[Any], context: grpc.ServicerContext
    ) -> Iterator[replication_pb2.DigestBatch]:
        with self._call(context) as (ticket, deadline):
            request = self._first(requests, context)
            if request is None or isinstance(request, Malformed):
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, "malformed or missing request")
            block = request.block_size or BLOCK
            try:
                if block not in DIGEST_BLOCK_SIZES:
                    raise InvalidArgument(
                        f"digests block size {block} is not one of "
                        f"{', '.join(str(b) for b in sorted(DIGEST_BLOCK_SIZES))}"
                    )
                grant = self.registry.grant(request.relationship_id)
                self._authorize(context, grant, request.epoch)
                self._admit_peer(ticket, grant)
                store = self.registry.store(grant)
            except SitepairError as exc:
                self._abort(context, exc)
                return
            busy = self.registry.busy_lock(grant.relationship)
            deadline.touch(BUSY_WAIT + self.limits.first_message_timeout)
            if not busy.acquire(timeout=BUSY_WAIT):
                self._abort(
                    context,
                    Unavailable("a cycle of this relationship is in progress; ask again later"),
                )
                return
            try:
                batches = store.iter_digest_batches(request.disk_id, block)
                while True:
                    # Hashing is our own work; sending must make progress within the deadline
                    # (a peer that stops reading would otherwise hold the thread).
                    deadline.suspend()
                    try:
                        batch = next(batches)
                    except StopIteration:
                        return
                    except SitepairError as exc:
                        self._abort(context, exc)
                        return
                    deadline.touch(self.limits.idle_timeout)
                    yield batch
            finally:
                busy.release()

    def handler(self) -> grpc.GenericRpcHandler[Any, Any]:
        # Client-streaming on this side for all three (see the module docstring).
        return grpc.method_handlers_generic_handler(
            SERVICE,
            {
                "Cycle": grpc.stream_stream_rpc_method_handler(
                    self.Cycle,
                    request_deserializer=_safe_parse(replication_pb2.CycleMessage),
                    response_serializer=replication_pb2.CycleReply.SerializeToString,
                ),
                "GetState": grpc.stream_unary_rpc_method_handler(
                    self.GetState,
                    request_deserializer=_safe_parse(replication_pb2.ReplicaStateRequest),
                    response_serializer=replication_pb2.ReplicaState.SerializeToString,
                ),
                "Digests": grpc.stream_stream_rpc_method_handler(
                    self.Digests,
                    request_deserializer=_safe_parse(replication_pb2.DigestsRequest),
                    response_serializer=replication_pb2.DigestBatch.SerializeToString,
                ),
            },
        )


def _refused(code: codes.ErrorCode, message: str) -> replication_pb2.CycleReply:
    return replication_pb2.CycleReply(refused=replication_pb2.Refused(code=code, message=message))


class ReceiverServer:
    """Both replication ports of one agent, with certificates that follow renewals."""

    def __init__(
        self,
        *,
        registry: ReplicaRegistry,
        identity: Callable[[], AgentIdentity],
        on_commit: Callable[[Grant, ReplicaStore, replication_pb2.CycleHeader], None] | None = None,
        limits: Limits | None = None,
    ) -> None:
        self.registry = registry
        self._identity = identity
        self.limits = limits or Limits()
        ident = identity()
        verifier = tickets.TicketVerifier(ident.host_id, remember=registry.state.remember_nonce)
        self.watchdog = Watchdog(name="receiver-watchdog")
        self.servicers = {
            mode: ReplicationServicer(
                registry,
                mode=mode,
                host_id=ident.host_id,
                vault=ident.vault,
                verifier=verifier,
                on_commit=on_commit,
                watchdog=self.watchdog,
                limits=self.limits,
            )
            for mode in ("certificate", "ticket")
        }
        self._servers: list[grpc.Server] = []
        # One pool per port: whatever happens on the ticket port (reachable without a
        # certificate) cannot take the threads of the certificate port.
        self._pools = {
            mode: concurrent.futures.ThreadPoolExecutor(
                self.limits.workers, thread_name_prefix=f"receiver-{mode}"
            )
            for mode in ("certificate", "ticket")
        }
        self.ports: dict[str, int] = {}

    def _credentials(self, *, client_auth: bool) -> grpc.ServerCredentials:
        # A renewal changes the certificate, a CA rotation the trust bundle: either reloads.
        first = self._identity()
        loaded = [(first.cert_pem, first.ca_pem)]

        def config() -> grpc.ServerCertificateConfiguration:
            ident = self._identity()
            return grpc.ssl_server_certificate_configuration(
                [(ident.key_pem, ident.cert_pem)], root_certificates=ident.ca_pem
            )

        def fetch() -> grpc.ServerCertificateConfiguration | None:
            ident = self._identity()
            if (ident.cert_pem, ident.ca_pem) == loaded[0]:
                return None
            loaded[0] = (ident.cert_pem, ident.ca_pem)
            return config()

        return grpc.dynamic_ssl_server_credentials(
            config(),
            fetch,  # type: ignore[arg-type]  # grpc-stubs omit that None means "unchanged"
            require_client_authentication=client_auth,
        )

    def start(self, *, host: str, certificate_port: int, ticket_port: int) -> dict[str, int]:
        for mode, port in (("certificate", certificate_port), ("ticket", ticket_port)):
            server = grpc.server(
                self._pools[mode],
                options=server_options(
                    max_message_bytes=REPLICATION_MAX_MESSAGE, max_concurrent_streams=16
                ),
                # As many calls as threads: one more is refused at once, not queued.
                maximum_concurrent_rpcs=self.limits.workers,
            )
            server.add_generic_rpc_handlers((self.servicers[mode].handler(),))
            address = addresses.join(host, port)  # [v6]:port for an IPv6 address
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
        for pool in self._pools.values():
            pool.shutdown(wait=False, cancel_futures=True)
        self.watchdog.close()
