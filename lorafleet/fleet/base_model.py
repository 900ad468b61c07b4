"""The shared base model: a local directory, a hub id, or the demo base built from a config."""

from __future__ import annotations

import re
from typing import Literal

from pydantic import Field, model_validator

from lorafleet.fleet.common import StrictModel

__all__ = ["HUB_TOKEN_KEY", "SECRET_NAME", "BaseSpec", "DemoBaseSettings", "is_hub_id"]

# The Secret key of the hub token: the one KServe's storage initializer reads (its credential
# builder, pkg/credentials/hf), and the variable huggingface_hub reads in the pipeline's pods.
HUB_TOKEN_KEY = "HF_TOKEN"
# A Kubernetes object name that may hold dots (a DNS-1123 subdomain), as Secret names may.
SECRET_NAME = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
# A hub repo id, NAME or OWNER/NAME (huggingface_hub's validate_repo_id alphabet).
_HUB_ID = re.compile(r"(?:[\w.-]+/)?[\w.-]+")


def is_hub_id(model: str) -> bool:
    """Whether ``model`` (a ``base.model`` value) names a hub repo: not ``demo`` and not a
    path (absolute, ``./``, ``../``, ``~``, or deeper than ``OWNER/NAME``).

    ``OWNER/NAME`` could also be a folder relative to where a local run starts, which
    Hugging Face's loaders try first; a cluster sees no such folder, so there it is a hub id.
    """
    return model != "demo" and not model.startswith((".", "~")) and bool(_HUB_ID.fullmatch(model))


class DemoBaseSettings(StrictModel):
    """Shape of the demo base model built when ``base.model`` is ``demo``."""

    vocab_size: int = Field(4096, ge=300, le=65536)
    hidden_size: int = Field(256, ge=32)
    num_layers: int = Field(4, ge=1)
    num_heads: int = Field(4, ge=1)
    num_kv_heads: int = Field(2, ge=1)
    intermediate_size: int = Field(704, ge=32)
    pretrain_steps: int = Field(300, ge=0)
    pretrain_seq_len: int = Field(256, ge=16)
    pretrain_batch_size: int = Field(8, ge=1, description="sequences per pre-training step")
    seed: int = 0

    @model_validator(mode="after")
    def _heads(self) -> DemoBaseSettings:
        if self.hidden_size % self.num_heads:
            raise ValueError("hidden_size must be divisible by num_heads")
        if self.num_heads % self.num_kv_heads:
            raise ValueError("num_heads must be divisible by num_kv_heads")
        return self


class BaseSpec(StrictModel):
    """The shared base model."""

    model: str = Field("demo", description="'demo', a local model directory, or a hub id")
    revision: str | None = Field(
        None,
        description="hub revision to pin (commit sha or tag): training, evaluation and the "
        "served storage URI (hf://OWNER/MODEL:REVISION) all load it; a commit sha keeps "
        "serving on the weights the adapters were trained on",
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    hub_token_secret: str | None = Field(
        None,
        pattern=SECRET_NAME,
        max_length=253,
        description="a gated or private hub base (e.g. Llama 3.1): the Kubernetes Secret "
        f"holding the hub token under the key {HUB_TOKEN_KEY}, in the pipeline's namespace, "
        "serving.namespace and each training.cluster.namespace. The pipeline steps that load "
        f"the base and the TrainJob pods get it as {HUB_TOKEN_KEY}; the serving "
        "ServiceAccount lists it, so KServe's storage initializer downloads the base with it "
        "(keep it apart from the S3 keys' Secret: KServe reads one kind of key per Secret)",
    )
    demo: DemoBaseSettings = Field(default_factory=DemoBaseSettings)

    @property
    def hub_id(self) -> str | None:
        """``model`` when it names a hub repo (:func:`is_hub_id`), else ``None``."""
        return self.model if is_hub_id(self.model) else None
