"""The fleet spec: one YAML file that drives local runs, compiled pipelines and serving.

Load it with :func:`load_fleet`; every mistake becomes a :class:`~lorafleet.errors.SpecError`
that names the file, the line and the field (``FILE:LINE: field.path: message``).
"""

from __future__ import annotations

import copy
import itertools
import re
import string
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from lorafleet.errors import SpecError

__all__ = [
    "PIPELINE_STEPS",
    "TASKS",
    "BaseSpec",
    "CanaryAnalysis",
    "CanaryJudge",
    "CanaryPolicy",
    "DataRules",
    "ExpertSpec",
    "FleetSpec",
    "GateJudge",
    "GatePolicy",
    "JudgeSettings",
    "LoraSettings",
    "PipelineSpec",
    "PlatformProfile",
    "PvcMount",
    "RegistrySpec",
    "SecretEnv",
    "ServingAutoscaling",
    "ServingSpec",
    "ServingStorage",
    "StepPlatform",
    "SynthesisSettings",
    "TeacherSettings",
    "Toleration",
    "TrainCluster",
    "TrainingSettings",
    "check_task",
    "load_fleet",
    "spec_from_json",
    "spec_to_json",
]

# Tasks with dedicated metrics and synthesis rules; "chat" is any other conversational expert.
TASKS = (
    "proposal-writer",
    "job-analyzer",
    "profile-reviewer",
    "candidate-evaluator",
    "job-post-writer",
    "chat",
)


def check_task(v: str) -> str:
    """A pydantic field check: ``v`` must be one of :data:`TASKS`."""
    if v not in TASKS:
        raise ValueError(f"unknown task {v!r}; known: {', '.join(TASKS)}")
    return v


SLUG = r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$"  # a DNS-1123 label: names become k8s objects


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class DemoBaseSettings(_Strict):
    """Shape of the demo base model built when ``base.model`` is ``demo``."""

    vocab_size: int = Field(4096, ge=300, le=65536)
    hidden_size: int = Field(256, ge=32)
    num_layers: int = Field(4, ge=1)
    num_heads: int = Field(4, ge=1)
    num_kv_heads: int = Field(2, ge=1)
    intermediate_size: int = Field(704, ge=32)
    pretrain_steps: int = Field(300, ge=0)
    pretrain_seq_len: int = Field(256, ge=16)
    seed: int = 0

    @model_validator(mode="after")
    def _heads(self) -> DemoBaseSettings:
        if self.hidden_size % self.num_heads:
            raise ValueError("hidden_size must be divisible by num_heads")
        if self.num_heads % self.num_kv_heads:
            raise ValueError("num_heads must be divisible by num_kv_heads")
        return self


class BaseSpec(_Strict):
    """The shared base model."""

    model: str = Field("demo", description="'demo', a local model directory, or a hub id")
    revision: str | None = Field(None, description="hub revision to pin (commit sha or tag)")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    demo: DemoBaseSettings = Field(default_factory=DemoBaseSettings)


class DataRules(_Strict):
    """Validation bounds for an expert's records."""

    min_chars: int = Field(1, ge=1, description="shortest allowed message content")
    max_chars: int = Field(8000, ge=1, description="longest allowed message content")
    max_total_chars: int = Field(24000, ge=1, description="longest allowed conversation")
    max_line_bytes: int = Field(1 << 20, ge=256, description="longest allowed JSONL line, in bytes")
    pii: Literal["scrub", "reject", "off"] = Field(
        "scrub",
        description="e-mails, phones, payment details, off-platform asks: replace with [KIND] or refuse",
    )

    @model_validator(mode="after")
    def _bounds(self) -> DataRules:
        if self.min_chars > self.max_chars:
            raise ValueError("min_chars must not exceed max_chars")
        return self


class TeacherSettings(_Strict):
    """A teacher LLM behind any OpenAI-compatible endpoint (vLLM on KServe, a hosted API)."""

    base_url: str = Field(
        description="the API root, e.g. http://teacher/openai/v1 (it ends before /chat/completions)"
    )
    model: str = Field(min_length=1, description="the served model name")
    api_key_env: str | None = Field(
        "OPENAI_API_KEY", description="environment variable holding the API key"
    )
    api_key_file: Path | None = Field(
        None,
        description="a file holding the key (a mounted Kubernetes secret); wins over api_key_env",
    )
    concurrency: int = Field(4, ge=1, le=256, description="requests in flight at once")
    timeout_s: float = Field(120.0, gt=0, description="per request")
    max_retries: int = Field(
        4, ge=0, le=20, description="retries of a failed request (timeouts, 429, 5xx)"
    )
    backoff_s: float = Field(1.0, ge=0, description="first retry delay; doubles each retry")
    max_tokens: int = Field(1024, ge=1, description="completion budget per request")
    temperature: float = Field(0.8, ge=0, le=2)
    examples_per_prompt: int = Field(
        2, ge=1, le=8, description="seed records shown to the teacher per request"
    )


class JudgeSettings(_Strict):
    """An LLM judge that scores each generated record on a rubric; low scores are dropped."""

    model: str | None = Field(
        None, description="the judge's served model name (default: the teacher's)"
    )
    min_score: int = Field(
        4, ge=1, le=5, description="keep records the judge scores at least this (1-5)"
    )


class SynthesisSettings(_Strict):
    """How the gold seeds are expanded."""

    generator: Literal["programmatic", "teacher", "none"] = "programmatic"
    per_seed: int = Field(2, ge=0, le=100, description="synthetic variants per seed record")
    seed: int = 0
    max_synthetic_ratio: float = Field(4.0, ge=0, description="cap on synthetic:human rows")
    shards: int = Field(
        1,
        ge=1,
        le=256,
        description="parallel pipeline tasks that synthesize and prepare (PII, overlap, MinHash) a share of the seeds each",
    )
    teacher: TeacherSettings | None = Field(
        None, description="required when generator is 'teacher'"
    )
    judge: JudgeSettings | None = Field(
        None, description="optional filter for the teacher's records"
    )

    @model_validator(mode="after")
    def _teacher(self) -> SynthesisSettings:
        if self.generator == "teacher" and self.teacher is None:
            raise ValueError("generator 'teacher' needs a teacher block (base_url, model)")
        if self.judge is not None and self.teacher is None:
            raise ValueError("judge needs a teacher block: it calls the teacher's endpoint")
        return self


class CurationSettings(_Strict):
    """Dedup and decontamination."""

    # 13-grams (as in the GPT-3 decontamination study): long enough that shared
    # boilerplate (JSON keys, post templates) never matches, short enough to catch copies.
    decontaminate_ngram: int = Field(
        13, ge=3, le=50, description="word n-gram shared with eval => drop"
    )
    near_dup_threshold: float = Field(
        0.9,
        gt=0,
        le=1,
        description="estimated Jaccard similarity at which a row is a near-duplicate (1 = exact only)",
    )
    minhash_num_perm: int = Field(
        128, ge=16, le=1024, description="MinHash permutations: more = sharper estimate, slower"
    )
    shingle_words: int = Field(5, ge=1, le=20, description="words per MinHash shingle")


class LoraSettings(_Strict):
    """PEFT LoRA hyper-parameters."""

    r: int = Field(8, ge=1, le=256)
    alpha: int = Field(16, ge=1, description="usually 2 x r")
    dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: list[str] | Literal["all-linear"] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"]
    )
    use_rslora: bool = False
    use_dora: bool = False
    qlora: bool = Field(
        False, description="load the base in 4-bit (needs a CUDA GPU and bitsandbytes)"
    )


class TrainingSettings(_Strict):
    """The LoRA training recipe's knobs."""

    epochs: int = Field(3, ge=1)
    max_steps: int | None = Field(None, ge=1, description="stop after this many optimizer steps")
    learning_rate: float = Field(2e-3, gt=0)
    batch_size: int = Field(8, ge=1)
    grad_accum: int = Field(1, ge=1)
    warmup_ratio: float = Field(0.1, ge=0, lt=1)
    weight_decay: float = Field(0.0, ge=0)
    max_seq_len: int = Field(768, ge=16)
    seed: int = 0
    packing: bool = Field(
        False, description="pack several examples per row (batch_size counts rows)"
    )
    gradient_checkpointing: bool = Field(
        False, description="recompute activations: less memory, ~30% slower"
    )
    checkpoint_every: int | None = Field(
        None, ge=1, description="save a resumable checkpoint every N steps"
    )
    keep_checkpoints: int = Field(2, ge=1, description="how many recent checkpoints to keep")
    # Where the trainer runs (docs/training.md): the recipe is the same everywhere.
    launcher: Literal["local", "torchrun", "trainjob"] = Field(
        "local",
        description="local: in process; torchrun: gpus_per_node ranks here (DDP); trainjob: a Kubeflow job on nodes x gpus_per_node",
    )
    nodes: int = Field(
        1, ge=1, description="nodes of a trainjob (more than 1 only with launcher trainjob)"
    )
    gpus_per_node: int = Field(
        1, ge=1, description="ranks per node: GPUs, or CPU processes without GPUs"
    )
    cluster: TrainCluster | None = Field(
        None, description="the Kubernetes side of launcher trainjob"
    )

    @model_validator(mode="after")
    def _launcher(self) -> TrainingSettings:
        if self.nodes > 1 and self.launcher != "trainjob":
            raise ValueError("nodes > 1 needs launcher: trainjob (one pod cannot span nodes)")
        if self.launcher == "trainjob" and self.cluster is None:
            raise ValueError("launcher trainjob needs a cluster block (image, namespace, volume)")
        return self


class TrainCluster(_Strict):
    """Where a ``trainjob`` runs: a Kubeflow Trainer TrainJob, or a PyTorchJob where Trainer is absent."""

    image: str = Field(
        min_length=1, description="container image with lorafleet installed (components/Dockerfile)"
    )
    namespace: str = Field("lorafleet", pattern=SLUG, description="namespace of the job")
    runtime: str = Field(
        "torch-distributed", min_length=1, description="the TrainJob's ClusterTrainingRuntime"
    )
    volume: PvcMount = Field(
        description="shared PVC holding base, data and outputs; job paths must be under mount_path"
    )
    accelerator: str | None = Field(
        "nvidia.com/gpu",
        description="resource name requested gpus_per_node times per node; null = CPU",
    )
    node_selector: dict[str, str] = Field(
        default_factory=dict, description="node label -> value for the trainer pods"
    )
    tolerations: list[Toleration] = Field(
        default_factory=list, description="e.g. of a GPU node pool's taint"
    )
    service_account: str | None = Field(None, description="ServiceAccount of the trainer pods")
    timeout_s: float = Field(
        24 * 3600, gt=0, description="how long to wait for the job before giving up"
    )


class GateJudge(_Strict):
    """LLM-as-judge, pairwise against production (or the base): any OpenAI-compatible endpoint."""

    base_url: str = Field(description="OpenAI API root, e.g. http://127.0.0.1:8080/openai/v1")
    model: str = Field(description="the judge's served model name")
    api_key_env: str | None = Field(None, description="environment variable that holds the API key")
    min_win_rate_lower_bound: float = Field(
        0.5, ge=0, le=1, description="the win rate's lower confidence bound must be >= this"
    )
    confidence: float = Field(
        0.95, gt=0, lt=1, description="two-sided level of the bootstrap interval"
    )
    resamples: int = Field(1000, ge=100, description="bootstrap resamples (seeded)")
    max_items: int | None = Field(None, ge=1, description="judge only the first N eval records")


class GatePolicy(_Strict):
    """When a candidate may be registered."""

    max_loss_ratio: float = Field(
        0.98, gt=0, description="candidate held-out loss must be <= this x the base model's"
    )
    min_metrics: dict[str, float] = Field(default_factory=dict, description="task metric floors")
    max_loss_regression: float = Field(
        0.01, ge=0, description="candidate loss may exceed production's by at most this fraction"
    )
    max_metric_regression: float = Field(
        0.05, ge=0, description="each task metric may drop below production's by at most this much"
    )
    max_new_tokens: int = Field(96, ge=1, description="generation budget for task metrics")
    judge: GateJudge | None = Field(
        None, description="pairwise LLM judge; its rule applies when set"
    )


class ExpertSpec(_Strict):
    """One task-specific expert."""

    name: str = Field(pattern=SLUG)
    task: str
    seed_data: Path
    eval_data: Path
    data: DataRules = Field(default_factory=DataRules)
    synthesis: SynthesisSettings = Field(default_factory=SynthesisSettings)
    curation: CurationSettings = Field(default_factory=CurationSettings)
    lora: LoraSettings = Field(default_factory=LoraSettings)
    training: TrainingSettings = Field(default_factory=TrainingSettings)
    gate: GatePolicy = Field(default_factory=GatePolicy)

    _task = field_validator("task")(check_task)


class ServingStorage(_Strict):
    """Cluster identity and storage access of the serving pods (see docs/deployment.md)."""

    role_arn: str = Field("", description="aws: IAM role for IRSA (eks.amazonaws.com/role-arn)")
    gcp_service_account: str = Field(
        "", description="gcp: Google service account for Workload Identity"
    )
    s3_endpoint: str = Field(
        "", description="onprem: S3-compatible endpoint (MinIO), e.g. http://minio.minio:9000"
    )
    credentials_secret: str = Field("", description="onprem: Secret with the MinIO/S3 access keys")
    pvc: str = Field("", description="onprem: PVC holding base and adapters (pvc:// URIs)")


class ServingAutoscaling(_Strict):
    """KServe autoscaling knobs of the predictor."""

    min_replicas: int = Field(
        1, ge=1, description="replicas kept running (RawDeployment mode: no scale to zero)"
    )
    max_replicas: int = Field(2, ge=1)
    scale_metric: Literal["concurrency", "rps", "cpu", "memory"] = "concurrency"
    scale_target: int = Field(8, ge=1, description="target value of scale_metric per replica")

    @model_validator(mode="after")
    def _bounds(self) -> ServingAutoscaling:
        if self.min_replicas > self.max_replicas:
            raise ValueError("min_replicas must not exceed max_replicas")
        return self


class ServingSpec(_Strict):
    """How the fleet is served."""

    runtime: Literal["lorafleet", "vllm"] = "lorafleet"
    profile: Literal["local", "aws", "gcp", "onprem"] = "local"
    gpus: int = Field(0, ge=0)
    # = lorafleet.serve.batching.MAX_BATCH_SIZE (not imported: the spec needs no torch).
    max_batch_size: int = Field(64, ge=1)
    max_lora_rank: int = Field(64, ge=1)
    adapter_store: str = Field(
        "", description="s3://, gs://, pvc:// or a directory; empty = registry"
    )
    # Cluster serving (`lorafleet deploy render`); every field has a default for local runs.
    namespace: str = Field(
        "lorafleet", pattern=SLUG, description="namespace of every rendered object"
    )
    base_uri: str = Field(
        "", description="storage URI of the base weights; empty = hf://<base.model>"
    )
    storage: ServingStorage = Field(default_factory=ServingStorage)
    node_selector: dict[str, str] | None = Field(
        None, description="GPU node labels; None = the profile's"
    )
    tolerations: list[Toleration] | None = Field(
        None, description="None = the profile's GPU taints"
    )
    autoscaling: ServingAutoscaling = Field(default_factory=ServingAutoscaling)
    router: bool = Field(
        False, description="put the lorafleet router in front as a KServe transformer"
    )
    canary_traffic_percent: int | None = Field(
        None, ge=0, le=100, description="ISVC revision canary"
    )

    @model_validator(mode="after")
    def _runtime(self) -> ServingSpec:
        if self.runtime == "vllm" and self.gpus < 1:
            raise ValueError("runtime 'vllm' needs gpus >= 1")
        return self


# PromQL templates per canary mode; ``$route``, ``$version`` (the adapter or revision being
# measured), ``$namespace`` and ``$interval`` (e.g. ``30s``) are filled in per query.
ROUTER_QUERIES = {
    "requests": 'sum(increase(lorafleet_requests_total{model="$route",adapter="$version"}[$interval]))',
    # 5xx only: a client's own mistakes (4xx) say nothing about the candidate.
    "error_rate": 'sum(increase(lorafleet_requests_total{model="$route",adapter="$version",status=~"5.."}[$interval]))'
    ' / sum(increase(lorafleet_requests_total{model="$route",adapter="$version"}[$interval]))',
    "p95_latency_ms": "1000 * histogram_quantile(0.95, sum by (le) (increase("
    'lorafleet_request_latency_seconds_bucket{model="$route",adapter="$version"}[$interval])))',
}
# Knative's queue-proxy metrics: a revision canary runs on KServe's Serverless mode.
REVISION_QUERIES = {
    "requests": 'sum(increase(revision_request_count{namespace_name="$namespace",revision_name="$version"}[$interval]))',
    "error_rate": 'sum(increase(revision_request_count{namespace_name="$namespace",revision_name="$version",'
    'response_code_class="5xx"}[$interval])) / sum(increase(revision_request_count{namespace_name="$namespace",'
    'revision_name="$version"}[$interval]))',
    "p95_latency_ms": "histogram_quantile(0.95, sum by (le) (increase(revision_request_latencies_bucket{"
    'namespace_name="$namespace",revision_name="$version"}[$interval])))',
}
QUERY_PLACEHOLDERS = ("route", "version", "namespace", "interval")
# What the rollout fills in when it queries; a template must be valid PromQL with these.
QUERY_SAMPLE = {
    "route": "writer",
    "version": "writer-v2",
    "namespace": "lorafleet",
    "interval": "30s",
}


def check_promql(template: str, where: str) -> None:
    """Parse a query template, placeholders filled, with a PromQL parser (promql-parser,
    the Rust parser GreptimeDB uses), so a malformed query fails when the spec is read,
    not at the first analysis of a live rollout.

    Raises:
        ValueError: ``where``, then the parser's message.
    """
    import promql_parser

    query = string.Template(template).safe_substitute(QUERY_SAMPLE)
    try:
        promql_parser.parse(query)
    except ValueError as exc:
        raise ValueError(f"{where}: not valid PromQL ({exc})") from None


class CanaryJudge(_Strict):
    """An online judge's sampled scores of live answers, as a metric the rollout reads."""

    min_score: float = Field(
        description="the canary's mean judge score per interval must reach this"
    )
    metric: str = Field(
        "lorafleet_judge_score",
        pattern=r"^[a-zA-Z_:][a-zA-Z0-9_:]*$",
        description="router source: a histogram/summary labelled model and adapter (mean = _sum / _count)",
    )
    query: str | None = Field(
        None, description="prometheus source: PromQL template of the mean score"
    )
    min_samples: int = Field(
        1, ge=1, description="fewer scored answers in an interval: inconclusive"
    )


class CanaryAnalysis(_Strict):
    """Where each analysis reads its measurements, and how often."""

    source: Literal["router", "prometheus"] = Field(
        "router",
        description="router: scrape the router's /metrics; prometheus: PromQL over the HTTP API",
    )
    interval_seconds: float = Field(30, gt=0, description="seconds between analyses")
    min_requests: int = Field(
        20, ge=1, description="fewer canary requests in an interval: inconclusive"
    )
    error_limit: int = Field(
        4,
        ge=1,
        description="consecutive analyses that could not measure (source down) before the rollout aborts",
    )
    prometheus_url: str = Field(
        "", description="prometheus source: the server, e.g. http://prometheus.monitoring:9090"
    )
    queries: dict[Literal["requests", "error_rate", "p95_latency_ms"], str] = Field(
        default_factory=dict,
        description="PromQL templates replacing the mode's defaults (docs/rollout.md)",
    )
    judge: CanaryJudge | None = Field(
        None, description="optional: also gate on an online judge's score"
    )

    @model_validator(mode="after")
    def _source(self) -> CanaryAnalysis:
        if self.source == "prometheus" and not self.prometheus_url:
            raise ValueError("source 'prometheus' needs prometheus_url")
        templates = {f"queries.{k}": q for k, q in self.queries.items()}
        if self.judge and self.judge.query:
            templates["judge.query"] = self.judge.query
        for where, template in templates.items():
            unknown = sorted(
                set(re.findall(r"\$\{?([A-Za-z_]\w*)", template)) - set(QUERY_PLACEHOLDERS)
            )
            if unknown:
                raise ValueError(
                    f"unknown placeholder ${unknown[0]}; known: ${', $'.join(QUERY_PLACEHOLDERS)}"
                )
            check_promql(template, where)
        if self.source == "prometheus" and self.judge is not None and not self.judge.query:
            raise ValueError("judge with source 'prometheus' needs judge.query")
        return self


class CanaryPolicy(_Strict):
    """Step-wise traffic shift from production to candidate, judged on metrics (docs/rollout.md)."""

    mode: Literal["router", "revision"] = Field(
        "router",
        description="router: adapter weights in the lorafleet router (other adapters untouched); "
        "revision: the InferenceService's canaryTrafficPercent (KServe Serverless mode)",
    )
    steps: list[int] = Field(default_factory=lambda: [10, 25, 50, 100])
    pause_seconds: int = Field(60, ge=0, description="least time at each step before the next")
    max_error_rate: float = Field(0.01, ge=0, le=1)
    max_p95_latency_ms: float = Field(2000, gt=0)
    failure_limit: int = Field(
        1, ge=1, description="failed analyses that roll the canary back (1: the first)"
    )
    inconclusive_limit: int = Field(
        2, ge=1, description="inconclusive analyses in a row that pause the rollout"
    )
    analysis: CanaryAnalysis = Field(default_factory=CanaryAnalysis)
    handoff: Literal["none", "drive", "controller"] = Field(
        "none",
        description="the pipeline's deploy step: none (no rollout), drive (run it to the end in the step) "
        "or controller (start it; the in-cluster controller drives it)",
    )
    drive_timeout_seconds: int = Field(
        3600, ge=1, description="handoff drive: give up waiting (the rollout stays)"
    )
    router_urls: list[str] = Field(
        default_factory=list,
        description="router mode, deploy step: every router replica's URL, or k8s://NAMESPACE/SERVICE[:PORT] "
        "for a Service's ready pods, found again on every tick (default: the InferenceService's transformer "
        "Service, or its predictor without serving.router, as k8s://)",
    )
    runtime_urls: list[str] = Field(
        default_factory=list,
        description="router mode, deploy step: every lorafleet runtime replica's URL (or k8s:// Service), "
        "where the candidate is loaded (default: the predictor Service's ready pods)",
    )

    @field_validator("steps")
    @classmethod
    def _steps(cls, v: list[int]) -> list[int]:
        if not v or any(b <= a for a, b in itertools.pairwise(v)) or v[-1] != 100 or v[0] <= 0:
            raise ValueError("steps must be increasing percentages in (0, 100], ending at 100")
        return v

    @model_validator(mode="after")
    def _mode(self) -> CanaryPolicy:
        if self.mode == "revision" and self.analysis.source != "prometheus":
            raise ValueError(
                "mode 'revision' needs analysis.source 'prometheus' (the router's metrics are per adapter)"
            )
        return self

    def queries(self) -> dict[str, str]:
        """The PromQL templates in force: the mode's defaults, then ``analysis.queries``."""
        defaults = REVISION_QUERIES if self.mode == "revision" else ROUTER_QUERIES
        return {**defaults, **self.analysis.queries}


# The pipeline's step (task) names, as compiled: the keys of ``pipeline.profiles.<p>.steps``.
PIPELINE_STEPS = (
    "build-base",
    "validate-data",
    "plan-shards",
    "synthesize",
    "curate-shard",
    "curate",
    "train",
    "evaluate",
    "gate",
    "register",
    "reject",
    "publish",
    "deploy",
)


class Toleration(_Strict):
    """A Kubernetes toleration for a step's pod (e.g. of a GPU node pool's taint)."""

    key: str | None = Field(
        None, description="the taint key; empty with operator Exists tolerates every taint"
    )
    operator: Literal["Equal", "Exists"] = "Equal"
    value: str | None = Field(None, description="the taint value (operator Equal)")
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = None


class PvcMount(_Strict):
    """An existing PersistentVolumeClaim mounted into a step's pod."""

    claim: str = Field(min_length=1, description="the PVC's name, in the pipeline's namespace")
    mount_path: str = Field(pattern=r"^/", description="absolute path in the container")


class SecretEnv(_Strict):
    """Keys of a Kubernetes Secret exposed to a step as environment variables."""

    secret: str = Field(min_length=1, description="the Secret's name")
    env: dict[str, str] = Field(min_length=1, description="secret key -> environment variable name")


class StepPlatform(_Strict):
    """Where and with what a pipeline step's pod runs on Kubernetes."""

    accelerator_type: str | None = Field(
        None, description="e.g. nvidia.com/gpu (the resource name)"
    )
    accelerator_count: int = Field(
        1, ge=1, description="accelerators per pod, when accelerator_type is set"
    )
    node_selector: dict[str, str] = Field(default_factory=dict, description="node label -> value")
    tolerations: list[Toleration] = Field(default_factory=list)
    pvcs: list[PvcMount] = Field(default_factory=list)
    secrets: list[SecretEnv] = Field(default_factory=list)


class PlatformProfile(_Strict):
    """Kubernetes settings of the compiled pipeline on one cluster profile."""

    all_steps: StepPlatform = Field(
        default_factory=StepPlatform, description="applied to every step"
    )
    steps: dict[Literal[PIPELINE_STEPS], StepPlatform] = Field(
        default_factory=dict, description="step name -> settings added on top of all_steps"
    )


class PipelineSpec(_Strict):
    """How the fleet pipeline is compiled for Kubeflow Pipelines, per cluster profile."""

    profiles: dict[Literal["aws", "gcp", "onprem"], PlatformProfile] = Field(
        default_factory=dict, description="profile -> platform settings; 'local' needs none"
    )


class RegistrySpec(_Strict):
    """Where registered adapters are kept."""

    uri: str = Field(
        ".lorafleet/registry", description="a directory (relative to the spec) or s3:// gs://"
    )


class FleetSpec(_Strict):
    """The whole fleet."""

    api_version: Literal["lorafleet/v1"] = Field("lorafleet/v1", alias="apiVersion")
    name: str = Field(pattern=SLUG)
    base: BaseSpec = Field(default_factory=BaseSpec)
    experts: list[ExpertSpec] = Field(min_length=1)
    serving: ServingSpec = Field(default_factory=ServingSpec)
    canary: CanaryPolicy = Field(default_factory=CanaryPolicy)
    registry: RegistrySpec = Field(default_factory=RegistrySpec)
    pipeline: PipelineSpec = Field(default_factory=PipelineSpec)

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    @model_validator(mode="after")
    def _cross(self) -> FleetSpec:
        names = [e.name for e in self.experts]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"expert names must be unique; repeated: {', '.join(dupes)}")
        too_big = [e.name for e in self.experts if e.lora.r > self.serving.max_lora_rank]
        if too_big:
            raise ValueError(f"lora.r exceeds serving.max_lora_rank for: {', '.join(too_big)}")
        return self

    def expert(self, name: str) -> ExpertSpec:
        """The expert called ``name``."""
        for e in self.experts:
            if e.name == name:
                return e
        raise KeyError(name)


def _deep_merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in over.items():
        out[k] = (
            _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
        )
    return out


def _locate(node: yaml.Node | None, loc: tuple) -> tuple[int | None, int]:
    """The line (1-based) of the deepest YAML node along ``loc``, and how deep it is."""
    line = node.start_mark.line + 1 if node is not None else None
    depth = 0
    for part in loc:
        if isinstance(node, yaml.MappingNode):
            node = next((v for k, v in node.value if k.value == part), None)
        elif (
            isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value)
        ):
            node = node.value[part]
        else:
            node = None
        if node is None:
            break
        line, depth = node.start_mark.line + 1, depth + 1
    return line, depth


def _line_of(root: yaml.Node | None, loc: tuple) -> int | None:
    """Where ``loc`` is written; an expert's field may come from ``expert_defaults``."""
    line, depth = _locate(root, loc)
    if depth < len(loc) and len(loc) > 2 and loc[0] == "experts":
        d_line, d_depth = _locate(root, ("expert_defaults", *loc[2:]))
        if d_depth > max(1, depth - 2):
            return d_line
    return line


def load_fleet(path: str | Path, *, check_files: bool = True) -> FleetSpec:
    """Load, merge ``expert_defaults`` into each expert, validate, and resolve data paths.

    Args:
        path: the fleet YAML file.
        check_files: also require every expert's data files to exist.

    Returns:
        The validated spec; relative data paths are resolved against the spec's folder.

    Raises:
        SpecError: naming file, line and field, for any mistake.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SpecError(path, None, "file", "no such file") from None
    except UnicodeDecodeError:
        raise SpecError(path, None, "file", "not UTF-8 text") from None
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        raise SpecError(
            path, mark.line + 1 if mark else None, "yaml", str(getattr(exc, "problem", exc))
        ) from None
    if not isinstance(raw, dict):
        raise SpecError(path, 1, "spec", "the top level must be a mapping")
    defaults = raw.pop("expert_defaults", None) or {}
    if not isinstance(defaults, dict):
        raise SpecError(
            path, _line_of(root, ("expert_defaults",)), "expert_defaults", "must be a mapping"
        )
    if isinstance(raw.get("experts"), list):
        raw["experts"] = [
            _deep_merge(defaults, e) if isinstance(e, dict) else e for e in raw["experts"]
        ]
    try:
        spec = FleetSpec.model_validate(raw)
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = tuple(err["loc"])
        field = ".".join(str(p) for p in loc) or "spec"
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown field"
        raise SpecError(path, _line_of(root, loc), field, msg) from None
    folder = path.resolve().parent
    for i, e in enumerate(spec.experts):
        for attr in ("seed_data", "eval_data"):
            p = getattr(e, attr)
            resolved = p if p.is_absolute() else folder / p
            if check_files and not resolved.is_file():
                raise SpecError(
                    path,
                    _line_of(root, ("experts", i, attr)),
                    f"experts.{i}.{attr}",
                    f"file not found: {p}",
                )
            setattr(e, attr, resolved)
    reg = spec.registry.uri
    if "://" not in reg and not Path(reg).is_absolute():
        spec.registry.uri = str(folder / reg)
    return spec


def spec_to_json(spec: FleetSpec) -> str:
    """Serialize a loaded spec (absolute paths) for pipeline parameters."""
    return spec.model_dump_json(by_alias=True)


def spec_from_json(text: str) -> FleetSpec:
    """The inverse of :func:`spec_to_json`."""
    return FleetSpec.model_validate_json(text)


def dump_schema() -> dict[str, Any]:
    """The JSON schema of the fleet spec (for editors and docs)."""
    return FleetSpec.model_json_schema(by_alias=True)
