"""gRPC plumbing shared by broker and agent: limits, TLS, peer identity, error translation.

Servers turn :class:`~sitepair.errors.SitepairError` into gRPC statuses in exactly one place, the
``@rpc`` decorator below; unexpected exceptions are logged with their traceback on the server and
reach the client as INTERNAL with a reference, never as a traceback. Clients turn statuses back
into SitepairError subclasses with :func:`error_from_rpc`.

Identity is taken only from the verified peer certificate (``context.auth_context()``).

Error texts may echo what a peer sent (a name that failed a check); the decorator cuts them to
:data:`~sitepair.logsafe.LOG_TEXT_LIMIT` characters before it logs them or puts them in a status,
so no request, authenticated or not, can write more than that into the log per refusal.
"""

from __future__ import annotations

import functools
import inspect
import logging
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

import grpc
import grpc.aio
from cryptography import x509

from sitepair import pki
from sitepair.errors import (
    ALL_BY_STATUS,
    InvalidArgument,
    SitepairError,
    Unauthenticated,
    Unavailable,
)
from sitepair.logsafe import clipped

log = logging.getLogger("sitepair.rpc")

#: Largest message on the control and admin channels (inventories of big hosts fit easily).
CONTROL_MAX_MESSAGE = 8 * 1024 * 1024
#: Largest message the broker needs to *receive* on the control/admin port: an agent's
#: inventory (capped at 4 MiB, :mod:`broker.bounds`) plus room for the envelope. Admin requests
#: are small; responses may use the whole :data:`CONTROL_MAX_MESSAGE`.
CONTROL_MAX_RECEIVE = 4 * 1024 * 1024 + 64 * 1024
#: Replication batches are ~1 MiB of payload; the cap leaves room for incompressible data.
REPLICATION_MAX_MESSAGE = 16 * 1024 * 1024


def server_options(
    *,
    max_message_bytes: int = CONTROL_MAX_MESSAGE,
    max_receive_bytes: int | None = None,
    max_concurrent_streams: int = 32,
) -> list[tuple[str, Any]]:
    """Limits and keepalive policy set explicitly on every server we run.

    ``max_message_bytes`` bounds what the server sends, and what it receives unless
    ``max_receive_bytes`` is given and smaller (the control port receives less than it sends).
    """
    receive = max_message_bytes
    if max_receive_bytes is not None:
        receive = min(receive, max_receive_bytes)
    return [
        ("grpc.max_receive_message_length", receive),
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_concurrent_streams", max_concurrent_streams),
        # Answer client keepalive pings; refuse abusive ping rates (GOAWAY too_many_pings).
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
        ("grpc.http2.max_ping_strikes", 3),
        # Our own keepalive finds dead peers (a host that lost power) within about a minute.
        ("grpc.keepalive_time_ms", 30_000),
        ("grpc.keepalive_timeout_ms", 20_000),
        ("grpc.max_connection_idle_ms", 30 * 60_000),
        ("grpc.so_reuseport", 0),
    ]


def channel_options(
    *, target_name: str | None, max_message_bytes: int = CONTROL_MAX_MESSAGE
) -> list[tuple[str, Any]]:
    opts: list[tuple[str, Any]] = [
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.keepalive_time_ms", 20_000),
        ("grpc.keepalive_timeout_ms", 20_000),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
        # We run our own jittered reconnect loop; keep gRPC's own backoff short and bounded.
        ("grpc.initial_reconnect_backoff_ms", 200),
        ("grpc.max_reconnect_backoff_ms", 5_000),
        ("grpc.enable_retries", 0),
    ]
    if target_name:
        opts.append(("grpc.ssl_target_name_override", target_name))
    return opts


# -- identity ---------------------------------------------------------------------------------


def peer_certificate(
    context: grpc.aio.ServicerContext[Any, Any] | grpc.ServicerContext,
) -> x509.Certificate:
    auth = context.auth_context()
    pems = list(auth.get("x509_pem_cert") or [])
    if not pems or not isinstance(pems[0], bytes):
        raise Unauthenticated("no client certificate was presented")
    return x509.load_pem_x509_certificate(pems[0])


def peer_identity(
    context: grpc.aio.ServicerContext[Any, Any] | grpc.ServicerContext,
) -> pki.Identity:
    """The identity in the peer's certificate; gRPC has verified its chain against our CA."""
    return pki.identity_from_cert(peer_certificate(context))


# -- safe registration: malformed requests become INVALID_ARGUMENT ---------------------------


class Malformed:
    """What a request deserializes to when its bytes are not a valid message."""

    def __init__(self, error: Exception) -> None:
        self.error = error


def _safe(deserializer: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    if deserializer is None:
        return None

    def parse(data: bytes) -> Any:
        try:
            return deserializer(data)
        except Exception as exc:  # noqa: BLE001 - any parse failure is the client's bad input
            return Malformed(exc)

    return parse


class _Capture:
    def __init__(self) -> None:
        self.handlers: dict[str, dict[str, Any]] = {}

    def add_generic_rpc_handlers(self, handlers: Any) -> None:
        pass  # rebuilt from the registered handlers below

    def add_registered_method_handlers(self, service: str, handlers: dict[str, Any]) -> None:
        self.handlers[service] = handlers


def add_servicer(
    add_fn: Callable[[Any, Any], None], servicer: Any, server: grpc.aio.Server
) -> None:
    """Register a servicer like the generated ``add_*_to_server`` does, but with request parsing
    that turns malformed bytes into INVALID_ARGUMENT inside our ``@rpc`` handlers, instead of an
    UNKNOWN status and a traceback from inside grpc."""
    capture = _Capture()
    add_fn(servicer, capture)
    for service, handlers in capture.handlers.items():
        safe = {
            name: h._replace(request_deserializer=_safe(h.request_deserializer))
            for name, h in handlers.items()
        }
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, safe),))
        server.add_registered_method_handlers(service, safe)  # type: ignore[attr-defined]


async def _checked(requests: AsyncIterator[Any]) -> AsyncIterator[Any]:
    async for item in requests:
        if isinstance(item, Malformed):
            raise InvalidArgument(f"malformed message in the request stream: {item.error}")
        yield item


def _check_request(request: Any) -> Any:
    if isinstance(request, Malformed):
        raise InvalidArgument(f"malformed request: {request.error}")
    if hasattr(request, "__aiter__"):
        return _checked(request)
    return request


# -- server-side error mapping ----------------------------------------------------------------


def status_of(error: SitepairError) -> grpc.StatusCode:
    return getattr(grpc.StatusCode, error.status, grpc.StatusCode.INTERNAL)


def rpc(*, roles: Sequence[pki.Role] | None) -> Callable[..., Any]:
    """Decorate an aio servicer method: authorize the caller, map errors to statuses.

    ``roles=None`` means no client certificate is expected (the enrollment port). Otherwise the
    method receives the caller's verified identity as a third argument, after ``self.authorizer``
    has accepted it. Works for unary methods and for async-generator (streaming) methods.
    """
    allowed = frozenset(roles) if roles is not None else None

    def authorize(self: Any, context: grpc.aio.ServicerContext[Any, Any]) -> pki.Identity | None:
        if allowed is None:
            return None
        identity = peer_identity(context)
        self.authorizer.authorize(identity, allowed)
        return identity

    def decorate(fn: Callable[..., Any]) -> Callable[..., Any]:
        name = fn.__name__
        if inspect.isasyncgenfunction(fn):

            @functools.wraps(fn)
            async def stream_wrapper(
                self: Any, request: Any, context: grpc.aio.ServicerContext[Any, Any]
            ) -> AsyncIterator[Any]:
                try:
                    identity = authorize(self, context)
                    request = _check_request(request)
                    args = (request, context) if allowed is None else (request, context, identity)
                    async for item in fn(self, *args):
                        yield item
                except SitepairError as exc:
                    await _abort(context, name, exc)
                except (grpc.aio.AbortError, GeneratorExit):
                    raise
                except Exception as exc:  # noqa: BLE001 - the one place unexpected errors end
                    await _abort_internal(context, name, exc)

            return stream_wrapper

        @functools.wraps(fn)
        async def unary_wrapper(
            self: Any, request: Any, context: grpc.aio.ServicerContext[Any, Any]
        ) -> Any:
            try:
                identity = authorize(self, context)
                request = _check_request(request)
                args = (request, context) if allowed is None else (request, context, identity)
                return await fn(self, *args)
            except SitepairError as exc:
                await _abort(context, name, exc)
            except grpc.aio.AbortError:
                raise
            except Exception as exc:  # noqa: BLE001 - the one place unexpected errors end
                await _abort_internal(context, name, exc)
            raise AssertionError("unreachable: abort raises")

        return unary_wrapper

    return decorate


async def _abort(
    context: grpc.aio.ServicerContext[Any, Any], method: str, exc: SitepairError
) -> None:
    level = (
        logging.WARNING
        if exc.status in ("INTERNAL", "PERMISSION_DENIED", "UNAUTHENTICATED")
        else logging.INFO
    )
    text = clipped(str(exc))
    log.log(
        level,
        "rpc refused",
        extra={"fields": {"method": method, "status": exc.status, "error": text}},
    )
    await context.abort(status_of(exc), text)


async def _abort_internal(
    context: grpc.aio.ServicerContext[Any, Any], method: str, exc: Exception
) -> None:
    ref = uuid.uuid4().hex[:12]
    log.error(
        "rpc failed unexpectedly",
        exc_info=exc,
        extra={"fields": {"method": method, "ref": ref}},
    )
    await context.abort(
        grpc.StatusCode.INTERNAL, f"internal error in {method} (reference {ref} in the server log)"
    )


# -- client-side translation ------------------------------------------------------------------

_TLS_HINTS = ("handshake", "certificate", "ssl", "tls", "x509")


def error_from_rpc(exc: grpc.RpcError, *, peer: str) -> SitepairError:
    """Turn a failed call into the matching SitepairError with an operator-readable message."""
    code = exc.code() if hasattr(exc, "code") else grpc.StatusCode.UNKNOWN
    details = (exc.details() if hasattr(exc, "details") else None) or str(code)
    if code == grpc.StatusCode.UNAVAILABLE:
        lowered = details.lower()
        if any(h in lowered for h in _TLS_HINTS):
            return Unavailable(
                f"TLS with {peer} failed: {details}",
                hint="the peer's certificate is not signed by the CA this side trusts (credentials "
                "or certificates for another broker?), or this side's certificate was refused",
            )
        return Unavailable(f"cannot reach {peer}: {details}", hint="is it running and reachable?")
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        cls: type[SitepairError] = ALL_BY_STATUS["DEADLINE_EXCEEDED"]
        return cls(f"{peer} did not answer in time")
    cls = ALL_BY_STATUS.get(code.name, SitepairError) if code is not None else SitepairError
    return cls(details)
