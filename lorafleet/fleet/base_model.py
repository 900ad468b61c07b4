"""The shared base model: a local directory, a hub id, or the demo base built from a config."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from lorafleet.fleet.common import StrictModel

__all__ = ["BaseSpec", "DemoBaseSettings"]


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
    revision: str | None = Field(None, description="hub revision to pin (commit sha or tag)")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    demo: DemoBaseSettings = Field(default_factory=DemoBaseSettings)
