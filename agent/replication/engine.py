"""One protected VM on its primary host: decide, plan and send cycles; keep statistics.

Each cycle, :meth:`SourceRelationship.run_cycle`:

1. asks the replica what it holds (committed sequence, epoch); a replica at a higher epoch means
   this host was failed over from: it is fenced and stops;
2. finishes a cycle that committed before this host could record it (release the cut);
3. picks the kind: INITIAL (replica empty), RESYNC (tracking untrusted, or asked for), or
   DELTA; reuses an outstanding cut that was never committed (so the replica can resume it) or
   takes a new consistent cut through the host backend;
4. plans the blocks: all allocated blocks (initial), the tracker's changed blocks (delta), or
   the blocks whose digests differ from the replica's (resync: only differing blocks travel);
5. records the cycle as outstanding, sends it, and on commit releases the cut (the backend folds
   the frozen layers back) and, after an initial or resync cycle, trusts tracking again.

A crash anywhere leaves the outstanding record and the cut; the next call picks up from there.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import blake3

from agent.hosts.base import Cut, HostBackend, QuiesceFailed
from agent.identity import AgentIdentity
from agent.replication import codes
from agent.replication.blocks import BLOCK, BlockRef, blocks_for, group
from agent.replication.sender import CyclePlan, CycleRefused, CycleResult, DiskPlan, ReplicaClient
from agent.replication.state import PendingCycle, ReplicationState, SenderState, SourceConfig
from agent.replication.stats import (
    NO_OBSERVER,
    CycleObserver,
    FinalCycleReport,
    State,
    Stats,
    VerifyReport,
)
from agent.replication.throttle import TokenBucket
from agent.replication.tracking import DigestStore, differing_ranges, digests_of
from sitepair import vdisk
from sitepair.clock import Clock
from sitepair.errors import FailedPrecondition, SitepairError, StaleEpoch, Unavailable
from sitepair.protoconv import timestamp
from sitepair.v1 import control_pb2, replication_pb2

log = logging.getLogger("sitepair.agent.replication")

#: Waits (seconds) before each retry of a cycle whose connection broke; then the cycle fails
#: and the loop tries again at the next interval.
TRANSIENT_BACKOFF = (1.0, 3.0)

KIND_NAMES = {
    replication_pb2.INITIAL: "initial",
    replication_pb2.DELTA: "delta",
    replication_pb2.RESYNC: "resync",
    replication_pb2.FINAL: "final",
}


def full_digests(sent: dict[int, bytes], virtual_size: int) -> list[bytes]:
    """Per-block digests of a disk after an initial cycle: the blocks sent, zeros elsewhere
    (blocks an initial cycle does not send are unallocated, so they read as zeros)."""
    zero: dict[int, bytes] = {}
    out = []
    for off in range(0, virtual_size, BLOCK):
        n = min(BLOCK, virtual_size - off)
        dg = sent.get(off, b"")
        if not dg:
            if n not in zero:
                zero[n] = blake3.blake3(bytes(n)).digest()
            dg = zero[n]
        out.append(dg)
    return out


class SourceRelationship:
    def __init__(
        self,
        config: SourceConfig,
        *,
        backend: HostBackend,
        state: ReplicationState,
        identity: Callable[[], AgentIdentity],
        clock: Clock,
        work_dir: Path,
        ticket_provider: Callable[[], str] | None = None,
        host_bucket: TokenBucket | None = None,
        tracker: str = "changelog",
        adaptive_compression: bool = True,
    ) -> None:
        self.config = config
        self.adaptive_compression = adaptive_compression
        self.backend = backend
        self.state = state
        self.identity = identity
        self.clock = clock
        self.ticket_provider = ticket_provider
        self.tracker = tracker
        self.digest_store = DigestStore(work_dir / config.relationship / "digests")
        self.bucket = TokenBucket(config.bandwidth_limit)
        self.host_bucket = host_bucket
        self.stats = Stats()
        #: Told of each cycle's end (the agent's metrics); set by the runners.
        self.observer: CycleObserver = NO_OBSERVER
        self.lock = threading.Lock()  # one cycle (or verify) at a time
        self.last_result: CycleResult | None = None
        self.resync_requested = False
        #: Replaced by a reconfiguration: whatever still waits for the lock must not run.
        self.retired = False
        #: The last cycle finished an earlier, interrupted cut instead of taking a new one.
        self.resent_cut = False
        self._client: ReplicaClient | None = None
        self._client_key: tuple[str, str, bytes, bytes, bytes] | None = None
        self._stopped = False

    def retire(self) -> None:
        """Refuse further work: a new :class:`SourceRelationship` with the new configuration
        takes over. A cycle in flight is not waited for (an initial copy may take hours); it
        ends on its own, and the replica's per-relationship lock keeps the new object's first
        cycle from overlapping it."""
        self.retired = True

    def _check_current(self) -> None:
        if self.retired:
            raise FailedPrecondition(
                f"{self.relationship} was reconfigured while this waited to run; run it again"
            )

    @property
    def relationship(self) -> str:
        return self.config.relationship

    def client(self) -> ReplicaClient:
        """The connection to the replica, kept across cycles (one TLS handshake, not one per
        cycle) while the address, the authentication and this host's identity stay the same: a
        renewed certificate or a new trust bundle makes a new connection. gRPC reconnects a
        kept channel by itself; a call that fails as Unavailable drops it all the same, so a
        retry starts on a new one. Called with :attr:`lock` held."""
        ident = self.identity()
        cfg = self.config
        key = (cfg.address, cfg.auth, ident.key_pem, ident.cert_pem, ident.ca_pem)
        if self._client is not None and self._client_key != key:
            self.close()
        if self._client is None:
            self._client = ReplicaClient(
                identity=ident,
                replica_host=self.config.replica_host,
                address=self.config.address,
                auth=self.config.auth,
                ticket_provider=self.ticket_provider,
            )
            self._client_key = key
        return self._client

    def close(self) -> None:
        """Close the connection to the replica (the next cycle opens a new one)."""
        if self._client is not None:
            self._client.close()
        self._client = None
        self._client_key = None

    def stop(self) -> None:
        """This object is done with (its runner stopped, or it was reconfigured): close the
        connection to the replica now, or when the cycle in flight ends."""
        self._stopped = True
        self._close_if_idle()

    def _close_if_idle(self) -> None:
        if self.lock.acquire(blocking=False):
            try:
                self.close()
            finally:
                self.lock.release()

    @contextlib.contextmanager
    def _connected(self) -> Iterator[None]:
        """Hold :attr:`lock` for one cycle or check. After :meth:`stop`, the connection is
        closed once the lock is free (checked after the release, so a stop that came while the
        lock was held is never missed)."""
        try:
            with self.lock:
                yield
        finally:
            if self._stopped:
                self._close_if_idle()

    def reported_state(self, sender: SenderState) -> State:
        """The state to report (see :meth:`Stats.reported`)."""
        return self.stats.reported(sender)

    def _sender(self) -> SenderState:
        found = self.state.source(self.relationship)
        return found[1] if found else SenderState()

    def _set_sender(self, change: Callable[[SenderState], SenderState]) -> None:
        self.state.update_sender(self.relationship, change)

    # -- one cycle --------------------------------------------------------------------------
    def run_cycle(self, *, app_consistent: bool = False, final: bool = False) -> CycleResult | None:
        """Run one cycle to completion (blocking). Returns None when there was nothing to do.

        A broken connection (reset, a corrupted TLS record, a short partition) is retried at once
        on a new one, up to :data:`TRANSIENT_BACKOFF` times: the same cut is sent again and the
        replica resumes after the last batch it holds, so a retry costs little and the cycle
        still lands whole or not at all."""
        with self._connected():
            if self.retired:
                return None
            retries = 0
            while True:
                try:
                    return self._attempt(app_consistent=app_consistent, final=final)
                except (Unavailable, CycleRefused) as exc:
                    transient = isinstance(exc, Unavailable) or exc.code == codes.BUSY
                    if not transient or retries == len(TRANSIENT_BACKOFF):
                        if transient:  # _attempt counts only the failures it does not retry
                            code = exc.code if isinstance(exc, CycleRefused) else codes.UNAVAILABLE
                            self._failed(code, str(exc))
                        raise
                    wait = TRANSIENT_BACKOFF[retries]
                    retries += 1
                    log.warning(
                        "cycle interrupted; retrying on a new connection",
                        extra={
                            "fields": {
                                "relationship": self.relationship,
                                "error": str(exc),
                                "retry_in": wait,
                            }
                        },
                    )
                    time.sleep(wait)

    def _attempt(self, *, app_consistent: bool, final: bool) -> CycleResult | None:
        """One try of a cycle on one connection; everything but a transport failure is final."""
        client = self.client()
        try:
            return self._run_cycle(client, app_consistent=app_consistent, final=final)
        except Unavailable:
            self.close()  # the retry, or the next cycle, starts on a new connection
            raise  # counted by run_cycle once it gives up
        except CycleRefused as exc:
            if exc.code == codes.BUSY:
                raise  # likewise
            self._failed(exc.code, str(exc))
            if exc.code == codes.STALE_EPOCH:
                raise StaleEpoch(str(exc)) from None
            raise
        except StaleEpoch as exc:
            self._failed(codes.STALE_EPOCH, str(exc))
            raise
        except QuiesceFailed:
            raise  # not a failed cycle: the loop runs it crash-consistent at once
        except SitepairError as exc:
            self._failed(codes.code_of(exc), str(exc))
            raise

    def _failed(self, code: codes.ErrorCode, message: str) -> None:
        """Count a failed cycle. A replica at a newer epoch fences this host; a resync that
        failed leaves the relationship needing one (its change tracking is still lost)."""
        st = self.stats
        st.cycles_failed += 1
        st.last_error = message
        st.last_error_code = code
        self.observer.cycle_failed(code)
        if code == codes.STALE_EPOCH:
            st.state = control_pb2.STATE_FENCED
        elif st.state == control_pb2.STATE_RESYNCHRONIZING and self._sender().needs_resync:
            st.state = control_pb2.STATE_RESYNC_REQUIRED
        log.warning(
            "cycle failed",
            extra={
                "fields": {
                    "relationship": self.relationship,
                    "code": codes.code_name(code),
                    "error": message,
                }
            },
        )

    def _run_cycle(
        self, client: ReplicaClient, *, app_consistent: bool, final: bool
    ) -> CycleResult | None:
        cfg = self.config
        self.resent_cut = False
        replica = client.get_state(self.relationship)
        if replica.epoch > cfg.epoch:
            raise StaleEpoch(
                f"the replica of {self.relationship} is at epoch {replica.epoch}, this host at "
                f"{cfg.epoch}: this VM was failed over and this host must not replicate it"
            )
        sender = self._sender()
        if (
            sender.exported
            and replica.committed_sequence == 0
            and not (self.resync_requested or final)
        ):
            # Offline initial replication: the first cut travels on a drive. Sending it over
            # the network here would defeat the point; wait until the replica imports it (a
            # resync sends it over the network after all, if the operator gives up the drive).
            self.stats.state = control_pb2.STATE_WAITING_FOR_IMPORT
            return None
        pending = sender.cycle
        outstanding = self.backend.outstanding_cut(cfg.vm_id)
        if pending and pending.sequence <= replica.committed_sequence:
            # Committed on the replica before we could record it: finish that bookkeeping.
            self._finish(pending, outstanding)
            sender = self._sender()
            pending = None
            outstanding = self.backend.outstanding_cut(cfg.vm_id)
        next_seq = replica.committed_sequence + 1
        if replica.committed_sequence == 0:
            kind = replication_pb2.INITIAL
        elif self.resync_requested or sender.needs_resync:
            kind = replication_pb2.RESYNC
        else:
            kind = replication_pb2.FINAL if final else replication_pb2.DELTA

        cut: Cut | None = None
        if (
            pending
            and outstanding is not None
            and pending.cut_id == outstanding.cut_id
            and pending.sequence == next_seq
            and not final
        ):
            cut = outstanding  # resend the same cycle: the replica resumes where it stopped
            self.resent_cut = True
            kind = replication_pb2.CycleKind.ValueType(pending.kind)
        if cut is None:
            cut = self.backend.take_cut(cfg.vm_id, app_consistent=app_consistent)
        untrusted = cut.untrusted_reason or (self.tracker == "scan" and not self._have_digests(cut))
        if kind in (replication_pb2.DELTA, replication_pb2.FINAL) and untrusted:
            reason = cut.untrusted_reason or "no digests from an earlier cycle to scan against"
            log.warning(
                "change tracking untrusted; resynchronizing",
                extra={"fields": {"relationship": self.relationship, "reason": reason}},
            )
            self._set_sender(
                lambda s: dataclasses.replace(s, needs_resync=True, resync_reason=reason)
            )
            kind = replication_pb2.RESYNC
        self.stats.state = {
            replication_pb2.INITIAL: control_pb2.STATE_INITIAL_REPLICATION,
            replication_pb2.RESYNC: control_pb2.STATE_RESYNCHRONIZING,
        }.get(kind, control_pb2.STATE_REPLICATING)

        plan, scan_digests = self._plan(client, cut, kind)
        header = replication_pb2.CycleHeader(
            relationship_id=self.relationship,
            vm_id=cfg.vm_id,
            sequence=next_seq,
            base_sequence=replica.committed_sequence,
            epoch=cfg.epoch,
            kind=kind,
            app_consistent=cut.app_consistent,
            cut_at=timestamp(cut.taken_at),
            source_host=self.identity().host_id,
        )
        record = PendingCycle(sequence=next_seq, cut_id=cut.cut_id, kind=kind)
        self._set_sender(lambda s: dataclasses.replace(s, cycle=record))
        log.info(
            "cycle starting",
            extra={
                "fields": {
                    "relationship": self.relationship,
                    "sequence": next_seq,
                    "kind": KIND_NAMES.get(kind, str(kind)),
                    "bytes": plan.total_bytes,
                }
            },
        )
        self.stats.progress_done, self.stats.progress_total = 0, plan.total_bytes

        def progress(done: int, total: int) -> None:
            self.stats.progress_done = plan.total_bytes * done // max(total, 1)

        buckets = [self.bucket] + ([self.host_bucket] if self.host_bucket else [])
        result = client.send_cycle(
            header,
            plan,
            compress=cfg.compression,
            adaptive=self.adaptive_compression,
            buckets=buckets,
            progress=progress,
        )
        if self.tracker == "scan":
            # The next scan compares against this cut: its digests come from the planning scan
            # or, for an initial cycle, from what was just sent (no second read of the disk).
            for fd, dp in zip(cut.disks, plan.disks, strict=True):
                digests = scan_digests.get(fd.disk_id) or full_digests(
                    result.block_digests.get(fd.disk_id, {}), dp.virtual_size
                )
                self.digest_store.save(fd.disk_id, digests)
        self._finish(record, cut)
        self.resync_requested = False
        self.last_result = result
        st = self.stats
        st.cycles_succeeded += 1
        st.last_success_at = self.clock.now()
        st.last_cut_at = cut.taken_at
        st.last_cycle_seconds = result.seconds
        st.max_cycle_seconds = max(st.max_cycle_seconds, result.seconds)
        st.total_cycle_seconds += result.seconds
        st.last_cycle_bytes = result.raw_bytes
        st.max_cycle_bytes = max(st.max_cycle_bytes, result.raw_bytes)
        st.total_cycle_bytes += result.raw_bytes
        st.wire_bytes += result.wire_bytes
        self.observer.cycle_committed(
            self.relationship, kind, result.seconds, result.raw_bytes, result.wire_bytes
        )
        st.committed_sequence = next_seq
        st.state = control_pb2.STATE_PROTECTED
        st.last_error = ""
        st.last_error_code = replication_pb2.ERROR_NONE
        log.info(
            "cycle committed",
            extra={
                "fields": {
                    "relationship": self.relationship,
                    "sequence": next_seq,
                    "raw_bytes": result.raw_bytes,
                    "wire_bytes": result.wire_bytes,
                    "seconds": round(result.seconds, 3),
                    "resumed_from": result.resumed_from,
                    "compressed_batches": result.compressed_batches,
                    "uncompressed_batches": result.uncompressed_batches,
                }
            },
        )
        return result

    def _have_digests(self, cut: Cut) -> bool:
        return all(self.digest_store.load(d.disk_id) is not None for d in cut.disks)

    def _finish(self, record: PendingCycle, cut: Cut | None) -> None:
        """The replica committed ``record``: release its cut and clear the bookkeeping."""
        if cut is not None and cut.cut_id == record.cut_id:
            self.backend.release_cut(self.config.vm_id, cut.cut_id)
            if record.kind in (replication_pb2.INITIAL, replication_pb2.RESYNC):
                self.backend.reset_tracking(self.config.vm_id, cut.cut_id)
        self._set_sender(
            lambda s: dataclasses.replace(s, cycle=None, needs_resync=False, resync_reason="")
        )

    def _plan(
        self, client: ReplicaClient, cut: Cut, kind: replication_pb2.CycleKind.ValueType
    ) -> tuple[CyclePlan, dict[str, list[bytes]]]:
        disks: list[DiskPlan] = []
        blocks: list[BlockRef] = []
        scan: dict[str, list[bytes]] = {}
        for fd in cut.disks:
            top = Path(fd.chain[-1])
            with vdisk.open_disk(top, read_only=True) as d:
                plan_disk = DiskPlan(
                    disk_id=fd.disk_id,
                    chain_top=top,
                    virtual_size=d.virtual_size,
                    format=fd.format,
                    logical_sector_size=d.logical_sector_size,
                    physical_sector_size=d.physical_sector_size,
                )
                allocated = list(d.allocated_ranges()) if kind == replication_pb2.INITIAL else []
            disks.append(plan_disk)
            if kind == replication_pb2.INITIAL:
                ranges = allocated
            elif kind == replication_pb2.RESYNC:
                ours = digests_of(top)
                scan[fd.disk_id] = ours
                theirs, _ = client.digests(self.relationship, fd.disk_id, epoch=self.config.epoch)
                ranges = differing_ranges(ours, theirs, virtual_size=plan_disk.virtual_size)
            elif self.tracker == "scan":
                ours = digests_of(top)
                scan[fd.disk_id] = ours
                previous = self.digest_store.load(fd.disk_id) or []
                ranges = differing_ranges(ours, previous, virtual_size=plan_disk.virtual_size)
            else:
                assert fd.changed is not None
                ranges = list(fd.changed)
            blocks.extend(blocks_for(fd.disk_id, ranges, plan_disk.virtual_size, block=BLOCK))
        batches = tuple(tuple(b) for b in group(blocks))
        return CyclePlan(kind=kind, disks=tuple(disks), batches=batches), scan

    # -- planned failover -------------------------------------------------------------------
    def final_cycle(self) -> FinalCycleReport:
        """The last cycle of a VM that was shut down, then proof the replica holds exactly the
        VM's final state: every block's digest compared on both sides. A difference raises, so
        a planned failover never goes on with data missing."""
        result = self.run_cycle(final=True)
        with self._connected():
            self._check_current()
            client = self.client()
            try:
                mismatches: dict[str, list[tuple[int, int]]] = {}
                folder_chains = self.backend_chains()
                for disk_id, top in folder_chains.items():
                    ours = digests_of(top)
                    theirs, _ = client.digests(self.relationship, disk_id, epoch=self.config.epoch)
                    with vdisk.open_disk(top, read_only=True) as d:
                        size = d.virtual_size
                    ranges = differing_ranges(ours, theirs, virtual_size=size)
                    if ranges:
                        mismatches[disk_id] = ranges
                state = client.get_state(self.relationship)
            except Unavailable:
                self.close()
                raise
        compared = sum(1 for _ in folder_chains)
        if mismatches:
            total = sum(n for r in mismatches.values() for _, n in r)
            raise FailedPrecondition(
                f"after the final cycle the replica of {self.relationship} differs from the "
                f"primary in {total} bytes; the failover must not go on",
                hint="run the planned failover again (a new final cycle is sent), or verify",
            )
        return FinalCycleReport(
            sequence=state.committed_sequence,
            final_bytes=result.raw_bytes if result else 0,
            disks_compared=compared,
        )

    def backend_chains(self) -> dict[str, Path]:
        """The top of each disk's current chain (the VM must be off: nothing writes it)."""
        chains = getattr(self.backend, "disk_chains", None)
        if chains is None:
            raise FailedPrecondition(f"the {self.backend.kind} backend cannot list disk chains")
        return {disk: chain[-1] for disk, chain in chains(self.config.vm_id).items()}

    # -- verify -----------------------------------------------------------------------------
    def verify(self, *, repair: bool = True) -> VerifyReport:
        """Compare source and replica digests at one point in time without moving disk data.

        A fresh cut is taken and sent as a delta cycle, so both sides hold exactly that cut;
        its layers stay frozen until the comparison is done. Mismatching blocks are reported
        and, with ``repair``, sent again in a resync cycle."""
        with self._connected():
            self._check_current()
            client = self.client()
            try:
                replica = client.get_state(self.relationship)
                if replica.committed_sequence == 0:
                    raise FailedPrecondition(
                        f"{self.relationship}: initial replication has not completed; "
                        "there is nothing to verify yet"
                    )
                if self._sender().cycle is not None:
                    raise FailedPrecondition(
                        f"{self.relationship}: a cycle is outstanding; verify after it commits"
                    )
                cut = self.backend.take_cut(self.config.vm_id)
                if cut.untrusted_reason:
                    raise FailedPrecondition(
                        f"{self.relationship}: change tracking is untrusted "
                        f"({cut.untrusted_reason}); run a resync, which compares every block"
                    )
                result = self._send_cut(client, cut, replication_pb2.DELTA)
                mismatches: dict[str, list[tuple[int, int]]] = {}
                for fd in cut.disks:
                    top = Path(fd.chain[-1])
                    ours = digests_of(top)
                    theirs, _ = client.digests(
                        self.relationship, fd.disk_id, epoch=self.config.epoch
                    )
                    ranges = differing_ranges(ours, theirs, virtual_size=fd.virtual_size)
                    if ranges:
                        mismatches[fd.disk_id] = ranges
                if mismatches:
                    log.warning(
                        "verify found blocks on the replica that differ from the source",
                        extra={
                            "fields": {
                                "relationship": self.relationship,
                                "ranges": {k: len(v) for k, v in mismatches.items()},
                                "repair": repair,
                            }
                        },
                    )
                    if repair:
                        result = self._send_cut(
                            client, cut, replication_pb2.RESYNC, ranges=mismatches
                        )
                self.backend.release_cut(self.config.vm_id, cut.cut_id)
                return VerifyReport(
                    disks=mismatches, repaired=bool(mismatches) and repair, sequence=result.sequence
                )
            except Unavailable:
                self.close()
                raise

    def _send_cut(
        self,
        client: ReplicaClient,
        cut: Cut,
        kind: replication_pb2.CycleKind.ValueType,
        *,
        ranges: dict[str, list[tuple[int, int]]] | None = None,
    ) -> CycleResult:
        replica = client.get_state(self.relationship)
        disks: list[DiskPlan] = []
        blocks: list[BlockRef] = []
        for fd in cut.disks:
            top = Path(fd.chain[-1])
            with vdisk.open_disk(top, read_only=True) as d:
                disks.append(
                    DiskPlan(
                        fd.disk_id,
                        top,
                        d.virtual_size,
                        fd.format,
                        d.logical_sector_size,
                        d.physical_sector_size,
                    )
                )
            if ranges is not None:
                rngs = ranges.get(fd.disk_id, [])
            elif fd.changed is None:
                raise SitepairError(
                    f"tracking of {self.relationship} is untrusted; run a resync first"
                )
            else:
                rngs = list(fd.changed)
            blocks.extend(blocks_for(fd.disk_id, rngs, disks[-1].virtual_size))
        plan = CyclePlan(
            kind=kind, disks=tuple(disks), batches=tuple(tuple(b) for b in group(blocks))
        )
        header = replication_pb2.CycleHeader(
            relationship_id=self.relationship,
            vm_id=self.config.vm_id,
            sequence=replica.committed_sequence + 1,
            base_sequence=replica.committed_sequence,
            epoch=self.config.epoch,
            kind=kind,
            cut_at=timestamp(cut.taken_at),
            source_host=self.identity().host_id,
        )
        buckets = [self.bucket] + ([self.host_bucket] if self.host_bucket else [])
        result = client.send_cycle(
            header,
            plan,
            compress=self.config.compression,
            adaptive=self.adaptive_compression,
            buckets=buckets,
        )
        self.stats.committed_sequence = header.sequence
        self.stats.total_cycle_bytes += result.raw_bytes
        self.stats.wire_bytes += result.wire_bytes
        return result
