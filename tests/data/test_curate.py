"""Curation: exact duplicates, eval overlap and the synthetic cap, each counted."""

from __future__ import annotations

from lorafleet.data.curate import curate
from lorafleet.fleet import CurationSettings
from lorafleet.records import Record


def _rec(i: str, text: str, source: str = "human") -> Record:
    return Record(
        id=i,
        task="chat",
        source=source,
        messages=[{"role": "user", "content": text}, {"role": "assistant", "content": f"answer to {text}"}],
    )


EVAL = [_rec("e1", "the quick brown fox jumps over the lazy dog near the river bank today")]


def test_drops_duplicates_overlap_and_caps_synthetic() -> None:
    human = [_rec("h1", "build me a shop"), _rec("h2", "Build me a   SHOP"), _rec("h3", "write a blog post")]
    synthetic = [
        _rec("s1", "build me a shop", "synthetic"),
        _rec("s2", "they said the quick brown fox jumps over the lazy dog near the river bank today", "synthetic"),
        _rec("s3", "translate a menu", "synthetic"),
        _rec("s4", "design a logo", "synthetic"),
        _rec("s5", "edit a video", "synthetic"),
    ]
    result = curate(human, synthetic, EVAL, CurationSettings(decontaminate_ngram=8), max_synthetic_ratio=1.0)
    assert [r.id for r in result.records] == ["h1", "h3", "s3", "s4"]
    assert result.stats["dropped"] == {
        "duplicate-human": 1,
        "duplicate-synthetic": 1,
        "eval-overlap-synthetic": 1,
        "synthetic-ratio-cap": 1,
    }
    assert result.stats["output"] == {"human": 2, "synthetic": 2, "total": 4}


def test_an_eval_record_itself_is_never_trained_on() -> None:
    result = curate([EVAL[0].model_copy(update={"id": "h"})], [], EVAL, CurationSettings(), 1.0)
    assert result.records == [] and result.stats["dropped"] == {"eval-overlap-human": 1}
