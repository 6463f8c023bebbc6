"""Recovery plans: ordered groups of protected VMs, with actions before and after each group.

A plan fails over group after group, strictly in order; the VMs of a group fail over together
(one failover job each, run side by side). Before and after each group, actions run in order:

* **script**: a script the operator placed in the scripts folder of the recovery-site agent
  (the recovery host of the group's first VM) runs with a timeout; its exit status and output
  are kept in the job. It learns the plan, group, failover type and VMs from environment
  variables (``SITEPAIR_PLAN``, ``SITEPAIR_GROUP``, ``SITEPAIR_FAILOVER_TYPE``, ``SITEPAIR_VMS``).
* **manual**: the plan waits, showing the instructions, until an operator runs
  ``plans resume PLAN``.

A failing script or VM stops a planned or test plan where it failed (the job says which step);
an unplanned plan, run when the primary site is lost, goes on and reports every failure. A plan
job interrupted by a broker restart carries on from its first unfinished step and re-attaches to
the VM failover jobs it had started.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from broker.failback import FailbackManager
from broker.failover import FailoverManager, check_point_form
from broker.orchestration import (
    Orchestration,
    Orchestrator,
    Step,
    StepFailed,
    StepRun,
    unique_names,
)
from broker.store.models import Job, JobState, RecoveryPlan, Relationship, StepState
from broker.store.sqlite import Tx
from sitepair import pki
from sitepair.errors import FailedPrecondition, InvalidArgument, NotFound
from sitepair.v1 import control_pb2

log = logging.getLogger("sitepair.broker.plans")

FAILOVER_TYPES = ("planned", "unplanned", "test")
#: How long ``plans resume`` waits to show the plan past its manual step (seconds).
RESUME_SHOWN_WITHIN = 5.0
StepBody = Callable[[StepRun], Awaitable[str]]
#: What the step of a per-VM plan job does to its VM ("commit the failover of web01").
_VERBS = {
    "plan-cleanup-test": "clean up the test failover of",
    "plan-commit": "commit the failover of",
}


def _doc(plan: RecoveryPlan) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(plan.doc_json)
    doc.setdefault("groups", [])
    return doc


class PlanManager(Orchestrator):
    def __init__(
        self,
        orchestration: Orchestration,
        *,
        failover: FailoverManager,
        failback: FailbackManager,
    ) -> None:
        super().__init__(orchestration)
        self._failover = failover
        self._failback = failback
        self._resume = asyncio.Condition()
        self.declare("plan-failover", self._failover_steps)
        self.declare("plan-cleanup-test", self._cleanup_steps)
        self.declare("plan-commit", self._commit_steps)

    # -- editing ----------------------------------------------------------------------------
    async def get(self, name: str) -> RecoveryPlan:
        plan = await self.read(lambda tx: tx.get_plan(name))
        if plan is None:
            raise NotFound(f"no recovery plan {name!r}", hint="see `plans list`")
        return plan

    async def create(self, name: str, description: str = "") -> RecoveryPlan:
        pki.check_identifier(name, "plan name")
        now = self.clock.now()
        plan = RecoveryPlan(
            name,
            description,
            json.dumps({"groups": [{"vms": [], "before": [], "after": []}]}),
            now,
            now,
        )
        await self.write(lambda tx: tx.insert_plan(plan))
        return plan

    async def delete(self, name: str) -> None:
        if not await self.write(lambda tx: tx.delete_plan(name)):
            raise NotFound(f"no recovery plan {name!r}")

    async def edit(self, name: str, change: Callable[[Tx, dict[str, Any]], None]) -> RecoveryPlan:
        def run(tx: Tx) -> RecoveryPlan:
            plan = tx.get_plan(name)
            if plan is None:
                raise NotFound(f"no recovery plan {name!r}")
            doc = _doc(plan)
            change(tx, doc)
            tx.update_plan(name, json.dumps(doc, sort_keys=True), self.clock.now())
            updated = tx.get_plan(name)
            assert updated is not None
            return updated

        return await self.write(run)

    async def add_group(self, name: str) -> RecoveryPlan:
        def change(tx: Tx, doc: dict[str, Any]) -> None:
            doc["groups"].append({"vms": [], "before": [], "after": []})

        return await self.edit(name, change)

    async def add_vm(self, name: str, group: int, vm: str) -> RecoveryPlan:
        def change(tx: Tx, doc: dict[str, Any]) -> None:
            g = _group(doc, group)
            rel = tx.find_relationship(vm)
            for other in doc["groups"]:
                if rel.id in other["vms"]:
                    raise FailedPrecondition(f"VM {rel.vm_name} is already in this plan")
            g["vms"].append(rel.id)

        return await self.edit(name, change)

    async def add_action(
        self,
        name: str,
        group: int,
        *,
        when: str,
        action_name: str,
        script: str = "",
        args: list[str] | None = None,
        timeout_seconds: int = 300,
        manual: str = "",
    ) -> RecoveryPlan:
        if when not in ("before", "after"):
            raise InvalidArgument("an action runs 'before' or 'after' its group")
        if bool(script) == bool(manual):
            raise InvalidArgument("an action is either a script or a manual step (instructions)")
        if timeout_seconds <= 0 or timeout_seconds > 24 * 3600:
            raise InvalidArgument("a script timeout is 1 s to 24 h")
        action: dict[str, Any] = {"name": action_name or (script or "manual step")}
        if script:
            action.update(
                kind="script", script=script, args=list(args or []), timeout=timeout_seconds
            )
        else:
            action.update(kind="manual", instructions=manual)

        def change(tx: Tx, doc: dict[str, Any]) -> None:
            _group(doc, group)[when].append(action)

        return await self.edit(name, change)

    # -- running ----------------------------------------------------------------------------
    async def _relationships(self, doc: dict[str, Any]) -> dict[str, Relationship]:
        ids = [rid for g in doc["groups"] for rid in g["vms"]]
        rels = {}
        for rid in ids:

            def get(tx: Tx, rid: str = rid) -> Relationship | None:
                return tx.get_relationship(rid)

            rel = await self.read(get)
            if rel is None or rel.disabled_at is not None:
                raise FailedPrecondition(
                    f"relationship {rid} in the plan is not protected any more"
                )
            rels[rid] = rel
        return rels

    async def run_failover(
        self, name: str, failover_type: str, *, by: str, point: str = "latest"
    ) -> Job:
        if failover_type not in FAILOVER_TYPES:
            raise InvalidArgument(f"--type must be one of {', '.join(FAILOVER_TYPES)}")
        if failover_type != "planned":
            check_point_form(point)  # before the job: a bad --point never starts a plan
        plan = await self.get(name)
        doc = _doc(plan)
        if not any(g["vms"] for g in doc["groups"]):
            raise FailedPrecondition(f"recovery plan {name} has no VMs")
        await self._relationships(doc)
        job = await self.create_job(
            "plan-failover",
            f"plan/{name}",
            {"plan": name, "type": failover_type, "point": point, "doc": doc},
            by=by,
        )
        self.spawn(self.run(job))
        return job

    def _failover_steps(self, target: str, params: dict[str, Any]) -> list[Step]:
        return self.failover_steps(params["doc"], params["type"], params["point"])

    def failover_steps(
        self, doc: dict[str, Any], ftype: str, point: str, *, prove_exact: bool = False
    ) -> list[Step]:
        """Group after group: its actions before, the failover of its VMs, its actions after.
        Action names are the operator's and may repeat: repeats are numbered (see
        :func:`unique_names`), so each step has a name of its own. ``prove_exact`` (test
        failovers: drills, :mod:`broker.drills`) has each recovery host prove its test VM's
        disks byte for byte the recovery point before starting it."""
        names: list[str] = []
        bodies: list[StepBody] = []
        for gi, g in enumerate(doc["groups"], start=1):
            for action in g["before"]:
                names.append(f"Group {gi}: before: {action['name']}")
                bodies.append(self._action_step(gi=gi, group=g, action=action, ftype=ftype))
            if g["vms"]:
                names.append(f"Group {gi}: {ftype} failover of {len(g['vms'])} VM(s)")
                bodies.append(
                    self._group_step(
                        gi=gi, group=g, ftype=ftype, point=point, prove_exact=prove_exact
                    )
                )
            for action in g["after"]:
                names.append(f"Group {gi}: after: {action['name']}")
                bodies.append(self._action_step(gi=gi, group=g, action=action, ftype=ftype))
        return [Step(n, b) for n, b in zip(unique_names(names), bodies, strict=True)]

    async def run(self, job: Job) -> bool:
        """Run a plan job's unfinished steps: a planned or test plan stops at the first
        failure; an unplanned one goes on and reports every failure."""
        params = json.loads(job.params_json)
        steps = self.steps_of(job.kind, job.target, params)
        carry_on = job.kind == "plan-failover" and params["type"] == "unplanned"
        job, todo = await self.unfinished(job, steps)
        bodies = {s.name: s.run for s in steps}
        failures: list[str] = []
        for step in todo:
            await self.jobs.step(job.id, step.name, StepState.RUNNING)
            try:
                message = await bodies[step.name](step)
            except (StepFailed, FailedPrecondition) as exc:
                await self.jobs.step(job.id, step.name, StepState.FAILED, message=exc.message)
                where = f"step {step.index + 1}, {step.name}: {exc.message}"
                if not carry_on:
                    await self.jobs.fail(job.id, f"stopped at {where}")
                    return False
                failures.append(where)
                continue
            await self.jobs.step(job.id, step.name, StepState.SUCCEEDED, message=message)
        if failures:
            await self.jobs.set_state(
                job.id,
                JobState.SUCCEEDED,
                error="; ".join(failures),
                result=await self.job_result(job),
            )
        else:
            await self.jobs.succeed(job.id, await self.job_result(job))
        return True

    def _group_step(
        self, *, gi: int, group: dict[str, Any], ftype: str, point: str, prove_exact: bool
    ) -> StepBody:
        async def run(step: StepRun) -> str:
            job = step.job
            result = await self.job_result(job)
            children: list[str] = result.get(f"group-{gi}", [])
            if not children:
                for rid in group["vms"]:
                    if ftype == "planned":
                        child = await self._failover.planned(rid, by=f"plan/{job.id}")
                    elif ftype == "unplanned":
                        child = await self._failover.unplanned(
                            rid, by=f"plan/{job.id}", point=point
                        )
                    else:
                        child = await self._failover.test(
                            rid, by=f"plan/{job.id}", point=point, prove_exact=prove_exact
                        )
                    children.append(child.id)
                await self.remember(job, f"group-{gi}", children)
            outcomes = await asyncio.gather(*(self._wait_job(c) for c in children))
            failed = [f"{o.target}: {o.error}" for o in outcomes if o.state != JobState.SUCCEEDED]
            if failed:
                raise StepFailed("; ".join(failed))
            return f"{len(outcomes)} VM(s) failed over ({', '.join(o.target for o in outcomes)})"

        return run

    async def _wait_job(self, job_id: str) -> Job:
        final = await self.jobs.get(job_id)
        async for seen in self.jobs.watch(job_id, poll=1.0):
            final = seen
        return final

    def _action_step(
        self,
        *,
        gi: int,
        group: dict[str, Any],
        action: dict[str, Any],
        ftype: str,
    ) -> StepBody:
        async def run(step: StepRun) -> str:
            job, index = step.job, step.index
            if action["kind"] == "manual":
                return await self._manual(step, action)
            rels = [await self.relationship(r) for r in group["vms"]]
            if not rels:
                raise StepFailed("a script action needs a VM in its group to know where to run")
            # The recovery-site agent: the recovery host of the group's first VM, where it
            # runs after the failover (the relationship's direction changes only on reverse).
            host = rels[0].replica_server
            env = {
                "SITEPAIR_PLAN": json.loads(job.params_json)["plan"],
                "SITEPAIR_GROUP": str(gi),
                "SITEPAIR_FAILOVER_TYPE": ftype,
                "SITEPAIR_VMS": ",".join(r.vm_name for r in rels),
            }
            try:
                result = await step.send(
                    host,
                    control_pb2.Command(
                        run_script=control_pb2.RunScript(
                            script=action["script"],
                            args=action.get("args", []),
                            timeout_seconds=int(action.get("timeout", 300)),
                            env=env,
                        )
                    ),
                )
            except StepFailed as exc:
                await self.remember(
                    job, f"action-{index}", {"name": action["name"], "error": exc.message}
                )
                raise
            ran = result.run_script
            await self.remember(
                job,
                f"action-{index}",
                {
                    "name": action["name"],
                    "script": ran.script,
                    "exit_status": ran.exit_status,
                    "output": ran.output,
                },
            )
            output = ran.output.strip().splitlines()
            tail = output[-1] if output else ""
            return f"exit status {ran.exit_status}" + (f": {tail}" if tail else "")

        return run

    async def _manual(self, step: StepRun, action: dict[str, Any]) -> str:
        job, index = step.job, step.index
        plan = json.loads(job.params_json)["plan"]
        await step.progress(
            f"waiting for an operator: {action['instructions']} (then: plans resume {plan})"
        )
        await self.jobs.set_state(job.id, JobState.WAITING)
        while True:
            result = await self.job_result(job)
            if index in result.get("resumed", []):
                await self.jobs.set_state(job.id, JobState.RUNNING)
                return f"resumed by {result.get('resumed_by', {}).get(str(index), 'an operator')}"
            async with self._resume:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._resume.wait(), timeout=1.0)

    async def resume_plan(self, name: str, *, by: str) -> Job:
        """Let a plan waiting at a manual action go on."""
        jobs = [
            j
            for j in await self.jobs.list(kind="plan-failover", limit=200)
            if j.target == f"plan/{name}" and j.state == JobState.WAITING
        ]
        if not jobs:
            raise FailedPrecondition(f"recovery plan {name} is not waiting for an operator")
        job = jobs[0]
        waiting = [s.index for s in job.steps if s.state == StepState.RUNNING]
        if not waiting:
            raise FailedPrecondition(f"recovery plan {name} is not waiting at a manual action")
        result = json.loads(job.result_json) if job.result_json else {}
        result.setdefault("resumed", []).append(waiting[0])
        result.setdefault("resumed_by", {})[str(waiting[0])] = by
        await self.jobs.set_state(job.id, JobState.WAITING, result=result)
        async with self._resume:
            self._resume.notify_all()
        log.info(
            "recovery plan resumed", extra={"fields": {"plan": name, "step": waiting[0], "by": by}}
        )
        return await self._after_resume(job.id, waiting[0])

    async def _after_resume(self, job_id: str, index: int) -> Job:
        """The job once the plan has gone on past the manual step ``index`` (what ``plans
        resume`` shows), or as it is after :data:`RESUME_SHOWN_WITHIN` if it has not yet."""
        latest = await self.jobs.get(job_id)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(RESUME_SHOWN_WITHIN):
                async for job in self.jobs.watch(job_id, poll=0.2):
                    latest = job
                    step = next((s for s in job.steps if s.index == index), None)
                    if job.state.final or step is None or step.state != StepState.RUNNING:
                        break
        return latest

    async def cleanup_test(self, name: str, *, by: str, notes: str = "") -> Job:
        return await self._per_vm(name, "plan-cleanup-test", by=by, params={"notes": notes})

    async def commit(self, name: str, *, by: str) -> Job:
        return await self._per_vm(name, "plan-commit", by=by, params={})

    async def _per_vm(self, name: str, kind: str, *, by: str, params: dict[str, Any]) -> Job:
        doc = _doc(await self.get(name))
        rels = await self._relationships(doc)
        job = await self.create_job(
            kind,
            f"plan/{name}",
            {
                "plan": name,
                "relationships": list(rels),
                "vms": [r.vm_name for r in rels.values()],
                **params,
            },
            by=by,
        )
        self.spawn(self.run(job))
        return job

    def _cleanup_steps(self, target: str, params: dict[str, Any]) -> list[Step]:
        return self._per_vm_steps(_VERBS["plan-cleanup-test"], params)

    def _commit_steps(self, target: str, params: dict[str, Any]) -> list[Step]:
        return self._per_vm_steps(_VERBS["plan-commit"], params)

    def _per_vm_steps(self, verb: str, params: dict[str, Any]) -> list[Step]:
        """One step per VM of the plan, each a child job (commit, or clean up a test)."""
        steps: list[Step] = []
        for i, (rid, vm) in enumerate(zip(params["relationships"], params["vms"], strict=True)):

            async def run(step: StepRun, rid: str = rid, i: int = i) -> str:
                job = step.job
                result = await self.job_result(job)
                child_id = result.get(f"vm-{i}")
                if child_id is None:
                    if job.kind == "plan-cleanup-test":
                        child = await self._failover.cleanup_test(
                            rid, by=f"plan/{job.id}", notes=params.get("notes", "")
                        )
                    else:
                        child = await self._failback.commit(rid, by=f"plan/{job.id}")
                    child_id = child.id
                    await self.remember(job, f"vm-{i}", child_id)
                done = await self._wait_job(child_id)
                if done.state != JobState.SUCCEEDED:
                    raise StepFailed(done.error)
                return "done"

            steps.append(Step(f"{verb} {vm}", run))
        return steps

    async def resume(self, job: Job) -> bool:
        params = json.loads(job.params_json)
        if job.kind != "plan-failover" and "vms" not in params:
            # A job of a broker that did not keep the VMs' names: its steps, one per VM, in
            # order, end with them.
            params["vms"] = [s.name.removeprefix(f"{_VERBS[job.kind]} ") for s in job.steps]
            job = dataclasses.replace(job, params_json=json.dumps(params, sort_keys=True))
        return await super().resume(job)


def _group(doc: dict[str, Any], group: int) -> dict[str, Any]:
    groups: list[dict[str, Any]] = doc["groups"]
    if not 1 <= group <= len(groups):
        raise InvalidArgument(
            f"the plan has groups 1 to {len(groups)}; add one with `plans add-group`"
        )
    return groups[group - 1]
