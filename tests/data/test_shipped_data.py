"""The shipped eval sets are held out: no seed record shares a decontamination n-gram with them."""

from __future__ import annotations

from pathlib import Path

import pytest

from lorafleet.data.curate import curate
from lorafleet.fleet import load_fleet
from lorafleet.records import read_records

SPEC = Path(__file__).resolve().parents[2] / "examples" / "fleet.yaml"


@pytest.mark.parametrize("expert", [e.name for e in load_fleet(SPEC).experts])
def test_no_seed_record_overlaps_the_eval_set(expert: str) -> None:
    # The same check curation runs (13-gram overlap with eval): on the shipped data it
    # must find nothing, or the eval set would not be held out.
    spec = load_fleet(SPEC).expert(expert)
    seeds = [r for _, r in read_records(spec.seed_data)]
    held_out = [r for _, r in read_records(spec.eval_data)]
    assert seeds and held_out
    result = curate(seeds, [], held_out, spec.curation, spec.synthesis.max_synthetic_ratio)
    assert result.stats["dropped"] == {}
    assert len(result.records) == len(seeds)
