"""Curation: PII, exact and near duplicates, eval overlap and the synthetic cap, each counted."""

from __future__ import annotations

from lorafleet.data.curate import NearDuplicateIndex, curate, words_of
from lorafleet.fleet import CurationSettings
from lorafleet.records import Record

EXACT_ONLY = CurationSettings(decontaminate_ngram=8, near_dup_threshold=1.0)


def _rec(i: str, text: str, source: str = "human", **meta) -> Record:
    return Record(
        id=i,
        task="chat",
        source=source,
        messages=[
            {"role": "user", "content": text},
            {"role": "assistant", "content": f"answer to {text}"},
        ],
        meta=meta,
    )


EVAL = [_rec("e1", "the quick brown fox jumps over the lazy dog near the river bank today")]
LONG = (
    "We need a data engineer to move our nightly sales reports from spreadsheets into a warehouse with "
    "scheduled loads, tests on every table, a dashboard for the finance team and written runbooks for on-call"
)


def test_drops_duplicates_overlap_and_caps_synthetic() -> None:
    human = [
        _rec("h1", "build me a shop"),
        _rec("h2", "Build me a   SHOP"),
        _rec("h3", "write a blog post"),
    ]
    synthetic = [
        _rec("s1", "build me a shop", "synthetic"),
        _rec(
            "s2",
            "they said the quick brown fox jumps over the lazy dog near the river bank today",
            "synthetic",
        ),
        _rec("s3", "translate a menu", "synthetic"),
        _rec("s4", "design a logo", "synthetic"),
        _rec("s5", "edit a video", "synthetic"),
    ]
    result = curate(human, synthetic, EVAL, EXACT_ONLY, max_synthetic_ratio=1.0)
    assert [r.id for r in result.records] == ["h1", "h3", "s3", "s4"]
    assert result.stats["dropped"] == {
        "duplicate-human": 1,
        "duplicate-synthetic": 1,
        "eval-overlap-synthetic": 1,
        "synthetic-ratio-cap": 1,
    }
    assert result.stats["output"] == {"human": 2, "synthetic": 2, "total": 4}
    assert result.stats["stages"] == {
        "input": 8,
        "pii": 8,
        "exact-dedup": 6,
        "near-dedup": 6,
        "decontaminate": 5,
        "ratio-cap": 4,
    }


def test_near_duplicates_are_dropped_and_distinct_rows_kept() -> None:
    # Given a seed, a one-word edit of it (true 5-word-shingle Jaccard 0.76), and a different request
    near = LONG.replace("finance team", "finance staff")
    human = [_rec("h1", LONG)]
    synthetic = [
        _rec("s1", near, "synthetic"),
        _rec("s2", "Translate our restaurant menu into Spanish and French", "synthetic"),
    ]
    result = curate(human, synthetic, [], CurationSettings(near_dup_threshold=0.6), 5.0)
    assert [r.id for r in result.records] == ["h1", "s2"]
    assert result.stats["dropped"] == {"near-duplicate-synthetic": 1}
    # Above the true similarity, or with near-dedup off, the edit is kept
    assert (
        len(curate(human, synthetic, [], CurationSettings(near_dup_threshold=0.9), 5.0).records)
        == 3
    )
    assert (
        len(curate(human, synthetic, [], CurationSettings(near_dup_threshold=1.0), 5.0).records)
        == 3
    )


def test_near_duplicate_index_reports_what_it_matched() -> None:
    index = NearDuplicateIndex(threshold=0.7, num_perm=64, shingle_words=3)
    assert index.add_if_new("a", index.signature(words_of(LONG))) is None
    assert index.add_if_new("b", index.signature(words_of(LONG + " please"))) == "a"
    assert (
        index.add_if_new(
            "c",
            index.signature(words_of("something else entirely, about logo design for a bakery")),
        )
        is None
    )
    assert (
        index.add_if_new("d", index.signature([])) is None
    )  # an empty text is indexed, not an error


def test_pii_is_scrubbed_or_rejected_and_counted() -> None:
    rows = [_rec("h1", "mail me at bo@example.org about the shop"), _rec("h2", "write a blog post")]
    scrubbed = curate(rows, [], [], EXACT_ONLY, 1.0, pii="scrub")
    assert scrubbed.records[0].messages[0].content == "mail me at [EMAIL] about the shop"
    assert scrubbed.stats["pii"] == {"email": 2}  # once in the question, once quoted in the answer
    rejected = curate(rows, [], [], EXACT_ONLY, 1.0, pii="reject")
    assert [r.id for r in rejected.records] == ["h2"] and rejected.stats["dropped"] == {
        "pii-human": 1
    }


def test_every_row_carries_provenance() -> None:
    human = [_rec("h1", "build me a shop")]
    synthetic = [
        _rec(
            "s1",
            "design a logo",
            "synthetic",
            generator="teacher",
            teacher_model="big-teacher",
            seed_ids=["h1", "h7"],
        )
    ]
    out = {
        r.id: r.meta["provenance"] for r in curate(human, synthetic, [], EXACT_ONLY, 1.0).records
    }
    assert out == {
        "h1": {"source": "human", "generator": "human", "teacher_model": None, "seed_ids": ["h1"]},
        "s1": {
            "source": "synthetic",
            "generator": "teacher",
            "teacher_model": "big-teacher",
            "seed_ids": ["h1", "h7"],
        },
    }


def test_an_eval_record_itself_is_never_trained_on() -> None:
    result = curate([EVAL[0].model_copy(update={"id": "h"})], [], EVAL, CurationSettings(), 1.0)
    assert result.records == [] and result.stats["dropped"] == {"eval-overlap-human": 1}


def test_sharded_curation_decides_as_one_process(tmp_path) -> None:
    # Given exact and near duplicates, eval overlap and the cap spread over the shards
    from lorafleet.data.curate import PreparedShard, prepare_shard, select_rows
    from lorafleet.data.shard import split_records

    near = LONG.replace("finance team", "finance staff")
    human = [
        _rec("h1", LONG),
        _rec("h2", "build me a shop"),
        _rec("h3", "write a blog post"),
        _rec("h4", "Build me a   SHOP"),
    ]
    synthetic = [
        _rec("s1", near, "synthetic", seed_ids=["h3"]),
        _rec("s2", "build me a shop", "synthetic", seed_ids=["h4"]),
        _rec(
            "s3",
            "they said the quick brown fox jumps over the lazy dog near the river bank today",
            "synthetic",
            seed_ids=["h1"],
        ),
        _rec("s4", "translate a menu", "synthetic", seed_ids=["h2"]),
        _rec("s5", "design a logo for a bakery", "synthetic", seed_ids=["h1"]),
        _rec("s6", "edit a wedding video", "synthetic", seed_ids=["h3"]),
        _rec("s7", "reach me at ana@example.com to build the shop", "synthetic", seed_ids=["h2"]),
    ]
    settings = CurationSettings(decontaminate_ngram=8, near_dup_threshold=0.6)
    whole = curate(human, synthetic, EVAL, settings, max_synthetic_ratio=0.75)
    assert whole.stats["dropped"]  # the case exercises drops, not only keeps
    seed_ids = [r.id for r in human]
    for count in (2, 3):
        # When each shard takes its seeds and the synthetic rows of its seeds, prepared and
        # saved apart (as ParallelFor tasks), then selected in one pass
        rank = {sid: i for i, sid in enumerate(seed_ids)}
        shards = []
        for i, hs in enumerate(split_records(human, count)):
            mine = [r for r in synthetic if rank[r.meta["seed_ids"][0]] % count == i]
            shard = prepare_shard(hs, mine, EVAL, settings, "scrub", seed_ids=seed_ids, shard=i)
            shards.append(PreparedShard.load(shard.save(tmp_path / f"{count}-{i}")))
        result = select_rows(shards[::-1], settings, 0.75, "scrub", n_eval=len(EVAL))
        # Then the kept rows and every count equal the one-process run
        assert [r.to_json() for r in result.records] == [r.to_json() for r in whole.records]
        assert {**result.stats, "shards": 1} == whole.stats
