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
    assert all(Path(e.seed_data).is_file() and Path(e.eval_data).is_file() for e in spec.experts)


def test_defaults_merge_and_paths_resolve(spec_dir: Path) -> None:
    (spec_dir / "f.yaml").write_text(GOOD)
    spec = load_fleet(spec_dir / "f.yaml")
    expert = spec.expert("job-analyzer")
    assert (expert.lora.r, expert.lora.alpha) == (4, 8)
    assert expert.seed_data == str(spec_dir / "seed.jsonl")
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
            "expert_defaults.lora.r",  # where the user wrote it, not experts.0
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


def test_spec_check_reports_every_problem_once_in_file_order(spec_dir: Path) -> None:
    # Given two experts sharing a bad default, and two mistakes of their own
    body = (
        GOOD.replace("  lora: {r: 4, alpha: 8}\n", "  lora: {r: 0, alpha: 8}\n")
        + "\n".join(GOOD.splitlines()[5:]).replace("name: job-analyzer", "name: Second")
        + "\n    colour: red\n"
    )
    (spec_dir / "f.yaml").write_text(body)
    # When checked from the CLI
    done = subprocess.run(
        [sys.executable, "-m", "lorafleet.cli", "spec", "check", str(spec_dir / "f.yaml")],
        capture_output=True,
        text=True,
    )
    # Then every problem is one error line, the shared default only once
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and all(line.startswith("error: ") for line in lines)
    where = [line.split(": ")[1:3] for line in lines]
    assert where == [
        [f"{spec_dir / 'f.yaml'}:4", "expert_defaults.lora.r"],
        [f"{spec_dir / 'f.yaml'}:10", "experts.1.name"],
        [f"{spec_dir / 'f.yaml'}:14", "experts.1.colour"],
    ]


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
        == f"error: {spec_dir / 'f.yaml'}:4: expert_defaults.lora.r: Input should be greater than or equal to 1"
    )
    assert "Traceback" not in proc.stderr


# --- data by URI ---------------------------------------------------------------------------

DIGEST = "ab" * 32


def test_data_uris_are_kept_as_written_and_not_checked(spec_dir: Path) -> None:
    # Given data in stores that this machine cannot see, and one file:// URI that it can
    (spec_dir / "f.yaml").write_text(
        GOOD.replace("seed_data: seed.jsonl", "seed_data: s3://fleet-data/ja/seed.jsonl")
        .replace("eval_data: eval.jsonl", f"eval_data: file://{spec_dir}/eval.jsonl")
        .replace(
            "    task: job-analyzer\n", f"    task: job-analyzer\n    seed_data_sha256: {DIGEST}\n"
        )
        + "  - {name: pw, task: proposal-writer, seed_data: gs://fleet-data/pw/seed.jsonl,"
        " eval_data: pvc://fleet-data/pw/eval.jsonl}\n"
    )
    spec = load_fleet(spec_dir / "f.yaml")  # check_files: no store is contacted
    ja, pw = spec.experts
    assert (ja.seed_data, ja.seed_data_sha256) == ("s3://fleet-data/ja/seed.jsonl", DIGEST)
    assert (ja.eval_data, ja.eval_data_sha256) == (f"file://{spec_dir}/eval.jsonl", None)
    assert (pw.seed_data, pw.eval_data) == (
        "gs://fleet-data/pw/seed.jsonl",
        "pvc://fleet-data/pw/eval.jsonl",
    )
    assert spec_from_json(spec_to_json(spec)) == spec


def test_relative_data_paths_resolve_against_the_spec_folder(spec_dir: Path) -> None:
    (spec_dir / "sub").mkdir()
    (spec_dir / "sub" / "seed.jsonl").write_text("{}\n")
    (spec_dir / "sub" / "f.yaml").write_text(GOOD.replace("eval.jsonl", "../eval.jsonl"))
    expert = load_fleet(spec_dir / "sub" / "f.yaml").experts[0]
    assert expert.seed_data == str(spec_dir / "sub" / "seed.jsonl")
    assert Path(expert.eval_data).resolve() == spec_dir / "eval.jsonl"


@pytest.mark.parametrize(
    ("written", "field", "message"),
    [
        ("s3:fleet-data/seed.jsonl", "experts.0.seed_data", "malformed URI: write s3://..."),
        ("https://example.com/seed.jsonl", "experts.0.seed_data", "unknown scheme 'https'"),
        ("s3://Fleet_Data/seed.jsonl", "experts.0.seed_data", "invalid bucket 'Fleet_Data'"),
        ("s3://fleet-data/../seed.jsonl", "experts.0.seed_data", "'..' segments are not allowed"),
        ("file:///nowhere/seed.jsonl", "experts.0.seed_data", "file not found"),
    ],
)
def test_bad_data_locations_name_file_line_and_rule(
    spec_dir: Path, written: str, field: str, message: str
) -> None:
    (spec_dir / "f.yaml").write_text(GOOD.replace("seed_data: seed.jsonl", f"seed_data: {written}"))
    with pytest.raises(SpecError) as err:
        load_fleet(spec_dir / "f.yaml")
    assert str(err.value).startswith(f"{spec_dir / 'f.yaml'}:8: {field}: ")
    assert message in err.value.message


def test_a_digest_must_be_a_sha256(spec_dir: Path) -> None:
    (spec_dir / "f.yaml").write_text(
        GOOD.replace(
            "    eval_data: eval.jsonl\n", "    eval_data: eval.jsonl\n    eval_data_sha256: ABC\n"
        )
    )
    with pytest.raises(SpecError) as err:
        load_fleet(spec_dir / "f.yaml")
    assert (err.value.line, err.value.field) == (10, "experts.0.eval_data_sha256")


# --- the profile's object store ----------------------------------------------------------


def _profile(spec_dir: Path, storage: str, all_steps: str = "") -> Path:
    (spec_dir / "f.yaml").write_text(
        GOOD + f"pipeline:\n  profiles:\n    onprem:\n      storage: {storage}\n{all_steps}"
    )
    return spec_dir / "f.yaml"


@pytest.mark.parametrize(
    ("storage", "object_store", "endpoint"),
    [
        ("{object_store: s3://ml-data/lorafleet}", "s3://ml-data/lorafleet", None),
        ("{object_store: gs://ml-data}", "gs://ml-data", None),
        (
            "{object_store: 's3://ml-data/x/', endpoint: 'http://minio.minio:9000'}",
            "s3://ml-data/x/",
            "http://minio.minio:9000",
        ),
        ("{}", None, None),
    ],
)
def test_profile_storage_names_an_object_store(
    spec_dir: Path, storage: str, object_store: str | None, endpoint: str | None
) -> None:
    profile = load_fleet(_profile(spec_dir, storage)).pipeline.profiles["onprem"]
    assert (profile.storage.object_store, profile.storage.endpoint) == (object_store, endpoint)


def test_shipped_cluster_profiles_each_name_a_store() -> None:
    profiles = load_fleet(EXAMPLES / "fleet-cluster.yaml").pipeline.profiles
    assert {p: profiles[p].storage.scheme for p in ("aws", "gcp", "onprem")} == {
        "aws": "s3",
        "gcp": "gs",
        "onprem": "s3",
    }
    assert profiles["onprem"].storage.endpoint  # MinIO


def test_a_pvc_store_is_mounted_in_every_step(spec_dir: Path) -> None:
    mounted = "      all_steps:\n        pvcs: [{claim: ml-data, mount_path: /data}]\n"
    profile = load_fleet(_profile(spec_dir, "{object_store: pvc://ml-data/lorafleet}", mounted))
    assert profile.pipeline.profiles["onprem"].storage.scheme == "pvc"
    with pytest.raises(SpecError) as err:
        load_fleet(_profile(spec_dir, "{object_store: pvc://ml-data/lorafleet}"))
    assert str(err.value) == (
        f"{spec_dir / 'f.yaml'}:13: pipeline.profiles.onprem: storage.object_store is on claim "
        "'ml-data': mount it in all_steps.pvcs so every step can read it"
    )


@pytest.mark.parametrize(
    ("storage", "field", "message"),
    [
        ("{object_store: /srv/data}", "object_store", "must be s3://BUCKET/PREFIX, gs://"),
        ("{object_store: 'file:///srv/data'}", "object_store", "cannot read this machine's disk"),
        ("{object_store: 's3:ml-data'}", "object_store", "malformed URI: write s3://..."),
        ("{object_store: 'gs://ML'}", "object_store", "invalid bucket 'ML'"),
        ("{object_store: 'gs://ml-data', endpoint: 'http://minio:9000'}", "", "needs an s3://"),
        ("{object_store: 's3://ml-data', endpoint: 'minio:9000'}", "endpoint", "pattern"),
        ("{bucket: ml-data}", "bucket", "unknown field"),
    ],
)
def test_bad_profile_storage_names_file_line_and_rule(
    spec_dir: Path, storage: str, field: str, message: str
) -> None:
    with pytest.raises(SpecError) as err:
        load_fleet(_profile(spec_dir, storage))
    assert err.value.field == f"pipeline.profiles.onprem.storage{'.' + field if field else ''}"
    assert err.value.line == 13
    assert message in err.value.message


def test_a_trainjob_priority_needs_its_kueue_queue(spec_dir: Path) -> None:
    cluster = (
        "    training:\n      launcher: trainjob\n      cluster:\n        image: r/i:1\n"
        "        volume: {claim: data, mount_path: /data}\n        priority_class: gpu-high\n"
    )
    (spec_dir / "f.yaml").write_text(GOOD + cluster)
    with pytest.raises(SpecError, match=r"training\.cluster.*priority_class: Kueue reads it only"):
        load_fleet(spec_dir / "f.yaml")
    (spec_dir / "f.yaml").write_text(GOOD + cluster + "        queue_name: gpu-team\n")
    labels = load_fleet(spec_dir / "f.yaml").expert("job-analyzer").training.cluster.kueue_labels
    assert labels == {
        "kueue.x-k8s.io/queue-name": "gpu-team",
        "kueue.x-k8s.io/priority-class": "gpu-high",
    }
