"""The fleet spec: shipped examples load; every mistake names file, line and field."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from lorafleet.errors import SpecError
from lorafleet.fleet import load_fleet, spec_from_json, spec_to_json

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"

GOOD = """\
apiVersion: lorafleet/v1
name: tiny
expert_defaults:
  lora: {r: 4, alpha: 8}
experts:
  - name: job-analyzer
    task: job-analyzer
    seed_data: seed.jsonl
    eval_data: eval.jsonl
"""


@pytest.fixture()
def spec_dir(tmp_path: Path) -> Path:
    (tmp_path / "seed.jsonl").write_text("{}\n")
    (tmp_path / "eval.jsonl").write_text("{}\n")
    return tmp_path


@pytest.mark.parametrize("name", ["fleet.yaml", "fleet-cluster.yaml"])
def test_shipped_specs_load(name: str) -> None:
    spec = load_fleet(EXAMPLES / name)
    assert len(spec.experts) >= 4
    assert all(e.seed_data.is_file() and e.eval_data.is_file() for e in spec.experts)


def test_defaults_merge_and_paths_resolve(spec_dir: Path) -> None:
    (spec_dir / "f.yaml").write_text(GOOD)
    spec = load_fleet(spec_dir / "f.yaml")
    expert = spec.expert("job-analyzer")
    assert (expert.lora.r, expert.lora.alpha) == (4, 8)
    assert expert.seed_data == spec_dir / "seed.jsonl"
    assert spec_from_json(spec_to_json(spec)) == spec


@pytest.mark.parametrize(
    ("change", "line", "field", "message"),
    [
        (
            ("    task: job-analyzer\n", "    task: job-analyser\n"),
            7,
            "experts.0.task",
            "unknown task 'job-analyser'",
        ),
        (
            ("  lora: {r: 4, alpha: 8}\n", "  lora: {r: four, alpha: 8}\n"),
            4,
            "experts.0.lora.r",
            "valid integer",
        ),
        (
            ("    eval_data: eval.jsonl\n", "    eval_data: eval.jsonl\n    epochs: 3\n"),
            10,
            "experts.0.epochs",
            "unknown field",
        ),
        (("name: tiny\n", "name: Tiny_Fleet\n"), 2, "name", "should match pattern"),
        (
            ("    eval_data: eval.jsonl\n", "    eval_data: missing.jsonl\n"),
            9,
            "experts.0.eval_data",
            "file not found",
        ),
        (
            ("experts:\n", "canary: {steps: [50, 25, 100]}\nexperts:\n"),
            5,
            "canary.steps",
            "increasing",
        ),
    ],
)
def test_errors_name_file_line_and_field(
    spec_dir: Path, change, line: int, field: str, message: str
) -> None:
    (spec_dir / "f.yaml").write_text(GOOD.replace(*change))
    with pytest.raises(SpecError) as err:
        load_fleet(spec_dir / "f.yaml")
    assert (err.value.line, err.value.field) == (line, field)
    assert message in err.value.message
    assert str(err.value).startswith(f"{spec_dir / 'f.yaml'}:{line}: {field}: ")


def test_duplicate_expert_names_are_refused(spec_dir: Path) -> None:
    body = GOOD + "\n".join(GOOD.splitlines()[5:]) + "\n"
    (spec_dir / "f.yaml").write_text(body)
    with pytest.raises(SpecError, match="expert names must be unique; repeated: job-analyzer"):
        load_fleet(spec_dir / "f.yaml")


def test_yaml_syntax_error_has_a_line(spec_dir: Path) -> None:
    (spec_dir / "f.yaml").write_text(GOOD.replace("name: tiny", "name: [tiny"))
    with pytest.raises(SpecError) as err:
        load_fleet(spec_dir / "f.yaml")
    assert err.value.field == "yaml" and err.value.line is not None


def test_cli_spec_check_prints_one_line_and_exits_2(spec_dir: Path) -> None:
    (spec_dir / "f.yaml").write_text(GOOD.replace("r: 4", "r: 0"))
    proc = subprocess.run(
        [sys.executable, "-m", "lorafleet.cli", "spec", "check", str(spec_dir / "f.yaml")],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert (
        lines[0]
        == f"error: {spec_dir / 'f.yaml'}:4: experts.0.lora.r: Input should be greater than or equal to 1"
    )
    assert "Traceback" not in proc.stderr
