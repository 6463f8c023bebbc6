"""What the broker accepts from an agent: caps on size, on counts and on every string.

An enrolled agent is trusted to be *who* it is, not to be well behaved: a host taken over, or a
buggy agent, can send anything the control stream carries. Everything it sends is bounded on
arrival, here and in :func:`broker.inventory.accept_inventory`, so that no single agent can make
the broker's memory or its store grow without bound, or make a listing of the vault too big to
send. Every cap lives in this module, so an operator (and ``docs/operations.md``, "Bounds")
finds them in one place.

The decision per field, in short: what the broker *acts on* (the cloud a host joins, the address
and ports its replicas are reached at, the default replica folder, VM and disk ids, storage
classification names and paths) must pass its rule or the message is refused; what is only
*displayed* (host name, OS, platform, versions) is cut to its cap. Refusals are logged once per
stream with values cut by :func:`sitepair.logsafe.shown`, and the agent is told only the rule it
broke, never anything about the vault.

* **Hello facts** (and the facts a registration carries): larger than :data:`MAX_FACTS_BYTES`
  serialized, or a field the broker acts on breaking its rule, refuses the stream (or the
  registration) with INVALID_ARGUMENT naming the cap; nothing is stored. Display fields over
  their cap are cut. Unknown fields are dropped.
* **Heartbeat metrics**: a heartbeat always counts for liveness. Metrics larger than
  :data:`MAX_METRICS_BYTES` are stored as an empty document; otherwise volumes past
  :data:`MAX_VOLUMES` are dropped and each volume path is cut to :data:`MAX_VOLUME_PATH`.
* **Inventory**: see :func:`broker.inventory.accept_inventory` (refused whole when it is too big
  or has too many entries; a single VM, network or storage entry that breaks a rule is left out).
* **Command acknowledgements**: an ack whose command id is longer than :data:`MAX_ID` is
  dropped; its error is cut by the dispatcher (4 KiB), and a result whose stored JSON is over
  1 MiB is not kept (``broker.documents.MAX_STORED_RESULT``).
* **Any message** larger than :data:`MAX_AGENT_MESSAGE` is dropped (the gRPC receive limit,
  :data:`sitepair.rpc.CONTROL_MAX_RECEIVE`, normally stops it first).

Data an older broker stored before these caps existed is bounded when it is read: see the
``MAX_STORED_*`` caps, applied by the store's page queries and :mod:`broker.convert`.
"""

from __future__ import annotations

import re
from pathlib import PurePosixPath, PureWindowsPath

from broker import documents
from sitepair import pki
from sitepair.errors import InvalidArgument
from sitepair.v1 import common_pb2

KIB = 1024
MIB = 1024 * KIB

# -- sizes of whole messages, on arrival (serialized protobuf bytes) ---------------------------
#: Hello (and RegisterRequest) host facts.
MAX_FACTS_BYTES = 16 * KIB
#: Heartbeat metrics.
MAX_METRICS_BYTES = 32 * KIB
#: One inventory.
MAX_INVENTORY_BYTES = 4 * MIB
#: Any message on the control stream (the inventory plus its envelope).
MAX_AGENT_MESSAGE = MAX_INVENTORY_BYTES + 64 * KIB

# -- sizes of stored values, when the admin API reads them (characters) ------------------------
# A little above what arrival allows (JSON is wordier than protobuf); a value over these was
# stored by a broker older than the caps and is withheld from admin responses.
#: ``servers.facts_json``.
MAX_STORED_FACTS = 4 * MAX_FACTS_BYTES
#: ``servers.metrics_json``.
MAX_STORED_METRICS = 4 * MAX_METRICS_BYTES
#: ``server_inventory.payload`` (bytes).
MAX_STORED_INVENTORY = MAX_INVENTORY_BYTES
#: ``vms.disks_json`` and ``vms.nics_json`` of one VM row.
MAX_STORED_VM_JSON = 2 * MIB
#: A column an admin list is sorted by that an agent controls (a VM's name and id, a protected
#: VM's name): rows with a longer one are not listed, since their sort key could not travel in
#: a page token. Arrival allows at most 256 characters, so only an older broker's data is hit;
#: the host's next inventory replaces such rows.
MAX_STORED_KEY = 1024

# -- counts -----------------------------------------------------------------------------------
#: VMs in one inventory (a Hyper-V host supports 1024 running VMs).
MAX_VMS = 4096
#: Virtual disks of one VM (Hyper-V: 4 SCSI controllers x 64, plus IDE).
MAX_DISKS_PER_VM = 260
#: Network adapters of one VM (Hyper-V allows 12 synthetic and 4 legacy ones).
MAX_NICS_PER_VM = 64
#: VM networks one host reports, and subnets of each.
MAX_NETWORKS = 1024
MAX_SUBNETS = 64
#: Storage classifications one host reports.
MAX_STORAGE = 256
#: Volumes in one heartbeat's metrics.
MAX_VOLUMES = 64

# -- strings (characters) ---------------------------------------------------------------------
#: File system paths (disk paths, storage paths, the default replica folder).
MAX_PATH = 4096
#: A volume path in metrics (display only: cut, not refused).
MAX_VOLUME_PATH = 1024
#: Free text shown to operators: host name, OS description.
MAX_TEXT = 256
#: Short words: versions, platform, backend, VM state, disk format, MAC, subnet.
MAX_SHORT = 64
#: Ids the broker looks up (command ids) and inventory digests.
MAX_ID = 128
#: A host name or address replicas connect to (a DNS name is at most 253 characters).
MAX_HOST_ADDRESS = 255
#: Largest integer the store keeps in an INTEGER / BIGINT column, with room to spare; larger
#: numbers from an agent are refused (they would fail the whole store transaction).
MAX_STORED_INT = 2**62

_HOST_ADDRESS = re.compile(r"^[A-Za-z0-9._:%\[\]-]{1,255}$")


def _printable(text: str) -> str:
    return "".join(ch for ch in text if ch.isprintable())


def cut(text: str, limit: int) -> str:
    """Display text kept: control characters dropped, at most ``limit`` characters."""
    if len(text) <= limit and text.isprintable():
        return text
    return _printable(text[: limit * 2])[:limit]


def check_path(value: str, what: str, *, absolute: bool = True) -> str:
    """A path a host reports: at most :data:`MAX_PATH` characters, no NUL or other control
    characters, and (by default) absolute on POSIX or on Windows (a drive, or a UNC share)."""
    if not value:
        raise InvalidArgument(f"{what} is empty")
    if len(value) > MAX_PATH:
        raise InvalidArgument(f"{what} is {len(value)} characters; at most {MAX_PATH} are kept")
    if not value.isprintable():
        raise InvalidArgument(f"{what} holds a NUL or another control character")
    if absolute and not (
        PurePosixPath(value).is_absolute() or PureWindowsPath(value).is_absolute()
    ):
        raise InvalidArgument(f"{what} is not an absolute path")
    return value


def check_count(count: int, limit: int, what: str) -> None:
    if count > limit:
        raise InvalidArgument(f"{count} {what}; the broker accepts at most {limit}")


def check_int(value: int, what: str) -> int:
    if value > MAX_STORED_INT:
        raise InvalidArgument(f"{what} {value} is out of range")
    return value


def accept_facts(facts: common_pb2.HostFacts) -> common_pb2.HostFacts:
    """The facts the broker keeps from a Hello or a registration; raises InvalidArgument (the
    stream or registration is refused, nothing stored) when they are over
    :data:`MAX_FACTS_BYTES` or a field the broker acts on breaks its rule."""
    size = facts.ByteSize()
    if size > MAX_FACTS_BYTES:
        raise InvalidArgument(
            f"the host facts are {size} bytes; this broker accepts at most {MAX_FACTS_BYTES}",
            hint="the agent sends more than any host needs to report; check its version",
        )
    if facts.cloud:
        pki.check_identifier(facts.cloud, "declared cloud")
    if facts.replication_host and not _HOST_ADDRESS.match(facts.replication_host):
        raise InvalidArgument(
            "the replication host is not a host name or address",
            hint="set [replication] host in agent.toml to a DNS name or an IP address",
        )
    for port, what in ((facts.certificate_port, "certificate"), (facts.ticket_port, "ticket")):
        if port > 65535:
            raise InvalidArgument(f"the replication {what} port {port} is out of range")
    if facts.default_replica_path:
        check_path(facts.default_replica_path, "the default replica path")
    check_int(facts.memory_total_bytes, "the memory size")
    return common_pb2.HostFacts(
        hostname=cut(facts.hostname, MAX_TEXT),
        os=cut(facts.os, MAX_TEXT),
        platform=cut(facts.platform, MAX_SHORT),
        backend=cut(facts.backend, MAX_SHORT),
        cpu_count=facts.cpu_count,
        memory_total_bytes=facts.memory_total_bytes,
        agent_version=cut(facts.agent_version, MAX_SHORT),
        protocol_version=facts.protocol_version,
        cloud=facts.cloud,
        replication_host=facts.replication_host,
        certificate_port=facts.certificate_port,
        ticket_port=facts.ticket_port,
        default_replica_path=facts.default_replica_path,
    )


def accept_metrics(metrics: common_pb2.HostMetrics) -> tuple[common_pb2.HostMetrics, str]:
    """The metrics the broker keeps from a heartbeat, and what was cut ("" = nothing).

    Never refuses: the heartbeat itself counts for liveness whatever its metrics hold.
    """
    size = metrics.ByteSize()
    if size > MAX_METRICS_BYTES:
        return (
            common_pb2.HostMetrics(),
            f"metrics of {size} bytes stored empty (cap {MAX_METRICS_BYTES})",
        )
    kept = common_pb2.HostMetrics(
        cpu_percent=metrics.cpu_percent,
        memory_total_bytes=metrics.memory_total_bytes,
        memory_available_bytes=metrics.memory_available_bytes,
        load_average_1m=metrics.load_average_1m,
        uptime_seconds=metrics.uptime_seconds,
    )
    note = ""
    if len(metrics.volumes) > MAX_VOLUMES:
        note = f"{len(metrics.volumes)} volumes cut to {MAX_VOLUMES}"
    for v in metrics.volumes[:MAX_VOLUMES]:
        path = cut(v.path, MAX_VOLUME_PATH)
        if path != v.path and not note:
            note = f"a volume path of {len(v.path)} characters cut to {MAX_VOLUME_PATH}"
        kept.volumes.add(path=path, total_bytes=v.total_bytes, free_bytes=v.free_bytes)
    return kept, note


def to_json(message: common_pb2.HostFacts | common_pb2.HostMetrics) -> str:
    """How facts and metrics are stored (``servers.facts_json`` / ``metrics_json``): see
    :mod:`broker.documents`."""
    return documents.encode_message(message)
