"""Sharding for the cluster pipeline: split seeds, synthesize per shard, merge = unsharded run."""

from __future__ import annotations

from pathlib import Path

import pytest

from lorafleet.data.shard import (
    merge_records,
    merge_shard_files,
    shard_name,
    split_file,
    split_records,
)
from lorafleet.data.synth import synthesize
from lorafleet.fleet import SynthesisSettings
from lorafleet.records import dump_records, read_records

SEEDS = Path(__file__).resolve().parents[2] / "examples" / "data" / "proposal-writer" / "seed.jsonl"


def _ids(path: Path) -> list[str]:
    return [r.id for _, r in read_records(path)]


def test_split_is_round_robin_and_covers_every_record(tmp_path: Path) -> None:
    paths = split_file(SEEDS, 4, tmp_path)
    assert [p.name for p in paths] == [shard_name(i, 4) for i in range(4)]
    ids = _ids(SEEDS)
    assert [_ids(p) for p in paths] == [ids[i::4] for i in range(4)]


@pytest.mark.parametrize("count", [1, 3, 7])
def test_sharded_synthesis_merges_to_the_unsharded_result(tmp_path: Path, count: int) -> None:
    # Given the seeds split into shards, each expanded on its own (as ParallelFor tasks would)
    seeds = [r for _, r in read_records(SEEDS)]
    settings = SynthesisSettings(per_seed=2, seed=3)
    outputs = []
    for i, shard in enumerate(split_records(seeds, count)):
        outputs.append(
            dump_records(tmp_path / f"out-{i}.jsonl", synthesize(shard, settings).records)
        )
    # When merged, Then the result equals one unsharded run
    merged = merge_shard_files(outputs, SEEDS, tmp_path / "merged.jsonl")
    whole = synthesize(seeds, settings).records
    assert [r.to_json() for _, r in read_records(merged)] == [r.to_json() for r in whole]


def test_merge_order_does_not_depend_on_shard_order() -> None:
    seeds = [r for _, r in read_records(SEEDS)][:6]
    shards = [synthesize(s, SynthesisSettings(per_seed=1)).records for s in split_records(seeds, 3)]
    assert merge_records(shards, seeds) == merge_records([shards[2], shards[0], shards[1]], seeds)


def test_split_rejects_zero_shards() -> None:
    with pytest.raises(ValueError):
        split_records([], 0)


def test_stage_shards_curate_to_the_unsharded_stage_output(tmp_path: Path) -> None:
    # The functions the cluster pipeline's ParallelFor tasks (synthesize, curate-shard) and
    # its curate task call, against the one-process stages; shards finish in any order.
    from lorafleet.fleet import load_fleet
    from lorafleet.stages import curate_shard_stage, curate_stage, select_stage, synthesize_stage

    fleet = load_fleet(SEEDS.parents[2] / "fleet.yaml").expert("proposal-writer")
    expert = fleet.model_copy(
        update={"synthesis": fleet.synthesis.model_copy(update={"shards": 3})}
    )
    eval_set = SEEDS.with_name("eval.jsonl")
    prepared = []
    for i in range(3):
        synthesize_stage(expert, SEEDS, tmp_path / f"syn-{i}.jsonl", shard_index=i, shard_count=3)
        stats = curate_shard_stage(
            expert,
            SEEDS,
            tmp_path / f"syn-{i}.jsonl",
            eval_set,
            tmp_path / f"prep-{i}",
            shard_index=i,
        )
        assert stats["shard"] == f"{i + 1}/3" and stats["rows"] > 0
        prepared.append(tmp_path / f"prep-{i}")
    sharded = select_stage(expert, prepared[::-1], eval_set, tmp_path / "train-sharded.jsonl")
    synthesize_stage(expert, SEEDS, tmp_path / "syn.jsonl")
    whole = curate_stage(
        expert, SEEDS, tmp_path / "syn.jsonl", eval_set, tmp_path / "train-whole.jsonl"
    )
    assert (tmp_path / "train-sharded.jsonl").read_bytes() == (
        tmp_path / "train-whole.jsonl"
    ).read_bytes()
    assert sharded.pop("shards") == 3 and whole.pop("shards") == 1
    assert sharded == whole
