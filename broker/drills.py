"""Disaster-recovery drills of recovery plans: prove, on a schedule, that a plan recovers.

A drill (``plans drill PLAN``, or every ``--every`` on the leader broker) is one job:

1. it checks the plan can be drilled (every VM protected and replicating, its recovery host
   connected, no test failover in place, no other job of the plan running) and refuses before
   the job starts otherwise; a scheduled drill that cannot run is recorded as *skipped* with
   that reason;
2. it runs a test failover of the whole plan, group by group with the plan's script actions
   (:meth:`broker.plans.PlanManager.failover_steps`; manual actions are left out: a drill
   waits for nobody), asking each recovery host to prove its test VM's disks byte for byte the
   recovery point before starting it (``Failover.prove_exact``);
3. it collects per VM the recovery point used (so the RPO at the drill), the exact proof, and
   how long until the test VM ran (the RTO), then runs the plan's checks: host scripts (a file
   in the recovery agent's scripts folder, ``RunScript``) and programs inside a test VM
   (``GuestRun``);
4. it always cleans the test failover up, also when a step failed; what could not be cleaned
   up is named in the drill so the operator can run ``plans cleanup-test``.

The drill passes when every step did; otherwise it fails with the first reason. Its evidence is
kept in the job and in the drills history (``plans drills``, ``plans drill-show``), a failed
drill turns the plan's VMs Warning (``drill-failed``, :func:`broker.health.drill_reasons`)
until a drill passes, and the metrics show each plan's last drill (:mod:`broker.metrics`).
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
from collections.abc import Awaitable, Callable
from typing import Any

from google.protobuf import json_format

from broker.drill_checks import (
    CHECK_KINDS,
    MAX_ARG,
    MAX_ARGS,
    MAX_ARGS_TOTAL,
    MAX_CHECK_TIMEOUT,
    MAX_CHECKS,
    MAX_NAME,
    OUTPUT_TAIL,
    accept_proof,
    changed_at_rest,
    check_program,
    check_text,
    checks_of,
    output_tail,
    plan_vms,
)
from broker.failover import FailoverManager
from broker.failover_jobs import failover_record
from broker.jobs import new_id
from broker.orchestration import Orchestration, Orchestrator, Step, StepFailed, StepRun
from broker.plans import PlanManager
from broker.reports import ReplicationReports
from broker.store.models import (
    Drill,
    DrillSchedule,
    DrillState,
    Job,
    JobState,
    RecoveryPlan,
    Relationship,
    RelationshipState,
    StepState,
)
from broker.store.sqlite import Tx
from sitepair.errors import FailedPrecondition, InvalidArgument, NotFound, SitepairError
from sitepair.protoconv import timestamp
from sitepair.v1 import admin_pb2, control_pb2

log = logging.getLogger("sitepair.broker.drills")

#: The kind of a drill's job.
DRILL_KIND = "plan-drill"
#: The operator name scheduled drills carry.
SCHEDULER = "scheduler"
#: The shortest schedule: a drill boots every VM of the plan.
MIN_EVERY = 3600.0
#: A drill recorded as running without a job for this long was left by a stopped broker.
ORPHAN_AFTER = 600.0
#: Job steps' names (the failover steps are the plan's own).
EVIDENCE_STEP = "Collect the recovery points and exact proofs"
CLEANUP_STEP = "Clean up the test failover"
#: Step states a drill does not run again after a broker restart.
_OVER = (StepState.SUCCEEDED, StepState.FAILED, StepState.SKIPPED)
#: How the agent says a guest's agent did not answer (agent/hosts/qemu_guest_agent.py), and
#: how long a guest check waits before asking again while the test VM boots.
GUEST_NOT_UP, GUEST_RETRY = "no guest agent answered", 2.0
#: A script's failure as an agent without ``RunScript.report_exit`` words it
#: (agent/commands.py run_script): such agents fail the command instead of answering the status.
_SCRIPT_EXIT = re.compile(r"exited with status (-?\d+); output: (.*)", re.DOTALL)


# -- the manager ------------------------------------------------------------------------------
class DrillManager(Orchestrator):
    def __init__(
        self,
        orchestration: Orchestration,
        *,
        plans: PlanManager,
        failover: FailoverManager,
        reports: ReplicationReports,
    ) -> None:
        super().__init__(orchestration)
        self._plans = plans
        self._failover = failover
        self._reports = reports
        self.declare(DRILL_KIND, self._steps)

    # -- checks -------------------------------------------------------------------------------
    async def add_check(
        self,
        plan: str,
        *,
        kind: str,
        program: str,
        vm: str = "",
        args: list[str] | None = None,
        timeout_seconds: int = 60,
        name: str = "",
    ) -> RecoveryPlan:
        """Add a check to a plan, every argument checked before it is stored."""
        if kind not in CHECK_KINDS:
            raise InvalidArgument(f"a check is a 'script' or a 'guest' program, not {kind!r}")
        check_program(kind, program)
        if kind == "guest" and not vm:
            raise InvalidArgument(
                "a guest check runs inside one test VM: name it with --vm",
                hint="see `plans show PLAN` for the plan's VMs",
            )
        args = list(args or [])
        if (
            len(args) > MAX_ARGS
            or sum(len(a) for a in args) > MAX_ARGS_TOTAL
            or any(len(a) > MAX_ARG or "\x00" in a for a in args)
        ):
            raise InvalidArgument(
                f"a check takes at most {MAX_ARGS} arguments of at most {MAX_ARG} characters "
                f"({MAX_ARGS_TOTAL} in all), without NUL"
            )
        if not 1 <= timeout_seconds <= MAX_CHECK_TIMEOUT:
            raise InvalidArgument(f"a check's timeout is 1 s to {MAX_CHECK_TIMEOUT} s")
        label = name or f"{kind} {program}" + (f" on {vm}" if vm else "")
        check_text(label, "a check's name", MAX_NAME)

        def change(tx: Tx, doc: dict[str, Any]) -> None:
            rid = ""
            if vm:
                rel = tx.find_relationship(vm)
                if rel.id not in plan_vms(doc):
                    raise InvalidArgument(
                        f"VM {rel.vm_name} is not in this plan",
                        hint="add it with `plans add-vm`, or name one of the plan's VMs",
                    )
                rid = rel.id
            checks = checks_of(doc)
            if len(checks) >= MAX_CHECKS:
                raise FailedPrecondition(f"a plan has at most {MAX_CHECKS} checks")
            if any(c["name"] == label for c in checks):
                raise InvalidArgument(
                    f"the plan has a check named {label!r} already",
                    hint="give this one another name with --check-name",
                )
            checks.append(
                {
                    "name": label,
                    "kind": kind,
                    "relationship": rid,
                    "program": program,
                    "args": args,
                    "timeout": timeout_seconds,
                }
            )

        return await self._plans.edit(plan, change)

    async def remove_check(self, plan: str, name: str) -> RecoveryPlan:
        def change(tx: Tx, doc: dict[str, Any]) -> None:
            checks = checks_of(doc)
            kept = [c for c in checks if c["name"] != name]
            if len(kept) == len(checks):
                known = ", ".join(repr(c["name"]) for c in checks) or "none"
                raise NotFound(f"the plan has no check named {name!r}; it has: {known}")
            doc["checks"] = kept

        return await self._plans.edit(plan, change)

    # -- starting -------------------------------------------------------------------------------
    async def drillable(self, name: str) -> tuple[dict[str, Any], list[Relationship]]:
        """The plan's document and VMs, if it can be drilled now; FailedPrecondition naming
        the first thing in the way otherwise."""
        plan = await self._plans.get(name)
        doc: dict[str, Any] = json.loads(plan.doc_json)
        rids = plan_vms(doc)
        if not rids:
            raise FailedPrecondition(
                f"recovery plan {name} has no VMs", hint="add some with `plans add-vm`"
            )
        rels = []
        for rid in rids:
            rel = await self._relationship_or_none(rid)
            if rel is None or rel.disabled_at is not None:
                raise FailedPrecondition(
                    f"relationship {rid} in the plan is not protected any more"
                )
            if rel.state != RelationshipState.PROTECTED or rel.paused:
                what = "paused" if rel.paused else rel.state.value
                raise FailedPrecondition(
                    f"{rel.vm_name} is {what}; a drill needs every VM of the plan protected "
                    "and replicating"
                )
            if failover_record(rel).test is not None:
                raise FailedPrecondition(
                    f"a test failover of {rel.vm_name} is in place",
                    hint=f"clean it up first: plans cleanup-test {name} (or vms cleanup-test)",
                )
            if self.sessions.get(rel.replica_server) is None:
                names = await self._failover.host_names()
                raise FailedPrecondition(
                    f"the recovery host {names.get(rel.replica_server, rel.replica_server)} of "
                    f"{rel.vm_name} is not connected"
                )
            rels.append(rel)
        for state in (JobState.QUEUED, JobState.RUNNING, JobState.WAITING):
            for job in await self.jobs.list(state=state.value, limit=1000):
                if job.target == f"plan/{name}":
                    raise FailedPrecondition(
                        f"job {job.id} ({job.kind}) of recovery plan {name} is {job.state.value}",
                        hint=f"wait for it: jobs show {job.id}",
                    )
        return doc, rels

    async def _relationship_or_none(self, rel_id: str) -> Relationship | None:
        def read(tx: Tx) -> Relationship | None:
            return tx.get_relationship(rel_id)

        return await self.read(read)

    async def start(self, name: str, *, by: str) -> Job:
        """Drill a plan now (refused before the job starts if it cannot be drilled)."""
        doc, rels = await self.drillable(name)
        await self._settle_orphan(name)
        now = self.clock.now()
        drill = Drill(
            id=new_id("drill"),
            plan=name,
            job_id="",
            state=DrillState.RUNNING,
            reason="",
            started_by=by,
            started_at=now,
            finished_at=None,
        )
        await self.write(lambda tx: tx.insert_drill(drill))
        manual = [
            a["name"]
            for g in doc["groups"]
            for w in ("before", "after")
            for a in g[w]
            if a["kind"] == "manual"
        ]
        drilled = {
            "groups": [
                {
                    "vms": g["vms"],
                    "before": [a for a in g["before"] if a["kind"] != "manual"],
                    "after": [a for a in g["after"] if a["kind"] != "manual"],
                }
                for g in doc["groups"]
            ]
        }
        try:
            job = await self.create_job(
                DRILL_KIND,
                f"plan/{name}",
                {
                    "plan": name,
                    "drill": drill.id,
                    "doc": drilled,
                    "checks": checks_of(doc),
                    "relationships": [r.id for r in rels],
                    "vms": {r.id: r.vm_name for r in rels},
                    "manual_left_out": manual,
                },
                by=by,
            )
        except Exception:
            await self._finish_record(
                drill.id, DrillState.FAILED, "the drill's job could not be created", {}
            )
            raise
        await self.write(lambda tx: tx.update_drill(drill.id, job_id=job.id))
        log.info(
            "drill started",
            extra={"fields": {"plan": name, "drill": drill.id, "job": job.id, "by": by}},
        )
        self.spawn(self.run(job))
        return job

    async def _settle_orphan(self, plan: str) -> None:
        """A drill recorded as running whose job is over (failed by a restart before it could
        record itself) or was never made (a broker stopped in between) is failed, so it does
        not block the plan's next drill forever."""
        drill = await self.read(lambda tx: tx.running_drill(plan))
        if drill is None:
            return
        if drill.job_id:
            try:
                over = (await self.jobs.get(drill.job_id)).state.final
            except NotFound:
                over = True
        else:
            over = self.clock.now() - drill.started_at > ORPHAN_AFTER
        if over:
            await self._finish_record(
                drill.id,
                DrillState.FAILED,
                "the drill's job ended before the drill was recorded",
                {},
            )

    async def record_skipped(self, name: str, reason: str, *, by: str) -> Drill:
        """A scheduled drill that could not run: kept in the history with its reason."""
        now = self.clock.now()
        drill = Drill(
            id=new_id("drill"),
            plan=name,
            job_id="",
            state=DrillState.SKIPPED,
            reason=reason,
            started_by=by,
            started_at=now,
            finished_at=now,
        )
        await self.write(lambda tx: tx.insert_drill(drill))
        log.warning(
            "scheduled drill skipped",
            extra={"fields": {"plan": name, "drill": drill.id, "reason": reason}},
        )
        return drill

    async def set_schedule(
        self, name: str, every: float, *, by: str, known: bool = True
    ) -> DrillSchedule | None:
        """Drill ``name`` every ``every`` seconds from now on (0 = no more scheduled drills);
        the first scheduled drill runs one interval from now. ``known``: the plan must exist
        (a deleted plan's schedule is removed with ``known=False``)."""
        if known:
            await self._plans.get(name)
        if every == 0:
            await self.write(lambda tx: tx.delete_drill_schedule(name))
            return None
        if every < MIN_EVERY:
            raise InvalidArgument(
                f"drills are scheduled at most hourly (every {int(MIN_EVERY)} s or more)",
                hint="run `plans drill PLAN` for a drill now",
            )
        now = self.clock.now()
        schedule = DrillSchedule(name, every, now + every, by, now)
        await self.write(lambda tx: tx.set_drill_schedule(schedule))
        return schedule

    async def get(self, drill_id: str) -> Drill:
        drill = await self.read(lambda tx: tx.get_drill(drill_id))
        if drill is None:
            raise NotFound(f"no drill {drill_id!r}", hint="see `plans drills`")
        return drill

    # -- the job ------------------------------------------------------------------------------
    def _steps(self, target: str, params: dict[str, Any]) -> list[Step]:
        steps = self._plans.failover_steps(params["doc"], "test", "latest", prove_exact=True)
        steps.append(Step(EVIDENCE_STEP, self._evidence_step))
        for check in params["checks"]:
            steps.append(Step(f"Check: {check['name']}", self._check_step(check)))
        steps.append(Step(CLEANUP_STEP, self._cleanup_step))
        return steps

    async def run(self, job: Job) -> bool:
        """Run the drill's unfinished steps. A failing test failover skips the rest of the
        failover; a failing failover or exact proof skips the checks (nothing to check); a
        failing check does not stop the others; the evidence and the cleanup always run. Then
        the drill's outcome is recorded."""
        params = json.loads(job.params_json)
        steps = self.steps_of(job.kind, job.target, params)
        job, _ = await self.unfinished(job, steps)
        if params["manual_left_out"]:  # shown with the evidence: a drill waits for nobody
            await self.remember(job, "manual_left_out", params["manual_left_out"])
        over = {s.name for s in job.steps if s.state in _OVER}
        failover = {s.name for s in steps[: self._failover_count(params)]}
        # A failure up to the evidence means test VMs not up or not proven: no checks.
        before_checks = {*failover, EVIDENCE_STEP}
        for i, step in enumerate(steps):
            if step.name in over:
                continue  # a broker before a restart ran it
            result = await self.job_result(job)
            if result.get("vms_not_ready") and (
                step.name in failover or step.name.startswith("Check: ")
            ):
                await self.jobs.step(
                    job.id,
                    step.name,
                    StepState.SKIPPED,
                    message="not run: the test VMs are not all up and proven exact",
                )
                continue
            await self.jobs.step(job.id, step.name, StepState.RUNNING)
            try:
                message = await step.run(StepRun(self, job, step.name, i))
            except SitepairError as exc:
                await self._step_failed(
                    job, step.name, exc.message, ready=step.name not in before_checks
                )
                continue
            except Exception as exc:
                log.exception(
                    "drill step crashed", extra={"fields": {"job": job.id, "step": step.name}}
                )
                await self._step_failed(
                    job, step.name, f"internal error: {exc}", ready=step.name not in before_checks
                )
                continue
            await self.jobs.step(job.id, step.name, StepState.SUCCEEDED, message=message)
        return await self._finish(job, params)

    @staticmethod
    def _failover_count(params: dict[str, Any]) -> int:
        """How many of the drill's steps are the plan's test failover (its first ones)."""
        return sum(
            len(g["before"]) + len(g["after"]) + (1 if g["vms"] else 0)
            for g in params["doc"]["groups"]
        )

    async def _step_failed(self, job: Job, name: str, message: str, *, ready: bool) -> None:
        """A step failed: the drill fails with the first reason; ``ready``: the test VMs were
        up and proven before it (otherwise the checks are not run)."""
        await self.jobs.step(job.id, name, StepState.FAILED, message=message)
        result = await self.job_result(job)
        if not result.get("reason"):
            await self.remember(job, "reason", f"{name}: {message}")
        if not ready:
            await self.remember(job, "vms_not_ready", True)

    async def _children(self, job: Job) -> list[Job]:
        """The drill's test-failover jobs (the plan's group steps keep them as "group-N")."""
        result = await self.job_result(job)
        groups = sorted(int(k.removeprefix("group-")) for k in result if k.startswith("group-"))
        ids = [c for g in groups for c in result[f"group-{g}"]]
        return [await self.jobs.get(c) for c in ids]

    async def _evidence_step(self, step: StepRun) -> str:
        """Per VM: the recovery point its test VM was made of (sequence, cut time, so the RPO
        at the drill), the recovery host's exact proof, and how long until the test VM ran."""
        params = json.loads(step.job.params_json)
        vms: list[dict[str, Any]] = []
        problems: list[str] = []
        ran_at: list[float] = []
        started_at: list[float] = []
        names = await self._failover.host_names()
        for child in await self._children(step.job):
            rid = json.loads(child.params_json)["relationship"]
            rel = await self.relationship(rid)
            evidence = admin_pb2.DrillVm(
                vm=rel.vm_name, relationship_id=rid, recovery_host=names.get(rel.replica_server, "")
            )
            test = failover_record(rel).test
            made = test.result if test is not None and test.job == child.id else None
            started_at.append(child.created_at)
            if child.state != JobState.SUCCEEDED or made is None:
                evidence.error = child.error or "no test VM was made"
                problems.append(f"{rel.vm_name}: {evidence.error}")
            else:
                evidence.test_vm = made.vm_name
                evidence.point = made.point
                evidence.cut_at.CopyFrom(timestamp(made.cut_at))
                evidence.rpo_seconds = max(0.0, child.created_at - made.cut_at)
                if child.finished_at is not None:
                    evidence.running_after_seconds = child.finished_at - child.created_at
                    ran_at.append(child.finished_at)
                problem = self._proof_problem(rel, child, evidence)
                if problem:
                    problems.append(problem)
            vms.append(json_format.MessageToDict(evidence, preserving_proto_field_name=True))
        await self.remember(step.job, "vms", vms)
        if len(ran_at) == len(params["relationships"]) and started_at:
            await self.remember(step.job, "rto_seconds", max(ran_at) - min(started_at))
        if problems:
            raise StepFailed("; ".join(problems))
        proven = sum(1 for v in vms if v.get("exact", {}).get("checked"))
        return f"{len(vms)} test VM(s) running, {proven} proven byte for byte their point"

    @staticmethod
    def _proof_problem(rel: Relationship, child: Job, evidence: admin_pb2.DrillVm) -> str:
        """What is wrong with a VM's exact proof ("" = it proves the test VM exact)."""
        result = json.loads(child.result_json) if child.result_json else {}
        proof = control_pb2.ExactProof()
        try:
            json_format.ParseDict(result.get("exact", {}), proof, ignore_unknown_fields=True)
            accept_proof(proof)
        except (json_format.ParseError, StepFailed) as exc:
            return f"{rel.vm_name}: the recovery host's exact proof is unusable: {exc}"
        evidence.exact.CopyFrom(proof)
        if not proof.checked:
            return (
                f"{rel.vm_name}: the recovery host did not prove the test VM exact (its agent "
                "may be older than drills: upgrade it)"
            )
        if proof.mismatched_blocks:
            return (
                f"{rel.vm_name}: {proof.mismatched_blocks} of {proof.blocks_compared} blocks of "
                f"the test VM differ from recovery point {evidence.point}"
            )
        changed = changed_at_rest(proof)
        if changed:
            evidence.changed_at_rest = True
            return (
                f"{rel.vm_name}: recovery point {evidence.point} changed at rest since it was "
                f"first proven (disks {', '.join(changed)}): check the recovery host's storage"
            )
        return ""

    def _check_step(self, check: dict[str, Any]) -> Callable[[StepRun], Awaitable[str]]:
        async def run(step: StepRun) -> str:
            params = json.loads(step.job.params_json)
            outcome: dict[str, Any] = {
                "name": check["name"],
                "kind": check["kind"],
                "vm": params["vms"].get(check["relationship"], ""),
            }
            began = self.clock.monotonic()
            try:
                outcome.update(await self._run_check(step, check, params))
            except StepFailed as exc:
                m = _SCRIPT_EXIT.search(exc.message)
                if m:  # a script that ran and failed: its exit status and output
                    outcome.update(exit_status=int(m.group(1)), output_tail=output_tail(m.group(2)))
                else:
                    outcome.update(
                        error=exc.message[:OUTPUT_TAIL], timed_out="timed out" in exc.message
                    )
            outcome["seconds"] = round(self.clock.monotonic() - began, 3)
            outcome["passed"] = (
                not outcome.get("error")
                and not outcome.get("timed_out")
                and outcome.get("exit_status", 0) == 0
            )
            result = await self.job_result(step.job)
            await self.remember(step.job, "checks", [*result.get("checks", []), outcome])
            lines = str(outcome.get("output_tail", "")).strip().splitlines()
            said = f": {lines[-1][:200]}" if lines else ""
            if outcome.get("error"):
                raise StepFailed(outcome["error"])
            if not outcome["passed"]:
                why = (
                    "timed out"
                    if outcome.get("timed_out")
                    else f"exit status {outcome['exit_status']}"
                )
                raise StepFailed(f"{why}{said}")
            return f"exit status 0{said}"

        return run

    async def _run_check(
        self, step: StepRun, check: dict[str, Any], params: dict[str, Any]
    ) -> dict[str, Any]:
        rels = [await self.relationship(r) for r in params["relationships"]]
        rid = check["relationship"] or rels[0].id
        rel = next((r for r in rels if r.id == rid), None)
        if rel is None:
            raise StepFailed("the check's VM is not in the plan any more")
        test = failover_record(rel).test
        test_vm = test.result.vm_name if test is not None and test.result is not None else ""
        if check["kind"] == "guest":
            ran = await self._guest_run(step, rel, check)
            return {
                "exit_status": ran.exit_status,
                "timed_out": ran.timed_out,
                "output_tail": output_tail(ran.output),
            }
        tests = {}
        for r in rels:
            t = failover_record(r).test
            tests[r.vm_name] = t.result.vm_name if t is not None and t.result is not None else ""
        env = {
            "SITEPAIR_PLAN": params["plan"],
            "SITEPAIR_DRILL": params["drill"],
            "SITEPAIR_FAILOVER_TYPE": "test",
            "SITEPAIR_VMS": ",".join(tests),
            "SITEPAIR_TEST_VMS": ",".join(tests.values()),
        }
        if check["relationship"]:
            env.update(SITEPAIR_VM=rel.vm_name, SITEPAIR_TEST_VM=test_vm)
        sent = await step.send(
            rel.replica_server,
            control_pb2.Command(
                run_script=control_pb2.RunScript(
                    script=check["program"],
                    args=check.get("args", []),
                    timeout_seconds=int(check["timeout"]),
                    env=env,
                    report_exit=True,
                )
            ),
        )
        return {
            "exit_status": sent.run_script.exit_status,
            "timed_out": sent.run_script.timed_out,
            "output_tail": output_tail(sent.run_script.output),
        }

    async def _guest_run(
        self, step: StepRun, rel: Relationship, check: dict[str, Any]
    ) -> control_pb2.GuestRunResult:
        """Run a guest check; a test VM that has just started is still booting, so while its
        guest agent does not answer yet the check is sent again, within the check's timeout."""
        deadline = self.clock.monotonic() + int(check["timeout"])
        command = control_pb2.Command(
            guest_run=control_pb2.GuestRun(
                relationship_id=rel.id,
                program=check["program"],
                args=check.get("args", []),
                timeout_seconds=int(check["timeout"]),
            )
        )
        while True:
            try:
                sent = await step.send(rel.replica_server, command)
            except StepFailed as exc:
                if GUEST_NOT_UP not in exc.message or self.clock.monotonic() >= deadline:
                    raise
                await step.progress("waiting for the test VM's guest agent (the guest boots)")
                await asyncio.sleep(GUEST_RETRY)
                continue
            return sent.guest_run

    async def _cleanup_step(self, step: StepRun) -> str:
        """Remove every test VM this drill made (also after a failure); what cannot be removed
        is named, for ``plans cleanup-test``."""
        job = step.job
        params = json.loads(job.params_json)
        ours = {c.id for c in await self._children(job)}
        result = await self.job_result(job)
        cleanups: dict[str, str] = result.get("cleanups", {})
        left: list[str] = []
        removed: list[str] = []
        for rid in params["relationships"]:
            rel = await self.relationship(rid)
            test = failover_record(rel).test
            if rid not in cleanups:
                if test is None or test.job not in ours:
                    continue  # nothing of this drill's in place (never made, or undone)
                try:
                    child = await self._failover.cleanup_test(
                        rid, by=f"drill/{params['drill']}", notes=f"drill {params['drill']}"
                    )
                except SitepairError as exc:
                    left.append(f"{rel.vm_name} ({exc.message})")
                    continue
                cleanups[rid] = child.id
                await self.remember(job, "cleanups", cleanups)
            done = await self._wait(cleanups[rid])
            if done.state == JobState.SUCCEEDED:
                removed.append(rel.vm_name)
            else:
                left.append(f"{rel.vm_name} ({done.error})")
        if left:
            error = (
                f"the test failover of {', '.join(left)} is not cleaned up: run "
                f"`plans cleanup-test {params['plan']}`"
            )
            await self.remember(job, "cleanup_error", error)
            raise StepFailed(error)
        await self.remember(job, "cleaned_up", True)
        return f"removed the test VMs of {', '.join(removed)}" if removed else "nothing to remove"

    async def _wait(self, job_id: str) -> Job:
        final = await self.jobs.get(job_id)
        async for seen in self.jobs.watch(job_id, poll=1.0):
            final = seen
        return final

    async def _finish(self, job: Job, params: dict[str, Any]) -> bool:
        result = await self.job_result(job)
        reason = str(result.get("reason", ""))
        passed = not reason
        evidence = {
            "vms": result.get("vms", []),
            "checks": result.get("checks", []),
            "rto_seconds": result.get("rto_seconds", 0.0),
            "cleaned_up": bool(result.get("cleaned_up")),
            "cleanup_error": result.get("cleanup_error", ""),
        }
        state = DrillState.PASSED if passed else DrillState.FAILED
        await self._finish_record(params["drill"], state, reason, evidence)
        try:  # before the job ends: whoever waits for it sees the health the drill left
            await self._reports.evaluate_health()
        except SitepairError:
            log.exception("health evaluation after a drill failed")
        if passed:
            await self.jobs.succeed(job.id, result)
        else:
            await self.jobs.set_state(
                job.id, JobState.FAILED, error=f"drill failed: {reason}", result=result
            )
        log.log(
            logging.INFO if passed else logging.WARNING,
            "drill finished",
            extra={
                "fields": {
                    "plan": params["plan"],
                    "drill": params["drill"],
                    "state": state.value,
                    "reason": reason,
                }
            },
        )
        return passed

    async def _finish_record(
        self, drill_id: str, state: DrillState, reason: str, evidence: dict[str, Any]
    ) -> None:
        now = self.clock.now()
        await self.write(
            lambda tx: tx.update_drill(
                drill_id,
                state=state,
                reason=reason,
                finished_at=now,
                evidence_json=json.dumps(evidence, sort_keys=True),
            )
        )


def drill_proto(drill: Drill) -> admin_pb2.Drill:
    """A stored drill as the admin API shows it (its evidence typed)."""
    msg = admin_pb2.Drill()
    try:
        doc = json.loads(drill.evidence_json or "{}")
        json_format.ParseDict(doc if isinstance(doc, dict) else {}, msg, ignore_unknown_fields=True)
    except (ValueError, json_format.ParseError):
        log.warning(
            "a drill's stored evidence is unreadable", extra={"fields": {"drill": drill.id}}
        )
        msg.Clear()
    msg.id, msg.plan, msg.job_id = drill.id, drill.plan, drill.job_id
    msg.state, msg.reason, msg.started_by = drill.state.value, drill.reason, drill.started_by
    msg.started_at.CopyFrom(timestamp(drill.started_at))
    if drill.finished_at is not None:
        msg.finished_at.CopyFrom(timestamp(drill.finished_at))
    return msg
