"""Jobs are declared as named steps: a command is found again by the name of the step that sent
it, so a job resumed by a newer broker whose declaration of it has a step more sends nothing
twice and skips nothing (issue 12)."""

from __future__ import annotations

from pathlib import Path

from broker.orchestration import Orchestrator, Step, StepRun, step_names, unique_names
from broker.store.models import JobState, StepState
from sitepair.v1 import control_pb2
from tests.support.agents import register_agent
from tests.support.brokers import BrokerThread


def test_a_job_resumed_after_a_step_was_inserted_sends_no_command_twice(
    broker: BrokerThread, credentials: Path, tmp_path: Path
) -> None:
    ident = register_agent(credentials, tmp_path / "hv", name="hv-1")  # offline: stays pending
    ctx = broker.ctx
    assert ctx is not None
    orch = Orchestrator(ctx.protection.orchestration)
    body = control_pb2.Command(
        configure_replica=control_pb2.ConfigureReplica(
            relationship_id="rel-1", auth=control_pb2.AUTH_TICKET
        )
    )
    ran: list[str] = []
    sent: list[str] = []

    async def plain(step: StepRun) -> str:
        ran.append(step.name)
        return "done"

    async def configure(step: StepRun) -> str:
        ran.append(step.name)
        sent.append((await step.submit(ident.host_id, body)).id)
        return "configured"

    old = [Step("a", plain), Step("b", configure), Step("c", plain)]
    job = broker.loop.call(ctx.jobs.create("upgrade", "t", step_names(old), created_by="t"))
    # The old broker finished step a, and step b had sent its command when it stopped: the
    # command as that broker stored it (by index; the migration named its step).
    broker.loop.call(ctx.jobs.step(job.id, "a", StepState.SUCCEEDED))
    broker.loop.call(ctx.jobs.step(job.id, "b", StepState.RUNNING))
    before = broker.loop.call(
        ctx.dispatcher.submit(ident.host_id, body, job_id=job.id, job_step=1, job_step_name="b")
    )

    # The newer broker declares a step before b: b is now the third step.
    new = [Step("a", plain), Step("new", plain), Step("b", configure), Step("c", plain)]
    assert broker.loop.call(orch.run_steps(job, new))

    assert ran == ["new", "b", "c"]  # a is not run again, nothing is skipped
    assert sent == [before.id]  # b found the command it sent before the upgrade
    with ctx.store.read() as tx:
        assert [c.id for c in tx.commands_for_job(job.id)] == [before.id]
    done = broker.loop.call(ctx.jobs.get(job.id))
    assert done.state == JobState.SUCCEEDED
    assert [(s.name, s.state) for s in done.steps] == [
        ("a", StepState.SUCCEEDED),
        ("b", StepState.SUCCEEDED),
        ("c", StepState.SUCCEEDED),
    ]


def test_step_names_are_keys() -> None:
    assert unique_names(["x", "y", "x", "x"]) == ["x", "y", "x (2)", "x (3)"]
    steps = [Step(n, lambda step: _never()) for n in ("x", "x")]
    try:
        step_names(steps)
    except ValueError:
        pass
    else:
        raise AssertionError("two steps of one job with one name were accepted")


async def _never() -> str:
    raise AssertionError("not run")
