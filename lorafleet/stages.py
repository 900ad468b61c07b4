"""The fleet's stages as plain functions over files: what each KFP component calls.

Every stage takes the loaded spec, the expert's name and explicit paths, writes its
outputs atomically and returns a JSON-able summary. Nothing here imports ``kfp``.

One expert's failure never stops the others: a per-expert step runs its stage through
:func:`run_expert_stage`, which turns an error into the expert's *failure*
(``{"expert", "stage", "error"}``, the error on one line) instead of raising. The steps
after it pass the failure on without running, the gate records it as not passed
(:func:`failure_report`), ``publish`` lists it beside the published experts, and the run's
last step (:func:`fleet_status`) ends the run as failed, naming every failed expert.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from lorafleet import progress
from lorafleet.errors import DataError, LorafleetError
from lorafleet.fleet import DATA_FIELDS, BaseSpec, ExpertSpec, FleetSpec
from lorafleet.io import atomic_write_json, atomic_write_text, sha256_file, sha256_json
from lorafleet.records import Record, dump_records, read_records
from lorafleet.storage import Storage, parse_location

__all__ = [
    "ExpertsFailed",
    "build_base",
    "curate_shard_stage",
    "evaluate_stage",
    "failure_report",
    "fetch_data",
    "fleet_status",
    "gate_stage",
    "production_adapter",
    "register_stage",
    "reject_stage",
    "run_expert_stage",
    "select_stage",
    "shard_indices",
    "stage_failure",
    "synthesize_stage",
    "train_stage",
    "validate_stage",
]

log = logging.getLogger(__name__)

T = TypeVar("T")

FAILURE_ERROR_CHARS = 500
"""An expert's failure keeps this much of its error: it travels in every later step's
parameters and artifact metadata."""


def stage_failure(expert: str, stage: str, error: BaseException) -> dict:
    """An expert's failure: which stage failed and why, on one line.

    A :class:`~lorafleet.errors.LorafleetError` is the user's to fix and is shown as it
    reads; any other error is prefixed with its type (``ValueError: no training records``).

    Returns:
        ``{"expert", "stage", "error"}``.
    """
    text = " ".join(str(error).split())
    if not isinstance(error, LorafleetError):
        text = f"{type(error).__name__}: {text}" if text else type(error).__name__
    if len(text) > FAILURE_ERROR_CHARS:
        text = text[: FAILURE_ERROR_CHARS - 1] + "…"
    return {"expert": expert, "stage": stage, "error": text}


def run_expert_stage(
    expert: str, stage: str, call: Callable[[], T]
) -> tuple[T | None, dict | None]:
    """Run one of an expert's stages so that its failure does not stop the fleet.

    An error is logged (with its traceback, unless it is a user's mistake) and returned as
    the expert's failure (:func:`stage_failure`); a pod that is killed (evicted, preempted,
    out of memory) raises nothing here, and its step is retried by the cluster.

    Args:
        expert: the expert.
        stage: the stage, as the pipeline names its step (``train``).
        call: the stage itself.

    Returns:
        ``(result, None)``, or ``(None, failure)`` when the stage raised.
    """
    try:
        return call(), None
    except Exception as error:  # one expert's failure must not stop the fleet
        failure = stage_failure(expert, stage, error)
        if isinstance(error, LorafleetError):
            log.error("%s: %s failed: %s", expert, stage, failure["error"])
        else:
            log.exception("%s: %s failed", expert, stage)
        progress.emit(expert, "failed", f"{stage}: {failure['error']}", done=True)
        return None, failure


def failure_report(failure: dict, report: dict | None = None) -> dict:
    """The gate report of an expert whose stage failed: not passed, the failure named.

    Args:
        failure: from :func:`stage_failure`.
        report: the gate report, when the failure came after the gate (``register``).
    """
    why = f"{failure['stage']} failed: {failure['error']}"
    return {
        **(report or {"expert": failure["expert"]}),
        "failure": failure,
        "gate_passed": False,
        "gate_reasons": [f"FAIL {why}"],
        "gate_rules": (report or {}).get("gate_rules", []),
        "gate_summary": f"not decided: {why}" if report is None else f"passed, then {why}",
    }


class ExpertsFailed(LorafleetError):
    """Experts of the run failed; the others were published and deployed."""

    exit_code = 1


def fleet_status(outcomes: list[dict]) -> dict:
    """The run's verdict, after ``publish`` and ``deploy``: every expert's outcome sorted.

    Returns:
        ``{"registered": [...], "rejected": [...], "failed": {expert: "stage: error"}}``.

    Raises:
        ExpertsFailed: naming every failed expert, its stage and error, so that the run
            ends as failed (its published experts stay published).
    """
    failed = {
        o["expert"]: f"{o['failure']['stage']}: {o['failure']['error']}"
        for o in outcomes
        if o.get("failure")
    }
    status = {
        "registered": [o["expert"] for o in outcomes if o.get("registered")],
        "rejected": [
            o["expert"] for o in outcomes if not o.get("registered") and not o.get("failure")
        ],
        "failed": failed,
    }
    if failed:
        raise ExpertsFailed(
            f"{len(failed)} of {len(outcomes)} experts failed: "
            + "; ".join(f"{name} ({why})" for name, why in failed.items())
        )
    return status


def _records(path: str | Path) -> list[Record]:
    return [r for _, r in read_records(path)]


def fetch_data(expert: ExpertSpec, field: str, work_dir: str | Path, storage: Storage) -> Path:
    """One of the expert's data files as a local file, its digest checked when the spec has one.

    A local path (or a ``pvc://`` claim mounted in this step) is read where it is; an object
    in a store (``s3://``, ``gs://``) is downloaded into ``work_dir``.

    Args:
        expert: the expert.
        field: ``seed_data`` or ``eval_data``.
        work_dir: an empty directory for downloads.
        storage: the storage layer to read through.

    Returns:
        The local file.

    Raises:
        StorageError: if the object cannot be read.
        DataError: if its SHA-256 is not the spec's ``<field>_sha256``.
    """
    location = getattr(expert, field)
    path = storage.local_path(location)
    if path is None:
        path = Path(work_dir) / field / parse_location(location).name
        storage.copy_file(location, path)
    want = getattr(expert, f"{field}_sha256")
    if want is not None and (got := sha256_file(path)) != want:
        raise DataError(
            location,
            None,
            f"{field}_sha256",
            f"expert {expert.name}: the file has sha256 {got[:12]}…, the spec says {want[:12]}…",
        )
    return path


def resolve_stage(
    spec_json: str = "",
    spec_uri: str = "",
    base_model: str = "",
    base_revision: str = "",
    max_loss_ratio: float = 0.0,
    storage: Storage | None = None,
    experts: list[str] | None = None,
    gate_overrides: str = "",
) -> FleetSpec:
    """The fleet this run builds: the spec (given as JSON, or read from a URI), the run's
    parameters applied, in a step compiled for a cluster profile (``$LORAFLEET_PROFILE``)
    its serving block as that profile sees it, and every data file's SHA-256 filled in.

    The digests key the data steps on the files' content: an edited seed file on a volume
    or in a bucket reruns validation and everything after it, an unchanged one nothing.

    Args:
        spec_json: the spec as compiled into the run (``spec_to_json``).
        spec_uri: a fleet YAML in a store (``s3://``, ``gs://``, ``pvc://``); wins over
            ``spec_json`` when set.
        base_model: replaces ``base.model`` when set.
        base_revision: replaces ``base.revision`` when set.
        max_loss_ratio: replaces every expert's ``gate.max_loss_ratio`` when above 0.
        storage: where the spec and data files are read (default: from the environment).
        experts: fill in only these experts' digests (default: every expert's).
        gate_overrides: a JSON object of gate settings per expert, e.g.
            ``{"job-analyzer": {"max_loss_ratio": 0.9, "min_metrics": {"json_valid": 0.5}}}``;
            applied after ``max_loss_ratio``.

    Raises:
        SpecError: naming the run parameter (or the spec field) that is wrong.
        StorageError: if the spec or a data file cannot be read.
    """
    from pydantic import ValidationError

    from lorafleet.errors import SpecError, first_problem
    from lorafleet.fleet import PROFILE_ENV, load_fleet, spec_from_json

    storage = storage or Storage()
    if spec_uri:
        with tempfile.TemporaryDirectory() as tmp:
            local = Path(tmp) / "fleet.yaml"
            local.write_text(storage.read_text(spec_uri), encoding="utf-8")
            try:
                spec = load_fleet(local, check_files=False)
            except SpecError as error:  # name the URI, not the temporary copy
                raise SpecError(
                    spec_uri, error.line, error.field, error.message, error.more
                ) from None
    elif spec_json:
        spec = spec_from_json(spec_json)
    else:
        raise SpecError("pipeline", None, "spec_json", "give spec_json or spec_uri")
    raw = json.loads(spec.model_dump_json(by_alias=True))
    given = {"base_model": base_model, "base_revision": base_revision}
    if base_model:
        raw["base"]["model"] = base_model
    if base_revision:
        raw["base"]["revision"] = base_revision
    if max_loss_ratio > 0:
        given["max_loss_ratio"] = max_loss_ratio
        for e in raw["experts"]:
            e["gate"]["max_loss_ratio"] = max_loss_ratio
    if gate_overrides.strip():
        given["gate_overrides"] = gate_overrides
        _override_gates(raw, gate_overrides)
    try:
        spec = FleetSpec.model_validate(raw)
    except ValidationError as exc:
        set_ = ", ".join(f"{k}={v!r}" for k, v in given.items() if v)
        raise SpecError(
            "pipeline parameters", None, set_ or "spec", first_problem(exc, "spec")
        ) from None
    profile = os.environ.get(PROFILE_ENV)
    if profile:  # a compiled pipeline's step: serving as its cluster profile sees it
        try:
            spec = spec.on_profile(profile)
        except ValidationError as exc:
            raise SpecError(
                f"${PROFILE_ENV}", None, "serving", first_problem(exc, "serving.")
            ) from None
    for e in spec.experts:
        if experts is not None and e.name not in experts:
            continue
        for field in DATA_FIELDS:
            if getattr(e, f"{field}_sha256") is None:
                setattr(e, f"{field}_sha256", _digest(storage, getattr(e, field)))
    return spec


def _override_gates(raw: dict, text: str) -> None:
    """Merge the ``gate_overrides`` run parameter into the experts' gates of ``raw``.

    Raises:
        SpecError: naming the parameter, for text that is not a JSON object of objects or
            an expert the spec does not have.
    """
    from lorafleet.errors import SpecError

    def refuse(why: str) -> SpecError:
        return SpecError("pipeline parameters", None, "gate_overrides", why)

    try:
        overrides = json.loads(text)
    except json.JSONDecodeError as exc:
        raise refuse(f"not JSON: {exc.msg} at character {exc.pos}") from None
    if not isinstance(overrides, dict) or not all(isinstance(v, dict) for v in overrides.values()):
        raise refuse('expected {"EXPERT": {"GATE_FIELD": VALUE, ...}, ...}')
    gates = {e["name"]: e["gate"] for e in raw["experts"]}
    for name, fields in overrides.items():
        if name not in gates:
            raise refuse(f"no expert named {name!r}; the spec has {', '.join(gates)}")
        gates[name].update(fields)


def _digest(storage: Storage, location: str) -> str:
    """SHA-256 of a data file; a path this step cannot see is named as what it likely is."""
    from lorafleet.errors import StorageError

    try:
        return storage.digest(location)
    except StorageError:
        where = parse_location(location)
        if where.scheme != "file" or Path(where.uri).exists():
            raise
        raise StorageError(
            location,
            "no such file where this step runs: a path on the submitting machine? A "
            "pipeline step reads data from its object store or volumes: stage it with "
            "`lorafleet spec stage` (lorafleet submit does it for you)",
        ) from None


def build_base(spec: FleetSpec, storage: Storage | None = None) -> str:
    """The base model to fine-tune: the cached demo build, or the spec's path / hub id.

    Args:
        spec: the fleet; the demo base pre-trains on its experts' seed data.
        storage: where seed data in a store is read through (default: from the environment).
    """
    if spec.base.model != "demo":
        return spec.base.model
    from lorafleet.base import DemoBaseConfig, build_demo_base

    storage = storage or Storage()
    with tempfile.TemporaryDirectory() as tmp:
        # Pre-train on the seeds' plain text only: never on eval sets, never in chat format.
        texts = [
            m.content
            for i, e in enumerate(spec.experts)
            for r in _records(fetch_data(e, "seed_data", Path(tmp) / str(i), storage))
            for m in r.messages
            if m.role != "system"
        ]
    return str(build_demo_base(texts, DemoBaseConfig(**spec.base.demo.model_dump())))


def validate_stage(
    expert: ExpertSpec,
    seeds_out: str | Path,
    eval_out: str | Path,
    report_out: str | Path,
    html_out: str | Path | None = None,
    storage: Storage | None = None,
) -> dict:
    """Validate the expert's seed and eval files; copy them on only if both pass.

    Files in a store (``s3://``, ``gs://``, ``pvc://``) are read through the storage layer,
    and every file whose digest the spec gives (``seed_data_sha256``, ``eval_data_sha256``)
    must have it. The copies are PII-scrubbed when the expert's policy is ``scrub``. The
    structured result goes to ``report_out`` (JSON) and, if given, a self-contained page to
    ``html_out``.

    Args:
        expert: the expert.
        seeds_out: the validated seed records (JSONL).
        eval_out: the validated eval records (JSONL).
        report_out: the validation result (JSON).
        html_out: the validation report page.
        storage: where data in a store is read through (default: from the environment,
            e.g. ``AWS_ENDPOINT_URL_S3`` and ``LORAFLEET_PVC_MOUNTS`` set by the pipeline).

    Raises:
        DataError: naming the first bad file (as the spec names it), line and rule, or a
            digest mismatch.
        StorageError: if a file in a store cannot be read.
    """
    from lorafleet.data.pii import scrub_record
    from lorafleet.data.report import validation_html, validation_markdown
    from lorafleet.data.validate import validate_file

    storage = storage or Storage()
    progress.emit(expert.name, "validate")
    with tempfile.TemporaryDirectory() as tmp:
        files = {f: fetch_data(expert, f, tmp, storage) for f in DATA_FIELDS}
        reports = []
        for field, path in files.items():
            shown = getattr(expert, field)  # findings name the file as the spec does
            try:
                report = validate_file(path, expert.task_definition, expert.data)
            except DataError as error:
                raise DataError(shown, error.line, error.rule, error.detail) from None
            report.file = shown
            reports.append(report)
        summary = {"expert": expert.name, "files": [r.to_dict() for r in reports]}
        atomic_write_json(report_out, summary)
        if html_out is not None:
            atomic_write_text(html_out, validation_html(reports, f"Data validation: {expert.name}"))
        for r in reports:
            r.raise_for_failures()
        for src, dst in ((files["seed_data"], seeds_out), (files["eval_data"], eval_out)):
            records = _records(src)
            if expert.data.pii == "scrub":
                records = [scrub_record(r)[0] for r in records]
            dump_records(dst, records)
    summary["markdown"] = validation_markdown(reports)
    rows = {field: r.rows for field, r in zip(files, reports, strict=True)}
    progress.emit(
        expert.name,
        "validate",
        f"{rows['seed_data']} seed, {rows['eval_data']} eval records valid",
        done=True,
    )
    return summary


WORK_STORE_ENV = "LORAFLEET_WORK_STORE"
"""Where a pipeline step keeps work it can resume (set per profile from its object store)."""
SYNC_EVERY_S = 20.0


def synthesize_stage(
    expert: ExpertSpec,
    seeds: str | Path,
    out: str | Path,
    work_dir: str | Path | None = None,
    shard_index: int = 0,
    shard_count: int = 1,
    storage: Storage | None = None,
) -> dict:
    """Expand the seeds (or one shard of them) with the expert's generator.

    A teacher run keeps its finished answers in its work directory and resumes from them.
    In a pipeline step, whose disk is gone when it is retried, that directory lives in the
    profile's object store (``$LORAFLEET_WORK_STORE``): it is read back at the start, written
    every :data:`SYNC_EVERY_S` seconds and at the end, keyed by the expert, the synthesis
    settings, the task and the seeds, so a retried step (or a rerun of the same run) asks
    the teacher only what it has not answered yet.

    Args:
        expert: the expert.
        seeds: all seed records.
        out: the synthetic records (JSONL).
        work_dir: the teacher's resumable shards (default: in the work store when one is
            set, else ``<out>.work`` beside ``out``).
        shard_index: which shard of the seeds to expand (round-robin, see :mod:`lorafleet.data.shard`).
        shard_count: how many shards the seeds are dealt into; teacher prompts still sample
            examples from all seeds, so the shards together equal one unsharded run.
        storage: where the work store is (default: from the environment).
    """
    from lorafleet.data.shard import split_records

    records = _records(seeds)
    shard = split_records(records, shard_count)[shard_index]
    progress.emit(expert.name, "synthesize", f"shard {shard_index + 1}/{shard_count}")
    store = os.environ.get(WORK_STORE_ENV, "").strip()
    if work_dir is None and store and expert.synthesis.generator == "teacher":
        key = sha256_json(
            [
                json.loads(expert.synthesis.model_dump_json()),
                expert.task_definition.digest(),
                [r.to_json() for r in records],
            ]
        )[:20]
        remote = f"{store.rstrip('/')}/synthesize/{expert.name}/{key}/shard-{shard_index}"
        result = _synthesize_resumable(expert, shard, records, remote, storage or Storage())
    else:
        from lorafleet.data.synth import synthesize

        result = synthesize(
            shard,
            expert.synthesis,
            expert.task_definition,
            expert.data,
            work_dir or Path(str(out) + ".work"),
            pool=records,
        )
    dump_records(out, result.records)
    progress.emit(
        expert.name,
        "synthesize",
        f"shard {shard_index + 1}/{shard_count}: {len(result.records)} synthetic records",
        done=True,
    )
    return {**result.stats, "shard": f"{shard_index + 1}/{shard_count}"}


def _synthesize_resumable(
    expert: ExpertSpec, shard: list[Record], pool: list[Record], remote: str, storage: Storage
):
    """Teacher synthesis whose work directory is kept at ``remote`` in a store."""
    from lorafleet.data.synth import synthesize

    with tempfile.TemporaryDirectory(prefix="lorafleet-synth-") as tmp:
        local = Path(tmp) / "work"
        if storage.list_prefix(remote):
            storage.download_tree(remote, local)
            log.info("%s: resuming synthesis from %s", expert.name, remote)
        last = [time.monotonic()]

        def sync() -> None:
            if local.is_dir() and any(local.iterdir()):
                storage.upload_tree(local, remote)

        def on_job() -> None:
            if time.monotonic() - last[0] >= SYNC_EVERY_S:
                last[0] = time.monotonic()
                sync()

        try:
            return synthesize(
                shard,
                expert.synthesis,
                expert.task_definition,
                expert.data,
                local,
                on_job=on_job,
                pool=pool,
            )
        finally:
            sync()  # what was answered survives a failure, for the retry


def shard_indices(expert: ExpertSpec) -> list[int]:
    """The data shards of an expert, ``[0, ..., synthesis.shards - 1]`` (what the pipeline fans out over)."""
    return list(range(expert.synthesis.shards))


def curate_shard_stage(
    expert: ExpertSpec,
    seeds: str | Path,
    synthetic: str | Path,
    eval_set: str | Path,
    out_dir: str | Path,
    shard_index: int = 0,
) -> dict:
    """The per-row half of curation for one shard: this shard's seeds and its synthetic rows.

    Args:
        expert: the expert (``synthesis.shards`` is the shard count).
        seeds: all seed records; the shard takes its round-robin share.
        synthetic: this shard's synthetic records (the synthesize step of the same shard).
        eval_set: the held-out records.
        out_dir: where the prepared shard goes (a directory, see :class:`PreparedShard`).
        shard_index: which shard this is.
    """
    from lorafleet.data.curate import prepare_shard
    from lorafleet.data.shard import split_records

    progress.emit(expert.name, "curate", f"shard {shard_index + 1}/{expert.synthesis.shards}")
    seed_records = _records(seeds)
    human = split_records(seed_records, expert.synthesis.shards)[shard_index]
    prepared = prepare_shard(
        human,
        _records(synthetic),
        _records(eval_set),
        expert.curation,
        expert.data.pii,
        seed_ids=[r.id for r in seed_records],
        shard=shard_index,
    )
    prepared.save(out_dir)
    return {
        "shard": f"{shard_index + 1}/{expert.synthesis.shards}",
        "rows": len(prepared.rows),
        **prepared.counts,
    }


def select_stage(
    expert: ExpertSpec, prepared: list[str | Path], eval_set: str | Path, out: str | Path
) -> dict:
    """The one-pass half of curation over every prepared shard; stats with fingerprints."""
    from lorafleet.data.curate import PreparedShard, select_rows

    result = select_rows(
        [PreparedShard.load(p) for p in prepared],
        expert.curation,
        expert.synthesis.max_synthetic_ratio,
        pii=expert.data.pii,
        n_eval=len(_records(eval_set)),
    )
    dump_records(out, result.records)
    out_counts = result.stats.get("output", {})
    progress.emit(
        expert.name,
        "curate",
        f"kept {len(result.records)} records ({out_counts.get('human', '?')} human, "
        f"{out_counts.get('synthetic', '?')} synthetic)",
        done=True,
    )
    return {**result.stats, "train_sha256": sha256_file(out), "eval_sha256": sha256_file(eval_set)}


def _train_progress(expert: str, every_s: float = 2.0):
    """An ``on_step`` that reports the step and loss, at most every ``every_s`` seconds."""
    last = [0.0]

    def on_step(step: int, total: int, loss: float) -> None:
        now = time.monotonic()
        if now - last[0] >= every_s or step == total:
            last[0] = now
            progress.emit(expert, "train", f"step {step}/{total} loss {loss:.3f}")

    return on_step


def train_stage(
    expert: ExpertSpec,
    base_dir: str,
    train_set: str | Path,
    adapter_out: str | Path,
    on_step=None,
    kube_api=None,
    base: BaseSpec | None = None,
) -> dict:
    """Fine-tune the expert's adapter where ``training.launcher`` says.

    ``local``: in this process; ``torchrun``: ``gpus_per_node`` DDP ranks on this machine;
    ``trainjob``: a Kubeflow TrainJob (or PyTorchJob) on ``nodes`` nodes, followed until it
    ends, its status changes in this step's log (:func:`lorafleet.train.cluster.run_on_cluster`).

    Args:
        kube_api: the ``kubernetes`` ApiClient for ``trainjob`` (default: from the
            kubeconfig or the pod's service account).
        base: the spec's base (its ``revision`` and ``dtype`` go to every launcher).
    """
    training = expert.training
    progress.emit(expert.name, "train", training.launcher)
    if training.launcher == "local":
        from lorafleet.train.recipe import train_adapter

        result = train_adapter(
            base_dir,
            _records(train_set),
            expert.lora,
            training,
            adapter_out,
            on_step=on_step or _train_progress(expert.name),
            revision=base.revision if base else None,
            dtype=base.dtype if base else "auto",
        ).to_dict()
        losses = result.get("losses") or []
        if losses:
            progress.emit(
                expert.name, "train", f"loss {losses[0]:.3f} -> {losses[-1]:.3f}", done=True
            )
        return result
    from lorafleet.train.job import TrainJobConfig

    job = TrainJobConfig(
        base_dir=str(base_dir),
        train_set=str(train_set),
        output_dir=str(adapter_out),
        lora=expert.lora,
        training=training,
        base_revision=base.revision if base else None,
        base_dtype=base.dtype if base else "auto",
    )
    if training.launcher == "torchrun":
        from lorafleet.train.launch import run_torchrun

        return run_torchrun(job, training.gpus_per_node)
    from lorafleet.train.cluster import run_on_cluster

    return run_on_cluster(
        expert.name,
        base_dir,
        train_set,
        adapter_out,
        job,
        training,
        api=kube_api,
        hub_token_secret=base.hub_token_secret if base else None,
    )


def production_adapter(
    spec: FleetSpec, expert: ExpertSpec, base_dir: str, work_dir: str | Path
) -> dict | None:
    """The expert's production adapter from the registry, if it was trained on this base.

    Works for every registry location: a local or ``pvc://`` registry's version folder is
    used where it is, a remote one (``s3://``, ``gs://``) is downloaded into ``work_dir``.

    Returns:
        The production version's registry entry with ``path``, a local directory holding
        its files; ``None`` when there is no production version, or (with a warning) when
        it was trained on another base.

    Raises:
        StorageError: if the registry cannot be read.
    """
    from lorafleet.base import fingerprint_model
    from lorafleet.registry import Registry

    registry = Registry(spec.registry.uri)
    entry = registry.production(expert.name)
    if entry is None:
        return None
    if entry.get("base_fingerprint") != fingerprint_model(base_dir, spec.base.revision):
        log.warning(
            "%s: production %s was trained on another base; not compared",
            expert.name,
            entry["version"],
        )
        return None
    return {**entry, "path": str(registry.local_dir(expert.name, entry["version"], work_dir))}


def evaluate_stage(
    spec: FleetSpec,
    expert: ExpertSpec,
    base_dir: str,
    adapter_dir: str | Path,
    eval_set: str | Path,
) -> dict:
    """Evaluate the candidate, the base model and production with the same evaluators.

    Generation goes through the runtime's own batched code path (:class:`Generator`), or,
    for a base one device cannot hold (the gate's ``engine``:
    :func:`~lorafleet.evaluate.vllm_engine.pick_engine`), through vLLM with the serving
    pod's tensor parallelism (``serving.gpus``) and rank limit (``serving.max_lora_rank``).
    The production adapter (from the registry) is evaluated on the same records when
    one exists, so the gate can refuse a regression; the gate's judge, when set, compares
    the candidate's answers with production's (else the base model's).
    """
    import contextlib

    from lorafleet.chat import prompt_messages
    from lorafleet.engine.generation import Generator
    from lorafleet.evaluate.suite import evaluate_candidate
    from lorafleet.evaluate.vllm_engine import pick_engine

    judge = expert.gate.judge
    if judge is not None:  # in seconds, before any answer is generated
        from lorafleet.llm import EndpointNames, preflight

        preflight(judge.base_url, EndpointNames.spec("gate.judge"), judge.api_key_env)
    records = _records(eval_set)
    task = spec.task_of(expert)
    engine = pick_engine(expert.gate.engine, spec.serving)
    progress.emit(expert.name, "evaluate", f"{len(records)} records ({engine})")
    with tempfile.TemporaryDirectory(prefix="lorafleet-production-") as work_dir:
        production = production_adapter(spec, expert, base_dir, work_dir)
        adapters = {"candidate": adapter_dir}
        if production:
            adapters["production"] = production["path"]
        if engine == "vllm":
            from lorafleet.evaluate.vllm_engine import VllmEvalEngine
            from lorafleet.serve.vllm_front import VllmProcess

            runner = VllmEvalEngine(
                base_dir,
                adapters,
                VllmProcess,
                tensor_parallel_size=max(1, spec.serving.gpus),
                max_lora_rank=spec.serving.max_lora_rank,
                dtype=spec.base.dtype,
                revision=spec.base.revision,
            )
        else:
            runner = contextlib.nullcontext(
                Generator(base_dir, adapters, dtype=spec.base.dtype, revision=spec.base.revision)
            )
        arms = {"candidate": "candidate", "base": None} | (
            {"production": "production"} if production else {}
        )
        with runner as generator:
            report = evaluate_candidate(
                generator, records, task, arms, expert.max_new_tokens, expert.gate.judge
            )
    primary = task.primary
    progress.emit(
        expert.name,
        "evaluate",
        f"{primary} base {report['metrics_base'].get(primary)} -> candidate "
        f"{report['metrics_candidate'].get(primary)}",
        done=True,
    )
    return {
        "expert": expert.name,
        "task": expert.task,
        "task_digest": task.digest(),
        "primary_metric": task.primary,
        "primary_direction": task.direction(task.primary),
        "probe": prompt_messages(records[0].messages),
        "production_version": production["version"] if production else None,
        "evaluation_engine": engine,
        **report,
    }


def gate_stage(expert: ExpertSpec, evaluation: dict, train: dict, curation: dict) -> dict:
    """Decide, and fold everything known about the candidate into one report."""
    from lorafleet.gate import decide

    production = None
    if evaluation.get("production_version"):
        production = {
            "version": evaluation["production_version"],
            "eval_loss": evaluation["eval_loss_production"],
            "metrics": evaluation["metrics_production"],
        }
    decision = decide(
        expert.gate,
        evaluation["eval_loss_base"],
        evaluation["eval_loss_candidate"],
        evaluation["metrics_candidate"],
        production,
        evaluation.get("judge"),
        lower_is_better=[
            m.reported for m in expert.task_definition.metrics if m.direction == "lower"
        ],
    )
    from lorafleet.report import gate_line

    report = {
        **evaluation,
        "gate_passed": decision.passed,
        "gate_reasons": decision.reasons,
        "gate_rules": decision.to_dict()["rules"],
        "train": {
            k: train[k]
            for k in ("steps", "epochs_run", "train_tokens", "wall_s", "tokens_per_s", "losses")
        },
        "curation": curation,
    }
    report["gate_summary"] = gate_line(report)
    progress.emit(expert.name, "gate", report["gate_summary"], done=True)
    return report


def _model_card(expert: ExpertSpec, report: dict, base: str, version: str) -> str:
    metrics = "\n".join(
        f"| {k} | {report['metrics_base'].get(k)} | {v} |"
        for k, v in report["metrics_candidate"].items()
    )
    return (
        f"# {expert.name} {version}\n\nLoRA adapter for the `{expert.task}` task on base `{base}`.\n\n"
        f"- held-out loss: base {report['eval_loss_base']}, this adapter {report['eval_loss_candidate']}\n"
        f"- LoRA: r={expert.lora.r}, alpha={expert.lora.alpha}, targets={expert.lora.target_modules}\n"
        f"- trained on {report['curation']['output']['total']} records "
        f"({report['curation']['output']['human']} human, {report['curation']['output']['synthetic']} synthetic)\n\n"
        f"| metric | base | adapter |\n|---|---|---|\n{metrics}\n\n## Gate\n\n"
        + "\n".join(f"- {r}" for r in report["gate_reasons"])
        + "\n\nLoads in PEFT, vLLM (`--lora-modules`) and the lorafleet runtime.\n"
    )


def register_stage(
    spec: FleetSpec, expert: ExpertSpec, base: str, adapter_dir: str | Path, report: dict
) -> dict:
    """Register a candidate that passed its gate; returns the expert's outcome.

    The version's files also go to ``serving.adapter_store/<expert>/<version>`` when the
    spec sets an adapter store (what the rendered InferenceService reads). The version
    becomes production here only when no canary will judge it: with ``canary.handoff:
    none``, or when the expert had no production version to compare with (the deploy step
    puts no first version on a canary). Otherwise production moves when the canary is
    promoted (:mod:`lorafleet.rollout.deploy`).

    Returns:
        The gate report with ``adapter_uri`` (where serving reads the version),
        ``adapter_version``, ``registered`` and ``became_production``.
    """
    from lorafleet.base import fingerprint_model
    from lorafleet.registry import Registry

    if not report["gate_passed"]:
        raise ValueError(f"{expert.name}: refusing to register a candidate that failed its gate")
    lineage = {
        "base": {
            "model": spec.base.model if spec.base.model != "demo" else base,
            "fingerprint": fingerprint_model(base, spec.base.revision),
        },
        "data": {
            "train_sha256": report["curation"]["train_sha256"],
            "eval_sha256": report["curation"]["eval_sha256"],
        },
        "config": json.loads(expert.model_dump_json()),
        "config_fingerprint": sha256_json(json.loads(expert.model_dump_json())),
        "task": {
            "name": expert.task,
            "digest": expert.task_definition.digest(),
            "definition": json.loads(expert.task_definition.model_dump_json(by_alias=True)),
        },
        "metrics": {
            "eval_loss_base": report["eval_loss_base"],
            "eval_loss_candidate": report["eval_loss_candidate"],
            **{f"candidate.{k}": v for k, v in report["metrics_candidate"].items()},
        },
        "gate": report["gate_rules"],
    }
    registry = Registry(spec.registry.uri)
    entry = registry.register(
        expert.name,
        adapter_dir,
        lineage,
        lambda version: _model_card(expert, report, base, version),
        adapter_store=spec.serving.adapter_store or None,
    )
    canary = spec.canary.handoff != "none" and bool(report.get("production_version"))
    if not canary:
        registry.set_production(expert.name, entry["version"])
    role = "awaits its canary" if canary else "production"
    progress.emit(expert.name, "registered", f"{entry['version']} ({role})", done=True)
    return {
        **outcome_of(report),
        "adapter_uri": entry["adapter_uri"],
        "adapter_version": entry["version"],
        "registered": True,
        "became_production": not canary,
    }


OUTCOME_SAMPLE_CHARS = 1000
OUTCOME_LOSS_POINTS = 256


def outcome_of(report: dict) -> dict:
    """The gate report as an expert's outcome: what the fleet report and the rollouts read,
    of a bounded size. Outcomes travel as pipeline parameters (``dsl.OneOf`` of
    parameters), which the executor passes on a command line: one argument holds at most
    128 KiB on Linux, and a fleet's outcomes share it. The whole report stays the gate
    step's artifact; here the per-evaluator ``results_*`` (a second copy of the metrics
    and samples) and the base's and production's samples are left out, the candidate's
    samples are cut to :data:`OUTCOME_SAMPLE_CHARS` and the loss curve thinned to
    :data:`OUTCOME_LOSS_POINTS` points (its first and last kept)."""
    out = {
        k: v
        for k, v in report.items()
        if not k.startswith("results_") and k not in ("samples_base", "samples_production")
    }
    out["samples_candidate"] = [
        s[:OUTCOME_SAMPLE_CHARS] for s in report.get("samples_candidate") or []
    ]
    train = report.get("train")
    losses = (train or {}).get("losses") or []
    if len(losses) > OUTCOME_LOSS_POINTS:
        step = (len(losses) - 1) / (OUTCOME_LOSS_POINTS - 1)
        thinned = [losses[round(i * step)] for i in range(OUTCOME_LOSS_POINTS)]
        out["train"] = {**train, "losses": thinned, "loss_points_of": len(losses)}
    return out


def reject_stage(report: dict) -> dict:
    """The outcome of a candidate that failed its gate, or of an expert whose stage failed
    (the report carries its ``failure``): nothing is registered."""
    if not report.get("failure"):
        progress.emit(report.get("expert", "?"), "rejected", "nothing registered", done=True)
    return {
        **outcome_of(report),
        "adapter_uri": None,
        "adapter_version": None,
        "registered": False,
        "became_production": False,
    }
