"""Evaluation through vLLM: which engine runs, vLLM's command line, and agreement with the
transformers path.

The unit tests need no vLLM: the ``auto`` rule of the gate's ``engine``, and a start that
fails (an interpreter without vLLM) ending in one clear line. The command line is parsed by
vLLM's own argument parser (``tests/deploy/vllm_args_probe.py`` under ``.venv-vllm``).

The ``vllm`` tests start the real vLLM CPU build (``make vllm-env``; ``$LORAFLEET_VLLM_PYTHON``
or ``.venv-vllm``) once for the module on the tiny base with two tiny adapters, both engines
in float32, and compare it with the transformers :class:`Generator` on the shipped
job-analyzer eval records; they skip where vLLM is absent.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from lorafleet.engine.generation import GenerationRequest, Generator
from lorafleet.errors import LorafleetError
from lorafleet.evaluate.evaluators import (
    EvalContext,
    GenerationEvaluator,
    HeldoutLossEvaluator,
    run_evaluators,
)
from lorafleet.evaluate.vllm_engine import BASE_NAME, VllmEvalEngine, pick_engine, vllm_eval_args
from lorafleet.fleet import load_fleet
from lorafleet.fleet.serving import ServingSpec
from lorafleet.records import read_records
from lorafleet.serve.vllm_front import VllmProcess

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT / "examples" / "data"
PROBE = ROOT / "tests" / "deploy" / "vllm_args_probe.py"
VLLM_PYTHON = Path(
    os.environ.get("LORAFLEET_VLLM_PYTHON") or ROOT / ".venv-vllm" / "bin" / "python"
)
no_vllm = pytest.mark.skipif(
    not VLLM_PYTHON.is_file(),
    reason=f"no vLLM at {VLLM_PYTHON} (make vllm-env, or set LORAFLEET_VLLM_PYTHON)",
)
needs_vllm = [pytest.mark.vllm, pytest.mark.integration, pytest.mark.slow, no_vllm]
RECORDS = 12
NEW_TOKENS = 16
# Both engines run in float32; they differ only in kernels and summation order (vLLM's CPU
# attention and its LoRA ops vs PyTorch SDPA and PEFT). Over ~1e3 tokens that moves a mean
# NLL of ~5 by ~1e-5 at most; 1e-4 relative leaves room and still catches a shifted or
# mis-masked token (one token of ~1e3 changes the mean by ~5e-3).
LOSS_RTOL = 1e-4
# Greedy answers may differ where two tokens are a near-tie (then every later token differs).
MIN_GENERATION_AGREEMENT = 0.9


# --- which engine, and its command line (no vLLM started) ----------------------------------


@pytest.mark.parametrize(
    ("engine", "runtime", "gpus", "expected"),
    [
        ("auto", "vllm", 4, "vllm"),  # a base over several GPUs: one device cannot hold it
        ("auto", "vllm", 1, "transformers"),
        ("auto", "vllm", 0, "transformers"),  # vLLM's CPU build serving: one process holds it
        ("auto", "lorafleet", 1, "transformers"),
        ("vllm", "lorafleet", 1, "vllm"),  # asked for: taken as asked
        ("transformers", "vllm", 4, "transformers"),
    ],
)
def test_the_engine_follows_the_gate_setting_and_auto_the_serving_gpus(
    engine: str, runtime: str, gpus: int, expected: str
) -> None:
    serving = ServingSpec.model_validate({"runtime": runtime, "gpus": gpus})
    assert pick_engine(engine, serving) == expected


def test_the_70b_example_evaluates_through_vllm_over_the_serving_gpus() -> None:
    spec = load_fleet(ROOT / "examples" / "fleet-70b.yaml", check_files=False)
    expert = spec.experts[0]
    assert expert.gate.engine == "auto"
    assert pick_engine(expert.gate.engine, spec.serving) == "vllm"
    args = vllm_eval_args(
        "/mnt/models/base",
        {"candidate": "/a/c", "production": "/a/p"},
        tensor_parallel_size=spec.serving.gpus,
        max_lora_rank=spec.serving.max_lora_rank,
        dtype=spec.base.dtype,
        revision=spec.base.revision,
    )
    i = args.index("--tensor-parallel-size")
    assert args[i + 1] == "4" == str(spec.serving.gpus)


@no_vllm
def test_vllms_own_parser_reads_the_parallelism_and_the_adapters() -> None:
    args = vllm_eval_args(
        "/mnt/models/base",
        {"candidate": "/a/c", "production": "/a/p"},
        tensor_parallel_size=4,
        max_lora_rank=16,
        dtype="bfloat16",
        max_model_len=4096,
    )
    cases = {"eval": [*args, "--uds", "/tmp/vllm.sock"]}
    run = subprocess.run(
        [str(VLLM_PYTHON), str(PROBE)],
        input=json.dumps(cases),
        capture_output=True,
        text=True,
        timeout=300,
    )
    line = [ln for ln in run.stdout.splitlines() if ln.startswith("RESULT ")]
    assert line, run.stderr[-2000:]
    parsed = json.loads(line[0].removeprefix("RESULT "))["cases"]["eval"]
    assert parsed["ok"], parsed
    values = parsed["values"]
    assert values["tensor_parallel_size"] == 4
    assert values["enable_lora"] is True
    assert (values["max_lora_rank"], values["max_loras"]) == (16, 2)
    assert values["model"] == "/mnt/models/base" and values["served_model_name"] == [BASE_NAME]
    modules = {m["name"]: m["path"] for m in map(_lora_module, values["lora_modules"])}
    assert modules == {"candidate": "/a/c", "production": "/a/p"}


def _lora_module(value) -> dict:
    """One parsed ``--lora-modules`` entry as the probe prints it (a dataclass repr or dict)."""
    if isinstance(value, dict):
        return value
    name = value.split("name='", 1)[1].split("'", 1)[0]
    path = value.split("path='", 1)[1].split("'", 1)[0]
    return {"name": name, "path": path}


def test_an_interpreter_without_vllm_is_one_clear_line(tiny_base: Path) -> None:
    # Given an interpreter without vLLM (this venv's): refused before anything starts
    engine = VllmEvalEngine(tiny_base, {}, VllmProcess, python=sys.executable)
    with pytest.raises(LorafleetError) as err, engine:
        pass
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith(f"vLLM is not installed for {sys.executable}: ")
    assert "LORAFLEET_VLLM_PYTHON" in message


def test_a_vllm_that_exits_before_it_is_healthy_is_one_clear_line(
    tiny_base: Path, tmp_path: Path
) -> None:
    # Given an interpreter that has vLLM's module but whose server exits at once (a
    # stand-in script: the real vLLM's failures are vLLM's own to test)
    python = tmp_path / "python"
    python.write_text('#!/bin/sh\n[ "$1" = "-c" ] && exit 0\necho "bad flag" >&2\nexit 3\n')
    python.chmod(0o755)
    engine = VllmEvalEngine(tiny_base, {}, VllmProcess, python=str(python), startup_timeout_s=60)
    with pytest.raises(LorafleetError) as err, engine:
        pass
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith("vLLM exited with code 3 before it was healthy")
    assert "--tensor-parallel-size 1" in message


# --- a real vLLM on the tiny base -------------------------------------------------------


@pytest.fixture(scope="module")
def records() -> list:
    return [r for _, r in read_records(DATA / "job-analyzer" / "eval.jsonl")][:RECORDS]


@pytest.fixture(scope="module")
def arms(tiny_adapters: dict[str, Path]) -> dict[str, Path]:
    return {
        "candidate": tiny_adapters["job-analyzer"],
        "production": tiny_adapters["proposal-writer"],
    }


@pytest.fixture(scope="module")
def generator(tiny_base: Path, arms: dict[str, Path]) -> Generator:
    return Generator(tiny_base, arms, dtype="float32")


@pytest.fixture(scope="module")
def vllm(tiny_base: Path, arms: dict[str, Path]) -> Iterator[VllmEvalEngine]:
    """vLLM on the tiny base with both adapters, float32, started once for the module."""
    if not VLLM_PYTHON.is_file():
        pytest.skip(f"no vLLM at {VLLM_PYTHON}")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("VLLM_CPU_KVCACHE_SPACE", "1")
        patch.setenv("HF_HUB_OFFLINE", "1")
        engine = VllmEvalEngine(
            tiny_base,
            arms,
            VllmProcess,
            max_lora_rank=8,
            dtype="float32",
            max_model_len=2048,
            python=str(VLLM_PYTHON),
            startup_timeout_s=600,
        )
        with engine:
            yield engine


class TestWithVllm:
    """vLLM and the transformers path on the same base, adapters and records."""

    pytestmark = needs_vllm

    @pytest.mark.parametrize("adapter", [None, "candidate"], ids=["base", "adapter"])
    def test_vllm_heldout_loss_agrees_with_the_transformers_path(
        self, vllm: VllmEvalEngine, generator: Generator, records: list, adapter: str | None
    ) -> None:
        expected = EvalContext(generator, records, "job-analyzer", adapter).heldout_loss(8, 2048)
        got = vllm.heldout_loss(adapter, records, 8, 2048)
        print(f"{adapter or 'base'}: transformers {expected['loss']:.7f}, vLLM {got['loss']:.7f}")
        assert got["tokens"] == expected["tokens"] > 100
        torch.testing.assert_close(got["loss"], expected["loss"], rtol=LOSS_RTOL, atol=0.0)

    def test_the_arms_losses_differ_on_vllm(self, vllm: VllmEvalEngine, records: list) -> None:
        losses = {
            a: vllm.heldout_loss(a, records)["loss"] for a in (None, "candidate", "production")
        }
        assert len(set(losses.values())) == 3, losses

    def test_prompts_are_the_generators_token_ids(
        self, vllm: VllmEvalEngine, generator: Generator, records: list
    ) -> None:
        for r in records:
            request = GenerationRequest(
                messages=[{"role": m.role, "content": m.content} for m in r.messages[:-1]]
            )
            assert vllm.prompt_ids(request) == generator._prompt_ids(request)

    @pytest.mark.parametrize("adapter", [None, "candidate"], ids=["base", "adapter"])
    def test_greedy_generations_agree_with_the_transformers_path(
        self, vllm: VllmEvalEngine, generator: Generator, records: list, adapter: str | None
    ) -> None:
        requests = [
            GenerationRequest(
                messages=[{"role": m.role, "content": m.content} for m in r.messages[:-1]],
                adapter=adapter,
                max_new_tokens=NEW_TOKENS,
            )
            for r in records
        ]
        expected = generator.generate_all(requests, 4)
        got = vllm.generate_all(requests, 4)
        assert len(got) == len(requests)
        for g in got:
            assert g.finish_reason in ("stop", "length")
            assert 1 <= g.completion_tokens <= NEW_TOKENS
            assert (g.finish_reason == "length") == (g.completion_tokens == NEW_TOKENS)
        same = [g.token_ids == e.token_ids for g, e in zip(got, expected, strict=True)]
        print(f"{adapter or 'base'}: {sum(same)}/{len(same)} identical greedy answers")
        assert sum(same) / len(same) >= MIN_GENERATION_AGREEMENT
        for g, e, s in zip(got, expected, same, strict=True):
            if s:
                assert (g.text, g.finish_reason, g.prompt_tokens) == (
                    e.text,
                    e.finish_reason,
                    e.prompt_tokens,
                )

    def test_the_evaluators_run_on_the_vllm_engine(
        self, vllm: VllmEvalEngine, records: list
    ) -> None:
        seen: list[int] = []
        ctx = EvalContext(
            vllm,
            records,
            "job-analyzer",
            "candidate",
            NEW_TOKENS,
            batch_size=4,
            on_samples=seen.append,
        )
        report = run_evaluators(ctx, [HeldoutLossEvaluator(), GenerationEvaluator()])
        assert report["eval_tokens"] > 100 and report["eval_loss"] > 0
        assert report["generation"]["samples"] == len(records) == sum(seen)

    def test_an_unknown_adapter_is_refused(self, vllm: VllmEvalEngine, records: list) -> None:
        with pytest.raises(
            LorafleetError, match="unknown adapter 'nope'; loaded: candidate, production"
        ):
            vllm.heldout_loss("nope", records)
