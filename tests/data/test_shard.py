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
        outputs.append(dump_records(tmp_path / f"out-{i}.jsonl", synthesize(shard, settings).records))
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


def test_stage_shards_merge_to_the_unsharded_stage_output(tmp_path: Path) -> None:
    # The functions the cluster pipeline's ParallelFor tasks and merge task call.
    from lorafleet.fleet import load_fleet
    from lorafleet.stages import merge_synthetic_stage, synthesize_stage

    expert = load_fleet(SEEDS.parents[2] / "fleet.yaml").expert("proposal-writer")
    outs = [tmp_path / f"shard-{i}.jsonl" for i in range(3)]
    stats = [synthesize_stage(expert, SEEDS, out, shard_index=i, shard_count=3) for i, out in enumerate(outs)]
    assert [s["shard"] for s in stats] == ["1/3", "2/3", "3/3"]
    merged = merge_synthetic_stage(SEEDS, outs[::-1], tmp_path / "merged.jsonl")
    synthesize_stage(expert, SEEDS, tmp_path / "whole.jsonl")
    assert merged == {"shards": 3, "records": sum(s["records"] for s in stats)}
    assert (tmp_path / "merged.jsonl").read_bytes() == (tmp_path / "whole.jsonl").read_bytes()
