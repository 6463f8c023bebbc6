"""The operator's side of the admin API: a profile (who I am, where the broker is) and a client.

A profile is a folder holding ``admin.key`` (0600), ``admin.crt``, ``ca.crt`` and
``profile.json`` (vault and broker control addresses). ``sitepair-broker init`` writes one into
``<home>/admin`` for the local operator; ``sitepair-broker operators add NAME --out DIR`` makes one
for another operator, whose key is generated on the operator's side and never sent anywhere.
"""

from __future__ import annotations

import copy
import dataclasses
import json
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Protocol, TypeVar

import grpc

from sitepair import pki
from sitepair.errors import ConfigError, SitepairError
from sitepair.rpc import channel_options, error_from_rpc
from sitepair.v1 import admin_pb2, admin_pb2_grpc

RequestT = TypeVar("RequestT")
ResponseT = TypeVar("ResponseT")
PageRequestT = TypeVar("PageRequestT", bound="PageRequest")
PageT = TypeVar("PageT", bound="Page")
ItemT = TypeVar("ItemT")


@dataclasses.dataclass(frozen=True)
class Profile:
    directory: Path
    vault: str
    addresses: tuple[str, ...]
    key_pem: bytes
    cert_pem: bytes
    ca_pem: bytes

    @classmethod
    def load(cls, directory: Path, *, run_file: Path | None = None) -> Profile:
        """Read a profile; ``run_file`` (a broker's run/broker.json) overrides the address with
        the one the broker actually bound, for brokers listening on port 0."""
        try:
            doc = json.loads((directory / "profile.json").read_text(encoding="utf-8"))
            key_pem = (directory / "admin.key").read_bytes()
            cert_pem = (directory / "admin.crt").read_bytes()
            ca_pem = (directory / "ca.crt").read_bytes()
        except FileNotFoundError as exc:
            raise ConfigError(
                f"no operator profile in {directory} ({Path(exc.filename).name} is missing)",
                hint="pass --home with a broker home, or --profile with a folder made by "
                "`operators add`",
            ) from exc
        except (OSError, json.JSONDecodeError) as exc:
            raise ConfigError(f"cannot read operator profile {directory}: {exc}") from exc
        addresses = tuple(doc.get("addresses") or ())
        if run_file is not None and run_file.exists():
            try:
                run = json.loads(run_file.read_text(encoding="utf-8"))
                addresses = (run["control"], *addresses)
            except (OSError, json.JSONDecodeError, KeyError):
                pass  # a stale or partial run file: fall back to the configured address
        if not addresses:
            raise ConfigError(f"operator profile {directory} names no broker address")
        return cls(
            directory=directory,
            vault=str(doc.get("vault", "")),
            addresses=addresses,
            key_pem=key_pem,
            cert_pem=cert_pem,
            ca_pem=ca_pem,
        )


class PageRequest(Protocol):
    """A request for one page of a paged list: ``page_size`` items after ``page_token``."""

    page_size: int
    page_token: str


class Page(Protocol):
    """One page of a paged list."""

    @property
    def next_page_token(self) -> str: ...


class AdminClient:
    """Blocking admin API client; every failure is a SitepairError with a readable message.

    ``stub`` is the generated Admin stub, so mypy checks each request and answer. Call it
    through :meth:`call` (one answer) or :meth:`list_all` (every page of a list), which apply the
    client's timeout, or :meth:`watch_job` (a stream, without one); all three turn a failed call
    into a SitepairError an operator can act on (:func:`sitepair.rpc.error_from_rpc`).
    """

    def __init__(self, profile: Profile, *, timeout: float = 30.0) -> None:
        self.timeout = timeout
        self.address = profile.addresses[0]
        creds = grpc.ssl_channel_credentials(
            root_certificates=profile.ca_pem,
            private_key=profile.key_pem,
            certificate_chain=profile.cert_pem,
        )
        self._channel = grpc.secure_channel(
            self.address, creds, options=channel_options(target_name=pki.BROKER_DNS_NAME)
        )
        self.stub = admin_pb2_grpc.AdminStub(self._channel)
        #: The CA rotation API (``sitepair-broker ca``), on the same connection.
        self.ca = admin_pb2_grpc.CertificateAuthorityStub(self._channel)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> AdminClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def call(
        self,
        method: grpc.UnaryUnaryMultiCallable[RequestT, ResponseT],
        request: RequestT,
        *,
        timeout: float | None = None,
    ) -> ResponseT:
        """The answer of one call of ``method``, a method of :attr:`stub`."""
        try:
            return method(request, timeout=timeout or self.timeout, wait_for_ready=False)
        except grpc.RpcError as exc:
            raise error_from_rpc(exc, peer=f"broker at {self.address}") from None

    def list_all(
        self,
        method: grpc.UnaryUnaryMultiCallable[PageRequestT, PageT],
        request: PageRequestT,
        items: Callable[[PageT], Iterable[ItemT]],
        *,
        limit: int = 0,
        timeout: float | None = None,
    ) -> list[ItemT]:
        """The items of every page of a paged list (``items`` picks them from a page), or the
        first ``limit`` of them (0 = all)."""
        found: list[ItemT] = []
        for page in self._pages(method, request, timeout=timeout):
            found.extend(items(page))
            if limit and len(found) >= limit:
                return found[:limit]
        return found

    def _pages(
        self,
        method: grpc.UnaryUnaryMultiCallable[PageRequestT, PageT],
        request: PageRequestT,
        *,
        timeout: float | None,
    ) -> Iterator[PageT]:
        """Every page of a paged list, following ``next_page_token`` until the last one.

        ``request`` is not changed; each page is asked with a copy carrying the token. A broker
        that hands back a token it already gave (it never should) ends the walk with an error
        rather than loop forever.
        """
        seen: set[str] = set()
        page_request = copy.deepcopy(request)
        while True:
            page = self.call(method, page_request, timeout=timeout)
            yield page
            token = page.next_page_token
            if not token:
                return
            if token in seen:
                # Paged lists are List<Things>(List<Things>Request): name the method.
                name = type(request).__name__.removesuffix("Request")
                raise SitepairError(f"the broker at {self.address} repeated a page of {name}")
            seen.add(token)
            page_request.page_token = token

    def watch_job(self, job_id: str, *, timeout: float | None = None) -> Iterator[admin_pb2.Job]:
        """Every change of a job until it is final (or ``timeout`` seconds pass)."""
        try:
            yield from self.stub.WatchJob(admin_pb2.GetJobRequest(id=job_id), timeout=timeout)
        except grpc.RpcError as exc:
            raise error_from_rpc(exc, peer=f"broker at {self.address}") from None


def wait_job(client: AdminClient, job_id: str, *, timeout: float | None = None) -> admin_pb2.Job:
    """Block until a job is final and return it (DeadlineExceeded after ``timeout`` seconds)."""
    last: admin_pb2.Job | None = None
    for job in client.watch_job(job_id, timeout=timeout):
        last = job
    if last is None:
        raise SitepairError(f"job {job_id} stream ended without a state")
    return last
