"""Failover steps an agent performs, each idempotent and fenced by the relationship's epoch.

On the **recovery host**, a failover turns a recovery point of the replica into a running VM:
the point's layers are pinned and a VM is registered in the host backend over them, with a new
differencing child per disk as its active layer. The replica's own layers are never written by
that VM, so until the failover is committed it can be cancelled exactly (the VM and its child
are removed, the replica is as before). A test failover does the same under another VM name and
id, on an isolated network, while replication continues into the replica untouched.

On the **old primary**, fencing stops replication of the relationship and powers the VM off;
for reverse replication, the old VM's disk chains become the replica of the new direction, so a
checksum resync sends only the blocks that differ.

**Exact proof** (a test failover with ``prove_exact``, what a DR drill asks): the test VM is
registered powered off, then :func:`prove_test` reads every block of each of its disks as the VM
will read them (its registered chain: the backend's new child, or its flattened copy, over the
point's layers) and every block of the recovery point's own chain, and compares their BLAKE3
digests (:data:`PROOF_BLOCK` blocks). The proof is kept in the test record, so a repeated command
answers it without reading again, and the point keeps the per-disk digests of its first proof,
which later proofs report as ``earlier_digests``: a point whose layers changed at rest (bit rot,
a stray writer) shows as a digest that moved. A mismatch is a finding, not an error; the broker
judges the drill. But the VM is started (``start_vm``) only when the proof is clean: no mismatched
block and no digest that moved. A VM that does not read what the point holds tests nothing, and
booting it would write into the evidence; it stays off for inspection until cleanup. The disks
are read with no lock held (the point's layers are pinned, so nothing changes them, and
replication goes on into the replica's active layer meanwhile): the store's lock is taken only to
read the record and the point, and again to record the proof.

Every step records its outcome in the replica's state, so a step repeated after a crash or a
redelivered command returns what was done instead of doing it again. A step carrying an epoch
lower than the highest the host has seen is refused (StaleEpoch). The record is a dict in the
replica's state; what a step answers the broker is built from it (:func:`failover_result`).
"""

from __future__ import annotations

import itertools
import logging
import shutil
import uuid
from pathlib import Path
from typing import Any

import blake3

from agent.hosts.base import HostBackend, RegisteredVm
from agent.replication.replica import DiskState, Point, ReplicaStore
from agent.replication.state import ReplicationState
from sitepair import vdisk
from sitepair.errors import FailedPrecondition, InvalidArgument, NotFound
from sitepair.protoconv import timestamp
from sitepair.v1 import control_pb2
from sitepair.vdisk import ops as vdisk_ops

log = logging.getLogger("sitepair.agent.failover")

LATEST = "latest"
LATEST_APP = "latest-app-consistent"
#: The block an exact proof compares (and reports in ExactProof.block_size).
PROOF_BLOCK = 1024 * 1024


def settle(store: ReplicaStore) -> None:
    """Bring the replica to exactly its last committed cycle and drop anything staged after it
    (the cycle being received when the primary was lost can never be completed)."""
    store.recover()
    staging = store.root / "staging"
    if staging.exists():
        for d in staging.iterdir():
            shutil.rmtree(d, ignore_errors=True)


def choose_point(store: ReplicaStore, kind: str, sequence: int) -> Point | None:
    """The point to fail over to; None means the latest committed state."""
    st = store.state
    if not st.disks:
        raise FailedPrecondition(
            f"the replica of {st.relationship} holds no data yet "
            "(initial replication has not completed)"
        )
    if kind == LATEST:
        return None
    if kind == LATEST_APP:
        if st.app_consistent:
            return None
        for p in reversed(st.points):
            if p.app_consistent:
                return p
        raise NotFound(
            f"the replica of {st.relationship} has no application-consistent recovery point"
        )
    if sequence == st.committed_sequence:
        return None
    return store.point(sequence)


def freeze_latest(store: ReplicaStore, now: float) -> Point:
    """Seal the latest committed state as a point (even when the policy keeps none)."""
    st = store.state
    if st.points and st.points[-1].sequence == st.committed_sequence:
        return st.points[-1]
    return store.seal(now)


def point_chains(store: ReplicaStore, point: Point) -> dict[str, list[Path]]:
    out: dict[str, list[Path]] = {}
    for disk_id, ds in store.state.disks.items():
        top = point.layers[disk_id]
        chain = ds.chain[: ds.chain.index(top) + 1]
        out[disk_id] = [store.path(c) for c in chain]
    return out


def failover_result(relationship: str, record: dict[str, Any]) -> control_pb2.FailoverResult:
    """What the broker is told about a failover (or test failover) from its record."""
    return control_pb2.FailoverResult(
        relationship_id=relationship,
        epoch=int(record["epoch"]),
        test=bool(record["test"]),
        point=int(record["point"]),
        cut_at=timestamp(float(record["cut_at"])) if record.get("cut_at") else None,
        app_consistent=bool(record.get("app_consistent")),
        vm_name=str(record["vm_name"]),
        vm_id=str(record["vm_id"]),
        committed=bool(record.get("committed")),
        started=bool(record.get("started")),
        exact=_exact_proof(record["exact"]) if record.get("exact") else None,
    )


def _exact_proof(proof: dict[str, Any]) -> control_pb2.ExactProof:
    return control_pb2.ExactProof(
        checked=True,
        bytes_compared=int(proof["bytes_compared"]),
        blocks_compared=int(proof["blocks_compared"]),
        mismatched_blocks=int(proof["mismatched_blocks"]),
        disk_digests=dict(proof["disk_digests"]),
        earlier_digests=dict(proof["earlier_digests"]),
        block_size=int(proof["block_size"]),
    )


def failover(
    store: ReplicaStore,
    backend: HostBackend,
    state: ReplicationState,
    *,
    epoch: int,
    point_kind: str,
    sequence: int,
    vm: dict[str, Any],
    nic_networks: dict[str, str],
    start: bool,
    test: bool,
    now: float,
    prove_exact: bool = False,
) -> control_pb2.FailoverResult:
    """Make the VM of a failover or test failover. With ``prove_exact`` (test only) the test VM
    is registered off and ``start`` is left to :func:`prove_test`, which the caller runs next,
    without the relationship's locks."""
    rel = store.state.relationship
    if prove_exact and not test:
        raise InvalidArgument("an exact proof is made of a test failover only")
    start_now = start and not prove_exact
    state.observe_epoch(rel, epoch)
    with store.lock:
        st = store.state
        if test:
            done = st.tests.get("test")
            if done is not None:
                return failover_result(rel, done)
        else:
            if st.failover is not None:
                if st.failover["epoch"] == epoch:
                    return failover_result(rel, st.failover)
                raise FailedPrecondition(
                    f"{rel} was already failed over at epoch {st.failover['epoch']}"
                )
            if st.tests:
                raise FailedPrecondition(
                    f"a test failover of {rel} is in place",
                    hint="clean it up before a real failover",
                )
        settle(store)
        chosen = choose_point(store, point_kind, sequence)
        point = chosen if chosen is not None else freeze_latest(store, now)
        tag = "test" if test else "failover"
        if tag not in point.pins:
            point.pins.append(tag)
        store.save()
        chains = point_chains(store, point)
        name = vm["name"] + ("-test" if test else "")
        vm_id = (
            str(uuid.uuid5(uuid.NAMESPACE_URL, f"sitepair-test:{vm['id']}")) if test else vm["id"]
        )
        existing = backend.vm_id_of(name)
        if not test and existing is not None and existing != vm_id:
            raise FailedPrecondition(
                f"this host already has another VM named {name} (id {existing})",
                hint="rename or remove that VM, then fail over again",
            )
        if test and existing is not None:
            backend.remove_vm(name)  # a test VM left by an interrupted attempt
        registered = backend.register_vm(
            name,
            vm_id=vm_id,
            disks=[(d, chains[d]) for d in sorted(chains)],
            cpu=int(vm.get("cpu_count", 1)),
            memory_mb=int(vm.get("memory_mb", 1024)),
            generation=int(vm.get("generation", 2)),
            nics=[(n["name"], nic_networks.get(n["name"], "")) for n in vm.get("nics", [])],
            state="running" if start_now else "off",
            replace=not test and existing is not None,
        )
        record = {
            "epoch": epoch,
            "test": test,
            "point": point.sequence,
            "cut_at": point.cut_at,
            "app_consistent": point.app_consistent,
            "vm_name": name,
            "vm_id": vm_id,
            "vm_folder": registered.location,
            "children": list(registered.created),
            "previous_vm": registered.previous,
            "committed": False,
            "started": start_now,
            "prove_exact": prove_exact,
        }
        if test:
            st.tests["test"] = record
        else:
            st.failover = record
            st.epoch = max(st.epoch, epoch)
        store.save()
    log.warning(
        "test failover VM created" if test else "failed over",
        extra={
            "fields": {"relationship": rel, "vm": name, "point": point.sequence, "epoch": epoch}
        },
    )
    return failover_result(rel, record)


def prove_test(
    store: ReplicaStore, backend: HostBackend, *, start: bool
) -> control_pb2.FailoverResult:
    """Prove that the test VM :func:`failover` registered (off, ``prove_exact``) reads exactly
    its recovery point, record the proof, then start the VM if ``start`` and the proof is clean.
    Done once: a repeated call answers the recorded proof (and finishes a start a crash cut
    short). The disks are read without the store's lock (module docstring)."""
    rel = store.state.relationship
    with store.lock:
        record = store.state.tests.get("test")
        if record is None:
            raise FailedPrecondition(
                f"no test failover of {rel} is in place to prove",
                hint="make a test failover with prove_exact",
            )
        if not record.get("prove_exact"):
            raise FailedPrecondition(
                f"the test failover of {rel} in place was made without an exact proof "
                "(its VM may have run and written its disks)",
                hint="clean it up, then make the test failover again with prove_exact",
            )
        source: dict[str, list[Path]] | None = None
        if record.get("exact") is None:
            point = store.point(int(record["point"]))
            source = point_chains(store, point)
            earlier = dict(point.proven_digests)
    if source is not None:
        proof = compare_chains(source, backend.disk_chains(str(record["vm_id"])))
        proof["earlier_digests"] = earlier
        with store.lock:
            current = store.state.tests.get("test")
            if current is None or current["vm_id"] != record["vm_id"]:
                raise FailedPrecondition(
                    f"the test failover of {rel} was cleaned up while its disks were compared"
                )
            record = current
            if record.get("exact") is None:  # the first proof recorded is the answer
                record["exact"] = proof
                point = store.point(int(record["point"]))
                if not point.proven_digests:
                    point.proven_digests = dict(proof["disk_digests"])
                store.save()
        log.warning(
            "test failover VM proven" if proof_clean(record["exact"]) else "exact proof failed",
            extra={
                "fields": {
                    "relationship": rel,
                    "vm": record["vm_name"],
                    "point": record["point"],
                    "mismatched_blocks": record["exact"]["mismatched_blocks"],
                    "digests_moved": _moved(record["exact"]),
                }
            },
        )
    if start and not record.get("started") and proof_clean(record["exact"]):
        backend.set_vm_state(str(record["vm_id"]), "running")
        with store.lock:
            record["started"] = True
            store.save()
    return failover_result(rel, record)


def _moved(proof: dict[str, Any]) -> list[str]:
    """The disks whose digest differs from the one their point's first proof read."""
    earlier = proof["earlier_digests"]
    return sorted(d for d, v in proof["disk_digests"].items() if d in earlier and earlier[d] != v)


def proof_clean(proof: dict[str, Any]) -> bool:
    """No block differs, and no disk's digest moved since the point was first proven."""
    return proof["mismatched_blocks"] == 0 and not _moved(proof)


def compare_chains(
    source: dict[str, list[Path]], copy: dict[str, list[Path]], *, block: int = PROOF_BLOCK
) -> dict[str, Any]:
    """Compare, block by block, each disk of ``source`` (chains, base first) with the disk of
    the same id in ``copy``, as their top layers read with their parents. The per-disk digest
    is BLAKE3 over the source's per-block digests. Blocks beyond the smaller virtual size count
    as mismatched. A disk the copy lacks is an error (a backend that made the VM wrongly)."""
    missing = sorted(set(source) - set(copy))
    if missing:
        raise FailedPrecondition(
            f"the test VM has no disk {missing[0]} of its recovery point; it was not made whole",
            hint="clean up the test failover and make it again",
        )
    bytes_compared = blocks = mismatched = 0
    digests: dict[str, str] = {}
    for disk_id in sorted(source):
        with (
            vdisk.open_disk(source[disk_id][-1], read_only=True) as a,
            vdisk.open_disk(copy[disk_id][-1], read_only=True) as b,
        ):
            hasher = blake3.blake3()
            empty: tuple[int, list[bytes], set[int]] = (0, [], set())
            windows = itertools.zip_longest(
                vdisk_ops.iter_digests(a, block), vdisk_ops.iter_digests(b, block), fillvalue=empty
            )
            for (_, ours, _), (_, theirs, _) in windows:
                for x, y in itertools.zip_longest(ours, theirs):
                    mismatched += x != y
                    if x is not None:
                        hasher.update(x)
                blocks += max(len(ours), len(theirs))
            bytes_compared += max(a.virtual_size, b.virtual_size)
            digests[disk_id] = hasher.hexdigest()
    return {
        "bytes_compared": bytes_compared,
        "blocks_compared": blocks,
        "mismatched_blocks": mismatched,
        "disk_digests": digests,
        "earlier_digests": {},
        "block_size": block,
    }


def _undo_vm(backend: HostBackend, record: dict[str, Any]) -> None:
    backend.unregister_vm(
        RegisteredVm(
            vm_id=record["vm_id"],
            name=record["vm_name"],
            location=record["vm_folder"],
            created=tuple(record.get("children", [])),
            previous=record.get("previous_vm"),
        )
    )


def _unpin(store: ReplicaStore, tag: str) -> None:
    for p in store.state.points:
        if tag in p.pins:
            p.pins.remove(tag)


def cleanup_test(store: ReplicaStore, backend: HostBackend) -> control_pb2.FailoverControlResult:
    rel = store.state.relationship
    with store.lock:
        record = store.state.tests.pop("test", None)
        if record is None:
            return control_pb2.FailoverControlResult(
                relationship_id=rel, done=False, reason="no test failover in place"
            )
        _undo_vm(backend, record)
        _unpin(store, "test")
        store.save()
    log.info(
        "test failover cleaned up", extra={"fields": {"relationship": store.state.relationship}}
    )
    return control_pb2.FailoverControlResult(
        relationship_id=rel, done=True, vm_name=str(record["vm_name"])
    )


def cancel(
    store: ReplicaStore, backend: HostBackend, state: ReplicationState, *, epoch: int
) -> control_pb2.FailoverControlResult:
    """Undo a failover that was not committed: the replica is exactly as before it."""
    rel = store.state.relationship
    state.observe_epoch(rel, epoch)
    with store.lock:
        record = store.state.failover
        if record is None:
            return control_pb2.FailoverControlResult(
                relationship_id=rel, done=False, reason="no failover in place"
            )
        if record.get("committed"):
            raise FailedPrecondition(
                f"the failover of {rel} was committed; it cannot be cancelled",
                hint="fail over in the other direction instead "
                "(reverse replication, then a planned failover)",
            )
        _undo_vm(backend, record)
        _unpin(store, "failover")
        store.state.failover = None
        store.save()
    log.warning("failover cancelled", extra={"fields": {"relationship": rel, "epoch": epoch}})
    return control_pb2.FailoverControlResult(relationship_id=rel, done=True)


def commit(
    store: ReplicaStore, state: ReplicationState, *, epoch: int
) -> control_pb2.FailoverControlResult:
    """Keep the failed-over VM for good: other recovery points are discarded, no way back."""
    rel = store.state.relationship
    state.observe_epoch(rel, epoch)
    with store.lock:
        record = store.state.failover
        if record is None:
            raise FailedPrecondition(f"{rel} is not failed over; there is nothing to commit")
        if record.get("committed"):
            return _committed(rel, record)
        if store.state.tests:
            raise FailedPrecondition(
                f"a test failover of {rel} is in place", hint="clean it up first"
            )
        point = store.point(record["point"])
        for disk_id, ds in store.state.disks.items():
            # Layers above the chosen point (later points, the replica's active layer) are
            # not part of the failed-over VM's chains: discarded.
            cut = ds.chain.index(point.layers[disk_id]) + 1
            for layer in ds.chain[cut:]:
                store.path(layer).unlink(missing_ok=True)
            ds.chain = ds.chain[:cut]
        store.state.points = []
        record["committed"] = True
        store.save()
    state.remove_grant(rel)
    log.warning("failover committed", extra={"fields": {"relationship": rel, "epoch": epoch}})
    return _committed(rel, record)


def _committed(rel: str, record: dict[str, Any]) -> control_pb2.FailoverControlResult:
    return control_pb2.FailoverControlResult(
        relationship_id=rel, done=True, failover=failover_result(rel, record)
    )


def adopt_vm_as_replica(
    root: Path,
    backend: HostBackend,
    *,
    relationship: str,
    vm_id: str,
    epoch: int,
    committed_sequence: int,
    clock: Any = None,
) -> ReplicaStore:
    """Reverse replication: the (fenced, powered off) VM's disk chains on this host become the
    replica of the new direction, at ``committed_sequence``, so that a checksum resync from the
    new primary sends only the blocks that differ."""
    state = backend.vm_state(vm_id)
    if state != "off":
        raise FailedPrecondition(
            f"VM {vm_id} is {state} on this host; it must be off before it becomes a replica"
        )
    chains = backend.settle_disks(vm_id)
    store = ReplicaStore.create(
        root, relationship=relationship, vm_id=vm_id, epoch=epoch, clock=clock
    )
    with store.lock:
        st = store.state
        if st.disks and st.failover is None and st.epoch >= epoch:
            return store  # done before (a redelivered command)
        # Whatever this folder held before (the replica of the other direction, committed
        # into the VM we adopt now) is replaced; the VM's chains may use its files.
        st.points = []
        st.failover = None
        st.tests = {}
        st.intent = None
        staging = root / "staging"
        if staging.exists():
            for leftover in staging.iterdir():
                shutil.rmtree(leftover, ignore_errors=True)
        disks: dict[str, DiskState] = {}
        for disk_id, chain in chains.items():
            with vdisk.open_disk(chain[-1], read_only=True) as d:
                disks[disk_id] = DiskState(
                    virtual_size=d.virtual_size,
                    format=d.format.value,
                    logical_sector_size=d.logical_sector_size,
                    physical_sector_size=d.physical_sector_size,
                    chain=[str(p.resolve()) for p in chain],
                )
        st.disks = disks
        st.committed_sequence = committed_sequence
        st.epoch = max(st.epoch, epoch)
        store.save()
    log.warning(
        "old primary VM adopted as the replica of the reverse direction",
        extra={"fields": {"relationship": relationship, "vm": vm_id, "replica": str(root)}},
    )
    return store


def check_point_kind(kind: str) -> str:
    if kind not in (LATEST, LATEST_APP) and not kind.isdigit():
        raise InvalidArgument(
            f"recovery point must be {LATEST}, {LATEST_APP} or a sequence number, not {kind!r}"
        )
    return kind
