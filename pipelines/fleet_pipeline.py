"""The fleet pipeline: build the base once, then every expert side by side, then publish.

Per expert: validate -> synthesize and prepare each data shard (``dsl.ParallelFor``) ->
curate -> train -> evaluate -> gate, and only if the gate passes: register. A failed
gate ends that expert's branch (``reject`` records why); the other experts go on. ``publish`` serves the base and every registered adapter.
``deploy`` then puts the new versions on a canary rollout as the spec's ``canary.handoff`` says
(:mod:`lorafleet.rollout.deploy`; ``none``, the local default, does nothing).

Compile with ``lorafleet compile`` (writes ``fleet_pipeline.yaml`` beside this file).
"""

from collections.abc import Callable
from typing import NamedTuple

from kfp import dsl
from kfp.dsl import HTML, Artifact, Input, Model, PipelineTask
from kfp.dsl.graph_component import GraphComponent

from lorafleet.components.stages import (
    build_base,
    curate,
    curate_shard,
    deploy,
    evaluate,
    gate,
    plan_shards,
    publish,
    register,
    reject,
    synthesize,
    train,
    validate_data,
)

__all__ = ["build_fleet_pipeline", "fleet_pipeline"]

# Local runs go one expert at a time anyway; on a cluster this bounds GPU pods per run.
MAX_PARALLEL_EXPERTS = 8


class FleetOutputs(NamedTuple):
    summary: Artifact
    report: HTML


def _as_is(task: PipelineTask) -> PipelineTask:
    return task


def build_fleet_pipeline(place: Callable[[PipelineTask], PipelineTask] = _as_is) -> GraphComponent:
    """Define the fleet pipeline; ``place`` gets every step's task to set where it runs.

    Args:
        place: called once per step task (``task.name`` is the step, e.g. ``train``) to add
            Kubernetes platform settings (see :mod:`lorafleet.pipelines.platform`); the
            default leaves every task as it is, which compiles to the committed golden.

    Returns:
        The ``lorafleet-fleet`` pipeline.
    """

    @dsl.pipeline(name="lorafleet-expert", description="Build, evaluate and gate one LoRA expert.")
    def expert_pipeline(spec_json: str, expert: str, base: Input[Model]) -> str:
        data = validate_data(spec_json=spec_json, expert=expert)
        # Synthesis and the per-row half of curation fan out over the expert's data shards;
        # the order-dependent half (dedup, cap) runs once over all of them.
        plan = plan_shards(spec_json=spec_json, expert=expert)
        with dsl.ParallelFor(plan.output, name="data-shards") as shard:
            syn = synthesize(
                spec_json=spec_json, expert=expert, shard=shard, seeds=data.outputs["seeds"]
            )
            prep = curate_shard(
                spec_json=spec_json,
                expert=expert,
                shard=shard,
                seeds=data.outputs["seeds"],
                synthetic=syn.outputs["synthetic"],
                eval_set=data.outputs["eval_set"],
            )
        cur = curate(
            spec_json=spec_json,
            expert=expert,
            prepared=dsl.Collected(prep.outputs["prepared"]),
            eval_set=data.outputs["eval_set"],
        )
        trained = train(
            spec_json=spec_json, expert=expert, base=base, train_set=cur.outputs["train_set"]
        )
        evaluated = evaluate(
            spec_json=spec_json,
            expert=expert,
            base=base,
            adapter=trained.outputs["adapter"],
            eval_set=data.outputs["eval_set"],
        )
        decision = gate(
            spec_json=spec_json,
            expert=expert,
            evaluation=evaluated.outputs["evaluation"],
            train_log=trained.outputs["train_log"],
            curation=cur.outputs["stats"],
        )
        with dsl.If(decision.outputs["passed"] == True, name="gate-passed"):  # noqa: E712 (KFP condition)
            registered = register(
                spec_json=spec_json,
                expert=expert,
                base=base,
                adapter=trained.outputs["adapter"],
                report=decision.outputs["report"],
            )
            # Effects outside KFP's artifacts (a new registry version): never from the cache.
            registered.set_caching_options(False)
        with dsl.Else(name="gate-failed"):
            rejected = reject(report=decision.outputs["report"])
        for task in (
            data,
            plan,
            syn,
            prep,
            cur,
            trained,
            evaluated,
            decision,
            registered,
            rejected,
        ):
            place(task)
        # The outcome is a JSON parameter: kfp.local resolves dsl.OneOf for parameters only.
        return dsl.OneOf(registered.output, rejected.output)

    @dsl.pipeline(
        name="lorafleet-fleet",
        description="Build, gate and publish a fleet of LoRA experts on one base.",
    )
    def fleet_pipeline(spec_json: str, experts: list) -> FleetOutputs:
        base = build_base(spec_json=spec_json)
        with dsl.ParallelFor(experts, parallelism=MAX_PARALLEL_EXPERTS, name="experts") as expert:
            outcome = expert_pipeline(spec_json=spec_json, expert=expert, base=base.outputs["base"])
        published = publish(
            spec_json=spec_json, base=base.outputs["base"], outcomes=dsl.Collected(outcome.output)
        )
        # After the smoke test: canary rollouts of the new versions (canary.handoff; none locally).
        deployed = deploy(spec_json=spec_json, outcomes=dsl.Collected(outcome.output)).after(
            published
        )
        # Serving smoke tests and rollouts act on live systems: a cached result would claim
        # a check or a rollout that never ran.
        published.set_caching_options(False)
        deployed.set_caching_options(False)
        place(base)
        place(published)
        place(deployed)
        return FleetOutputs(
            summary=published.outputs["summary"], report=published.outputs["report"]
        )

    return fleet_pipeline


# The pipeline as committed (pipelines/fleet_pipeline.yaml): no cluster settings.
fleet_pipeline = build_fleet_pipeline()
