"""The fleet pipeline: build the base once, then every expert side by side, then publish.

Per expert: validate -> synthesize -> curate -> train -> evaluate -> gate, and only if
the gate passes: register. A failed gate ends that expert's branch (``reject`` records
why); the other experts go on. ``publish`` serves the base and every registered adapter.

Compile with ``lorafleet compile`` (writes ``fleet_pipeline.yaml`` beside this file).
"""


from typing import NamedTuple

from kfp import dsl
from kfp.dsl import HTML, Artifact, Input, Model

from lorafleet.components.stages import (
    build_base,
    curate,
    evaluate,
    gate,
    publish,
    register,
    reject,
    synthesize,
    train,
    validate_data,
)

__all__ = ["expert_pipeline", "fleet_pipeline"]

# Local runs go one expert at a time anyway; on a cluster this bounds GPU pods per run.
MAX_PARALLEL_EXPERTS = 8


class FleetOutputs(NamedTuple):
    summary: Artifact
    report: HTML


@dsl.pipeline(name="lorafleet-expert", description="Build, evaluate and gate one LoRA expert.")
def expert_pipeline(spec_json: str, expert: str, base: Input[Model]) -> str:
    data = validate_data(spec_json=spec_json, expert=expert)
    syn = synthesize(spec_json=spec_json, expert=expert, seeds=data.outputs["seeds"])
    cur = curate(
        spec_json=spec_json,
        expert=expert,
        seeds=data.outputs["seeds"],
        synthetic=syn.outputs["synthetic"],
        eval_set=data.outputs["eval_set"],
    )
    trained = train(spec_json=spec_json, expert=expert, base=base, train_set=cur.outputs["train_set"])
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
    with dsl.Else(name="gate-failed"):
        rejected = reject(report=decision.outputs["report"])
    # The outcome is a JSON parameter: kfp.local resolves dsl.OneOf for parameters only.
    return dsl.OneOf(registered.output, rejected.output)


@dsl.pipeline(name="lorafleet-fleet", description="Build, gate and publish a fleet of LoRA experts on one base.")
def fleet_pipeline(spec_json: str, experts: list) -> FleetOutputs:
    base = build_base(spec_json=spec_json)
    with dsl.ParallelFor(experts, parallelism=MAX_PARALLEL_EXPERTS, name="experts") as expert:
        outcome = expert_pipeline(spec_json=spec_json, expert=expert, base=base.outputs["base"])
    published = publish(spec_json=spec_json, base=base.outputs["base"], outcomes=dsl.Collected(outcome.output))
    return FleetOutputs(summary=published.outputs["summary"], report=published.outputs["report"])
