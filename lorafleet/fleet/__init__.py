"""The fleet spec: one YAML file that drives local runs, compiled pipelines and serving.

Load it with :func:`load_fleet`; every mistake becomes a :class:`~lorafleet.errors.SpecError`
that names the file, the line and the field (``FILE:LINE: field.path: message``).

One module per concern, the loader on top:

- :mod:`lorafleet.fleet.base_model`: the shared base model.
- :mod:`lorafleet.fleet.tasks`: a task, declared (answer format, metrics, prompts, safety).
- :mod:`lorafleet.fleet.data`: validation bounds, synthesis, curation.
- :mod:`lorafleet.fleet.training`: LoRA hyper-parameters, the recipe, where it runs.
- :mod:`lorafleet.fleet.evaluation`: the gate and its judge.
- :mod:`lorafleet.fleet.serving`: runtime, cluster profile, storage, autoscaling.
- :mod:`lorafleet.fleet.canary`: the canary policy and its analysis.
- :mod:`lorafleet.fleet.platform`: per cluster profile, the object store and the Kubernetes
  settings of the pipeline's steps.
- :mod:`lorafleet.fleet.spec`: the expert and the whole fleet.
- :mod:`lorafleet.fleet.loader`: reading a YAML file into a :class:`FleetSpec`.
"""

from lorafleet.fleet.base_model import HUB_TOKEN_KEY, BaseSpec, DemoBaseSettings, is_hub_id
from lorafleet.fleet.canary import (
    QUERY_PLACEHOLDERS,
    QUERY_SAMPLE,
    REVISION_QUERIES,
    ROUTER_QUERIES,
    CanaryAnalysis,
    CanaryJudge,
    CanaryPolicy,
    check_promql,
)
from lorafleet.fleet.common import SLUG, StrictModel
from lorafleet.fleet.data import (
    CurationSettings,
    DataRules,
    JudgeSettings,
    SynthesisSettings,
    TeacherSettings,
)
from lorafleet.fleet.evaluation import GateJudge, GatePolicy
from lorafleet.fleet.loader import load_fleet, spec_from_json, spec_to_json
from lorafleet.fleet.platform import (
    BASE_STEPS,
    PIPELINE_STEPS,
    ModelCache,
    PipelineSpec,
    PlatformProfile,
    ProfileStorage,
    PvcMount,
    SecretEnv,
    StepPlatform,
    Toleration,
)
from lorafleet.fleet.serving import (
    PROFILE_ENV,
    ServingAutoscaling,
    ServingProfile,
    ServingSpec,
    ServingStorage,
)
from lorafleet.fleet.spec import (
    DATA_FIELDS,
    SHA256,
    ExpertSpec,
    FleetSpec,
    RegistrySpec,
    is_local_data,
)
from lorafleet.fleet.tasks import (
    MetricUse,
    TaskDefinition,
    check_task,
    shipped_task,
    unknown_task_message,
)
from lorafleet.fleet.training import LoraSettings, TrainCluster, TrainingSettings

__all__ = [
    "BASE_STEPS",
    "DATA_FIELDS",
    "HUB_TOKEN_KEY",
    "PIPELINE_STEPS",
    "PROFILE_ENV",
    "QUERY_PLACEHOLDERS",
    "QUERY_SAMPLE",
    "REVISION_QUERIES",
    "ROUTER_QUERIES",
    "SHA256",
    "SLUG",
    "BaseSpec",
    "CanaryAnalysis",
    "CanaryJudge",
    "CanaryPolicy",
    "CurationSettings",
    "DataRules",
    "DemoBaseSettings",
    "ExpertSpec",
    "FleetSpec",
    "GateJudge",
    "GatePolicy",
    "JudgeSettings",
    "LoraSettings",
    "MetricUse",
    "ModelCache",
    "PipelineSpec",
    "PlatformProfile",
    "ProfileStorage",
    "PvcMount",
    "RegistrySpec",
    "SecretEnv",
    "ServingAutoscaling",
    "ServingProfile",
    "ServingSpec",
    "ServingStorage",
    "StepPlatform",
    "StrictModel",
    "SynthesisSettings",
    "TaskDefinition",
    "TeacherSettings",
    "Toleration",
    "TrainCluster",
    "TrainingSettings",
    "check_promql",
    "check_task",
    "is_hub_id",
    "is_local_data",
    "load_fleet",
    "shipped_task",
    "spec_from_json",
    "spec_to_json",
    "unknown_task_message",
]
