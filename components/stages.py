"""One KFP component per fleet stage. Each body makes one call into :mod:`lorafleet.stages`.

Bodies import inside the function: KFP ships each one as standalone source. A per-expert
step makes its call through :func:`~lorafleet.components.runtime.expert_step`: a failure
is put on the step's outputs instead of failing it, so that one expert's failure stops only
that expert; ``fleet-status`` fails the run at the end, naming it.
"""

from typing import NamedTuple

from kfp.dsl import HTML, Artifact, Dataset, Input, Markdown, Metrics, Model, Output

from lorafleet.components import fleet_component

__all__ = [
    "build_base",
    "curate",
    "curate_shard",
    "deploy",
    "evaluate",
    "expert_views",
    "fleet_status",
    "gate",
    "plan_shards",
    "publish",
    "register",
    "reject",
    "resolve_fleet",
    "synthesize",
    "train",
    "validate_data",
]


@fleet_component
def resolve_fleet(
    spec_json: str,
    spec_uri: str,
    base_model: str,
    base_revision: str,
    max_loss_ratio: float,
    gate_overrides: str,
) -> NamedTuple("Fleet", fleet_json=str, base_view=str):
    """The fleet this run builds: the spec (or the one at spec_uri) with the run's parameters
    applied and every data file's digest filled in; and the base step's view of it."""
    from collections import namedtuple

    from lorafleet.fleet import spec_to_json
    from lorafleet.fleet.views import step_view
    from lorafleet.stages import resolve_stage

    spec = resolve_stage(
        spec_json,
        spec_uri,
        base_model,
        base_revision,
        max_loss_ratio,
        gate_overrides=gate_overrides,
    )
    return namedtuple("Fleet", ["fleet_json", "base_view"])(
        spec_to_json(spec), spec_to_json(step_view(spec, "base"))
    )


@fleet_component
def expert_views(
    spec_json: str,
    spec_uri: str,
    base_model: str,
    base_revision: str,
    max_loss_ratio: float,
    gate_overrides: str,
    expert: str,
) -> NamedTuple("Views", fleet=str, data=str, train=str, evaluate=str, gate=str):
    """The fleet as resolve-fleet makes it (this expert's data digests read afresh), and what
    each of the expert's steps reads of it (lorafleet.fleet.views): an edit reruns only the
    steps that read it."""
    from collections import namedtuple

    from lorafleet.fleet import spec_to_json
    from lorafleet.fleet.views import step_view
    from lorafleet.stages import resolve_stage

    spec = resolve_stage(
        spec_json,
        spec_uri,
        base_model,
        base_revision,
        max_loss_ratio,
        experts=[expert],
        gate_overrides=gate_overrides,
    )
    views = ["data", "train", "evaluate", "gate"]
    return namedtuple("Views", ["fleet", *views])(
        spec_to_json(spec), *(spec_to_json(step_view(spec, v, expert)) for v in views)
    )


@fleet_component
def build_base(spec_json: str, base: Output[Model]):
    """Build (or reuse) the shared base model."""
    from lorafleet.components.runtime import export_base
    from lorafleet.fleet import spec_from_json

    export_base(spec_from_json(spec_json), base)


@fleet_component
def validate_data(
    spec_json: str,
    expert: str,
    seeds: Output[Dataset],
    eval_set: Output[Dataset],
    report: Output[Artifact],
    report_md: Output[Markdown],
    report_html: Output[HTML],
):
    """Run the expert's great-expectations suite on its seed and eval files."""
    from lorafleet.components.runtime import expert_step, write_markdown
    from lorafleet.fleet import spec_from_json
    from lorafleet.stages import validate_stage

    summary, failure = expert_step(
        expert,
        "validate-data",
        lambda: validate_stage(
            spec_from_json(spec_json).expert(expert),
            seeds.path,
            eval_set.path,
            report.path,
            html_out=report_html.path,
        ),
        outputs=[seeds, eval_set, report, report_md, report_html],
    )
    if failure is None:
        write_markdown(report_md, summary["markdown"])


@fleet_component
def plan_shards(spec_json: str, expert: str) -> list:
    """The expert's data shards, ``[{"shard": 0, "view": ...}, ...]`` (``synthesis.shards``
    of them): what synthesis and curation fan out over, each with the data view it reads."""
    from lorafleet.fleet import spec_from_json
    from lorafleet.stages import shard_indices

    return [
        {"shard": i, "view": spec_json}
        for i in shard_indices(spec_from_json(spec_json).expert(expert))
    ]


@fleet_component
def synthesize(
    spec_json: str, expert: str, shard: int, seeds: Input[Dataset], synthetic: Output[Dataset]
):
    """Expand one shard of the gold seeds synthetically."""
    from lorafleet.components.runtime import expert_step
    from lorafleet.fleet import spec_from_json
    from lorafleet.stages import synthesize_stage

    chosen = spec_from_json(spec_json).expert(expert)
    stats, failure = expert_step(
        expert,
        "synthesize",
        lambda: synthesize_stage(
            chosen,
            seeds.path,
            synthetic.path,
            shard_index=int(shard),
            shard_count=chosen.synthesis.shards,
        ),
        inputs=[seeds],
        outputs=[synthetic],
    )
    if failure is None:
        synthetic.metadata.update(stats)


@fleet_component
def curate_shard(
    spec_json: str,
    expert: str,
    shard: int,
    seeds: Input[Dataset],
    synthetic: Input[Dataset],
    eval_set: Input[Dataset],
    prepared: Output[Dataset],
):
    """Per-row curation of one shard: PII, eval overlap, MinHash signatures."""
    from lorafleet.components.runtime import expert_step
    from lorafleet.fleet import spec_from_json
    from lorafleet.stages import curate_shard_stage

    stats, failure = expert_step(
        expert,
        "curate-shard",
        lambda: curate_shard_stage(
            spec_from_json(spec_json).expert(expert),
            seeds.path,
            synthetic.path,
            eval_set.path,
            prepared.path,
            shard_index=int(shard),
        ),
        inputs=[seeds, synthetic, eval_set],
        outputs=[prepared],
    )
    if failure is None:
        prepared.metadata.update({"shard": stats["shard"], "rows": stats["rows"]})


@fleet_component
def curate(
    spec_json: str,
    expert: str,
    prepared: Input[list[Dataset]],
    eval_set: Input[Dataset],
    train_set: Output[Dataset],
    stats: Output[Artifact],
    stats_md: Output[Markdown],
):
    """Exact and near dedup over every shard, drop eval overlap, cap synthetic rows."""
    from lorafleet.components.runtime import expert_step, write_json, write_markdown
    from lorafleet.data.report import stats_markdown
    from lorafleet.fleet import spec_from_json
    from lorafleet.stages import select_stage

    result, failure = expert_step(
        expert,
        "curate",
        lambda: select_stage(
            spec_from_json(spec_json).expert(expert),
            [p.path for p in prepared],
            eval_set.path,
            train_set.path,
        ),
        inputs=[prepared, eval_set],
        outputs=[train_set, stats, stats_md],
    )
    if failure is None:
        write_json(stats, result)
        write_markdown(stats_md, stats_markdown(result))


@fleet_component
def train(
    spec_json: str,
    expert: str,
    base: Input[Model],
    train_set: Input[Dataset],
    adapter: Output[Model],
    train_log: Output[Artifact],
    metrics: Output[Metrics],
):
    """Fine-tune the expert's LoRA adapter."""
    from lorafleet.components.runtime import (
        base_path,
        expert_step,
        limit_threads,
        log_metrics,
        pinned_spec,
        write_json,
    )
    from lorafleet.fleet import spec_from_json
    from lorafleet.report import kfp_train_metrics
    from lorafleet.stages import train_stage

    limit_threads()
    spec = pinned_spec(spec_from_json(spec_json), base)
    result, failure = expert_step(
        expert,
        "train",
        lambda: train_stage(
            spec.expert(expert), base_path(base), train_set.path, adapter.path, base=spec.base
        ),
        inputs=[train_set],
        outputs=[adapter, train_log, metrics],
    )
    if failure is None:
        write_json(train_log, result)
        log_metrics(metrics, kfp_train_metrics(result))


@fleet_component
def evaluate(
    spec_json: str,
    expert: str,
    base: Input[Model],
    adapter: Input[Model],
    eval_set: Input[Dataset],
    evaluation: Output[Artifact],
    metrics: Output[Metrics],
):
    """Held-out loss and task metrics, candidate vs base."""
    from lorafleet.components.runtime import (
        base_path,
        expert_step,
        limit_threads,
        log_metrics,
        pinned_spec,
        write_json,
    )
    from lorafleet.fleet import spec_from_json
    from lorafleet.report import kfp_metrics
    from lorafleet.stages import evaluate_stage

    limit_threads()
    spec = pinned_spec(spec_from_json(spec_json), base)
    result, failure = expert_step(
        expert,
        "evaluate",
        lambda: evaluate_stage(
            spec, spec.expert(expert), base_path(base), adapter.path, eval_set.path
        ),
        inputs=[adapter, eval_set],
        outputs=[evaluation, metrics],
    )
    if failure is None:
        write_json(evaluation, result)
        log_metrics(metrics, kfp_metrics(result))


@fleet_component
def gate(
    spec_json: str,
    expert: str,
    evaluation: Input[Artifact],
    train_log: Input[Artifact],
    curation: Input[Artifact],
    report: Output[Artifact],
    report_md: Output[Markdown],
) -> NamedTuple("GateOutputs", passed=bool):
    """Apply the expert's gate policy; ``passed`` drives ``dsl.If``. An expert whose earlier
    step failed (or whose gate could not be applied) does not pass: its report names the
    failure."""
    from collections import namedtuple

    from lorafleet.components.runtime import (
        expert_step,
        gate_markdown,
        read_json,
        write_json,
        write_markdown,
    )
    from lorafleet.fleet import spec_from_json
    from lorafleet.stages import failure_report, gate_stage

    result, failure = expert_step(
        expert,
        "gate",
        lambda: gate_stage(
            spec_from_json(spec_json).expert(expert),
            read_json(evaluation),
            read_json(train_log),
            read_json(curation),
        ),
        inputs=[evaluation, train_log, curation],
    )
    if failure is not None:
        result = failure_report(failure)
    write_json(report, result)
    write_markdown(report_md, gate_markdown(result))
    return namedtuple("GateOutputs", ["passed"])(result["gate_passed"])


@fleet_component
def register(
    spec_json: str, expert: str, base: Input[Model], adapter: Input[Model], report: Input[Artifact]
) -> str:
    """Register the adapter that passed its gate; returns the expert's outcome (JSON): a
    failed one, naming the error, when registering fails."""
    import json

    from lorafleet.components.runtime import base_path, expert_step, pinned_spec, read_json
    from lorafleet.fleet import spec_from_json
    from lorafleet.stages import failure_report, register_stage, reject_stage

    spec = pinned_spec(spec_from_json(spec_json), base)
    gated = read_json(report)
    outcome, failure = expert_step(
        expert,
        "register",
        lambda: register_stage(spec, spec.expert(expert), base_path(base), adapter.path, gated),
    )
    return json.dumps(outcome if failure is None else reject_stage(failure_report(failure, gated)))


@fleet_component
def reject(report: Input[Artifact]) -> str:
    """Record a candidate that failed its gate (nothing is registered); returns its outcome (JSON)."""
    import json

    from lorafleet.components.runtime import read_json
    from lorafleet.stages import reject_stage

    return json.dumps(reject_stage(read_json(report)))


@fleet_component
def publish(
    spec_json: str,
    base: Input[Model],
    outcomes: list,
    summary: Output[Artifact],
    report: Output[HTML],
    summary_md: Output[Markdown],
):
    """Serve the base and every registered adapter, ask each one question, write the fleet report."""
    import json

    from lorafleet.components.runtime import base_path, pinned_spec
    from lorafleet.fleet import spec_from_json
    from lorafleet.publish import publish_fleet

    publish_fleet(
        pinned_spec(spec_from_json(spec_json), base),
        base_path(base),
        [json.loads(o) for o in outcomes],
        summary.path,
        report.path,
        summary_md.path,
    )


@fleet_component
def fleet_status(outcomes: list) -> str:
    """The run's verdict, after ``publish`` and ``deploy``: it fails the run, naming every
    failed expert with its step and error, when any failed; else returns which experts were
    registered and which rejected (JSON)."""
    import json

    from lorafleet.stages import fleet_status as verdict

    return json.dumps(verdict([json.loads(o) for o in outcomes]))


@fleet_component
def deploy(
    spec_json: str, outcomes: list, rollouts: Output[Artifact], rollouts_md: Output[Markdown]
):
    """Put every newly registered adapter on a canary rollout, driven here or by the cluster's
    rollout controller, as the spec's canary.handoff says (none: nothing)."""
    import json

    from lorafleet.components.runtime import write_json, write_markdown
    from lorafleet.fleet import spec_from_json
    from lorafleet.rollout.deploy import deploy_rollouts, rollouts_markdown

    result = deploy_rollouts(spec_from_json(spec_json), [json.loads(o) for o in outcomes])
    write_json(rollouts, result)
    write_markdown(rollouts_md, rollouts_markdown(result))
