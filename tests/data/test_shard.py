"""Sharding for the cluster pipeline: split seeds, synthesize per shard, merge = unsharded run."""

from __future__ import annotations

from pathlib import Path

import pytest

from lorafleet.data.shard import merge_records, split_records
from lorafleet.data.synth import synthesize
from lorafleet.fleet import SynthesisSettings
from lorafleet.records import dump_records, read_records

SEEDS = Path(__file__).resolve().parents[2] / "examples" / "data" / "proposal-writer" / "seed.jsonl"


def test_split_is_round_robin_and_covers_every_record() -> None:
    seeds = [r for _, r in read_records(SEEDS)]
    shards = split_records(seeds, 4)
    ids = [r.id for r in seeds]
    assert [[r.id for r in shard] for shard in shards] == [ids[i::4] for i in range(4)]


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
    # When read back (as the next task would) and merged, Then the result equals one unsharded run
    merged = merge_records([[r for _, r in read_records(p)] for p in outputs], seeds)
    whole = synthesize(seeds, settings).records
    assert [r.to_json() for r in merged] == [r.to_json() for r in whole]


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
    from lorafleet.data.curate import curate
    from lorafleet.fleet import load_fleet
    from lorafleet.io import sha256_file
    from lorafleet.records import dump_records, read_records
    from lorafleet.stages import curate_shard_stage, select_stage, synthesize_stage

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
    # The reference: curation of all seeds and all synthetic rows in one process.
    result = curate(
        [r for _, r in read_records(SEEDS)],
        [r for _, r in read_records(tmp_path / "syn.jsonl")],
        [r for _, r in read_records(eval_set)],
        expert.curation,
        expert.synthesis.max_synthetic_ratio,
        pii=expert.data.pii,
    )
    dump_records(tmp_path / "train-whole.jsonl", result.records)
    whole = {
        **result.stats,
        "train_sha256": sha256_file(tmp_path / "train-whole.jsonl"),
        "eval_sha256": sha256_file(eval_set),
    }
    assert (tmp_path / "train-sharded.jsonl").read_bytes() == (
        tmp_path / "train-whole.jsonl"
    ).read_bytes()
    assert sharded.pop("shards") == 3 and whole.pop("shards") == 1
    assert sharded == whole
