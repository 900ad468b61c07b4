"""Parse vLLM argument lists with vLLM's own parser; run under .venv-vllm's Python.

``tests/deploy/test_vllm_flags.py`` starts this file with the vLLM venv's interpreter (vLLM
cannot share the project's venv) and writes ``{"case": [arg, ...], ...}`` as JSON on stdin.
Each list goes through what ``python -m vllm.entrypoints.openai.api_server`` does before it
loads a model: ``make_arg_parser(FlexibleArgumentParser())``, ``parse_args`` and
``validate_parsed_serve_args``; then the LoRA settings through ``LoRAConfig``, whose
validator relates them (``max_cpu_loras >= max_loras``). It imports no lorafleet code.

The answer is one line on stdout, ``RESULT {json}``: vLLM's version, its ``--max-lora-rank``
choices, and per case either the parsed values or vLLM's one-line error.
"""

from __future__ import annotations

import contextlib
import io
import json
import sys
from typing import Any, get_args

import vllm
from vllm.config.lora import LoRAConfig, MaxLoRARanks
from vllm.entrypoints.launchers.cli_args import make_arg_parser, validate_parsed_serve_args
from vllm.utils.argparse_utils import FlexibleArgumentParser

# The settings the tests compare with what was rendered (argparse dest names).
FIELDS = (
    "model_tag",
    "model",
    "served_model_name",
    "host",
    "port",
    "enable_lora",
    "max_loras",
    "max_lora_rank",
    "max_cpu_loras",
    "max_num_seqs",
    "tensor_parallel_size",
    "kv_cache_memory_bytes",
    "lora_modules",
)


def _parse(args: list[str]) -> dict[str, Any]:
    parser = make_arg_parser(FlexibleArgumentParser(prog="vllm-api-server"))
    errors = io.StringIO()
    try:
        with contextlib.redirect_stderr(errors):
            parsed = parser.parse_args(args)
    except SystemExit:
        # argparse prints usage and "PROG: error: ..." and exits; keep the error line.
        lines = [ln for ln in errors.getvalue().splitlines() if ": error: " in ln]
        return {"ok": False, "error": lines[-1] if lines else errors.getvalue()[-500:]}
    try:
        validate_parsed_serve_args(parsed)
        lora = LoRAConfig(
            max_lora_rank=parsed.max_lora_rank,
            max_loras=parsed.max_loras,
            max_cpu_loras=parsed.max_cpu_loras,
        )
    except (TypeError, ValueError) as exc:
        return {"ok": False, "error": " ".join(f"{type(exc).__name__}: {exc}".split())}
    values = {name: getattr(parsed, name, None) for name in FIELDS}
    values["max_cpu_loras"] = lora.max_cpu_loras  # vLLM's default filled in
    return {"ok": True, "values": values}


def main() -> None:
    cases = json.load(sys.stdin)
    result = {
        "version": vllm.__version__,
        "lora_ranks": list(get_args(MaxLoRARanks)),
        "cases": {name: _parse(args) for name, args in cases.items()},
    }
    print("RESULT " + json.dumps(result, default=str))


if __name__ == "__main__":
    main()
