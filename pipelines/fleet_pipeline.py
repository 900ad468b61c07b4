"""The fleet pipeline: build the base once, then every expert side by side, then publish.

Per expert: validate -> synthesize and prepare each data shard (``dsl.ParallelFor``) ->
curate -> train -> evaluate -> gate, and only if the gate passes: register. A failed
gate ends that expert's branch (``reject`` records why); the other experts go on. So does a
failed step: it passes the expert's failure on instead of failing
(:mod:`lorafleet.components.runtime`), the gate does not pass it, and ``reject`` records it.
``publish`` serves the base and every registered adapter, and lists the failed experts.
``deploy`` then puts the new versions on a canary rollout as the spec's ``canary.handoff`` says
(:mod:`lorafleet.rollout.deploy`; ``none``, the local default, does nothing). Last,
``fleet-status`` fails the run when an expert failed, naming each one.

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
    expert_views,
    fleet_status,
    gate,
    plan_shards,
    publish,
    register,
    reject,
    resolve_fleet,
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
    def expert_pipeline(
        spec_json: str,
        spec_uri: str,
        base_model: str,
        base_revision: str,
        max_loss_ratio: float,
        gate_overrides: str,
        expert: str,
        base: Input[Model],
    ) -> str:
        # Each step gets its view of the fleet (lorafleet.fleet.views), so that its cache key
        # changes only when what it reads changes: a canary edit reruns no training. (The
        # run's parameters come in, not resolve-fleet's output: kfp.local hands a loop
        # iteration its loop item in place of any task output passed into the loop.)
        views = expert_views(
            spec_json=spec_json,
            spec_uri=spec_uri,
            base_model=base_model,
            base_revision=base_revision,
            max_loss_ratio=max_loss_ratio,
            gate_overrides=gate_overrides,
            expert=expert,
        )
        # It reads the live data files' digests: a cached result would hide an edited file.
        views.set_caching_options(False)
        fleet_json = views.outputs["fleet"]
        data_view, train_view = views.outputs["data"], views.outputs["train"]
        eval_view, gate_view = views.outputs["evaluate"], views.outputs["gate"]
        data = validate_data(spec_json=data_view, expert=expert)
        # Synthesis and the per-row half of curation fan out over the expert's data shards;
        # the order-dependent half (dedup, cap) runs once over all of them.
        plan = plan_shards(spec_json=data_view, expert=expert)
        # Each item carries the data view: inside the loop, only the loop item and the
        # expert pipeline's inputs reach a step (see above).
        with dsl.ParallelFor(plan.output, name="data-shards") as item:
            syn = synthesize(
                spec_json=item.view, expert=expert, shard=item.shard, seeds=data.outputs["seeds"]
            )
            prep = curate_shard(
                spec_json=item.view,
                expert=expert,
                shard=item.shard,
                seeds=data.outputs["seeds"],
                synthetic=syn.outputs["synthetic"],
                eval_set=data.outputs["eval_set"],
            )
        cur = curate(
            spec_json=data_view,
            expert=expert,
            prepared=dsl.Collected(prep.outputs["prepared"]),
            eval_set=data.outputs["eval_set"],
        )
        trained = train(
            spec_json=train_view, expert=expert, base=base, train_set=cur.outputs["train_set"]
        )
        evaluated = evaluate(
            spec_json=eval_view,
            expert=expert,
            base=base,
            adapter=trained.outputs["adapter"],
            eval_set=data.outputs["eval_set"],
        )
        decision = gate(
            spec_json=gate_view,
            expert=expert,
            evaluation=evaluated.outputs["evaluation"],
            train_log=trained.outputs["train_log"],
            curation=cur.outputs["stats"],
        )
        with dsl.If(decision.outputs["passed"] == True, name="gate-passed"):  # noqa: E712 (KFP condition)
            registered = register(
                spec_json=fleet_json,
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
            views,
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
    def fleet_pipeline(
        spec_json: str,
        experts: list,
        spec_uri: str = "",
        base_model: str = "",
        base_revision: str = "",
        max_loss_ratio: float = 0.0,
        gate_overrides: str = "",
    ) -> FleetOutputs:
        # Run parameters a KFP UI user can set without editing the spec: which experts, the
        # base model and revision, the gate's loss bar (every expert's, or per expert as JSON
        # in gate_overrides), or another spec (a staged fleet YAML).
        fleet = resolve_fleet(
            spec_json=spec_json,
            spec_uri=spec_uri,
            base_model=base_model,
            base_revision=base_revision,
            max_loss_ratio=max_loss_ratio,
            gate_overrides=gate_overrides,
        )
        # It reads the live data files' digests: a cached result would hide an edited file.
        fleet.set_caching_options(False)
        fleet_json = fleet.outputs["fleet_json"]
        base = build_base(spec_json=fleet.outputs["base_view"])
        with dsl.ParallelFor(experts, parallelism=MAX_PARALLEL_EXPERTS, name="experts") as expert:
            outcome = expert_pipeline(
                spec_json=spec_json,
                spec_uri=spec_uri,
                base_model=base_model,
                base_revision=base_revision,
                max_loss_ratio=max_loss_ratio,
                gate_overrides=gate_overrides,
                expert=expert,
                base=base.outputs["base"],
            )
        published = publish(
            spec_json=fleet_json, base=base.outputs["base"], outcomes=dsl.Collected(outcome.output)
        )
        # After the smoke test: canary rollouts of the new versions (canary.handoff; none locally).
        deployed = deploy(spec_json=fleet_json, outcomes=dsl.Collected(outcome.output)).after(
            published
        )
        # Serving smoke tests and rollouts act on live systems: a cached result would claim
        # a check or a rollout that never ran.
        published.set_caching_options(False)
        deployed.set_caching_options(False)
        # The run fails, naming the failed experts, only once the others are out.
        status = fleet_status(outcomes=dsl.Collected(outcome.output)).after(deployed)
        for task in (fleet, base, published, deployed, status):
            place(task)
        return FleetOutputs(
            summary=published.outputs["summary"], report=published.outputs["report"]
        )

    return fleet_pipeline


# The pipeline as committed (pipelines/fleet_pipeline.yaml): no cluster settings.
fleet_pipeline = build_fleet_pipeline()
