"""Data settings of an expert: validation bounds, synthesis (programmatic or a teacher LLM),
curation (dedup and decontamination)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from lorafleet.fleet.common import StrictModel

__all__ = ["CurationSettings", "DataRules", "JudgeSettings", "SynthesisSettings", "TeacherSettings"]


class DataRules(StrictModel):
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


class TeacherSettings(StrictModel):
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


class JudgeSettings(StrictModel):
    """An LLM judge that scores each generated record on a rubric; low scores are dropped."""

    model: str | None = Field(
        None, description="the judge's served model name (default: the teacher's)"
    )
    min_score: int = Field(
        4, ge=1, le=5, description="keep records the judge scores at least this (1-5)"
    )


class SynthesisSettings(StrictModel):
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


class CurationSettings(StrictModel):
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
