"""Curation: personal data, exact and near duplicates, eval overlap, the synthetic cap.

Stages, in order, each counted in the stats artifact:

1. **pii** - scrub personal data into typed placeholders, or drop the row (``reject``);
2. **exact-dedup** - the same conversation up to case and whitespace;
3. **near-dedup** - MinHash over word shingles with LSH (``datasketch``): a row whose
   estimated Jaccard similarity to a kept row reaches the threshold is dropped;
4. **decontaminate** - a row sharing a word n-gram with the eval set is dropped;
5. **ratio-cap** - at most ``max_synthetic_ratio`` synthetic rows per human row.

Human rows go first, so when a synthetic row duplicates a seed the synthetic one goes.
Every kept row carries ``meta.provenance``: source, generator, teacher model, seed ids.
"""

from __future__ import annotations

import hashlib
import re
import zlib
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from lorafleet.fleet import CurationSettings
from lorafleet.records import Record, record_text

__all__ = ["CurationResult", "NearDuplicateIndex", "conversation_key", "curate", "ngrams", "provenance", "words_of"]

WORD = re.compile(r"[a-z0-9]+")


def words_of(text: str) -> list[str]:
    """Lower-cased words (letters and digits) of ``text``."""
    return WORD.findall(text.lower())


def ngrams(text: str | list[str], n: int) -> set[tuple[str, ...]]:
    """Word n-grams of ``text`` (or of its words, if already split)."""
    words = words_of(text) if isinstance(text, str) else text
    return {tuple(words[i : i + n]) for i in range(len(words) - n + 1)}


def conversation_key(record: Record) -> str:
    """A hash of the conversation up to case and whitespace: equal keys are exact duplicates."""
    norm = "\x1e".join(f"{m.role}\x1f{' '.join(m.content.lower().split())}" for m in record.messages)
    return hashlib.sha256(norm.encode()).hexdigest()


def _identity(value: int) -> int:
    return int(value)


class NearDuplicateIndex:
    """MinHash-LSH over word shingles: ``add_if_new`` keeps the first of near-duplicates.

    Shingle hashes are rolled from per-word CRC32 hashes with numpy (no string per
    shingle), and all MinHashes share one set of permutations: together about 5x faster
    than hashing shingle strings one by one.

    Args:
        threshold: estimated Jaccard similarity at which two texts are near-duplicates.
        num_perm: MinHash permutations.
        shingle_words: words per shingle.
    """

    def __init__(self, threshold: float, num_perm: int = 128, shingle_words: int = 5) -> None:
        from datasketch import MinHash, MinHashLSH

        self.threshold, self.num_perm, self.shingle_words = threshold, num_perm, shingle_words
        self._lsh = MinHashLSH(threshold=threshold, num_perm=num_perm)
        self._permutations = MinHash(num_perm=num_perm, hashfunc=_identity).permutations
        self._word_hashes: dict[str, int] = {}
        self._hashes: dict[str, object] = {}

    def _shingle_hashes(self, words: list[str]):
        import numpy as np

        cache = self._word_hashes
        wh = np.fromiter(
            (cache.get(w) or cache.setdefault(w, zlib.crc32(w.encode()) | 1) for w in words), dtype=np.uint64, count=len(words)
        )
        k = min(self.shingle_words, len(wh)) or 1
        if len(wh) == 0:
            return np.zeros(1, dtype=np.uint64)
        # A polynomial rolling hash of each window of k word hashes (uint64 arithmetic wraps).
        span = len(wh) - k + 1
        h = np.zeros(span, dtype=np.uint64)
        for j in range(k):
            h = h * np.uint64(1_000_003) + wh[j : j + span]
        return np.unique((h ^ (h >> np.uint64(32))) & np.uint64(0xFFFFFFFF))

    def add_if_new(self, key: str, words: list[str]) -> str | None:
        """Index a text (as its words) under ``key`` unless it near-duplicates an indexed text.

        Returns:
            ``None`` if it was added, else the key of the indexed text it duplicates.
        """
        from datasketch import MinHash

        mh = MinHash(num_perm=self.num_perm, hashfunc=_identity, permutations=self._permutations, scheme="affine32")
        mh.update_batch(self._shingle_hashes(words))
        for other in self._lsh.query(mh):
            # LSH returns candidates; confirm with the estimate, so the threshold means what it says.
            if mh.jaccard(self._hashes[other]) >= self.threshold:
                return other
        self._lsh.insert(key, mh)
        self._hashes[key] = mh
        return None


@dataclass
class CurationResult:
    """The curated training set and what happened on the way."""

    records: list[Record]
    stats: dict = field(default_factory=dict)


def provenance(record: Record) -> dict:
    """Where a row came from: source, generator, teacher model and seed ids."""
    meta = record.meta
    return {
        "source": record.source,
        "generator": meta.get("generator", "human" if record.source == "human" else None),
        "teacher_model": meta.get("teacher_model"),
        "seed_ids": list(meta.get("seed_ids") or ([record.id] if record.source == "human" else [])),
    }


def curate(
    human: list[Record],
    synthetic: list[Record],
    eval_records: list[Record],
    settings: CurationSettings,
    max_synthetic_ratio: float,
    pii: str = "scrub",
    on_row: Callable[[], None] | None = None,
) -> CurationResult:
    """Merge human and synthetic rows into one clean training set.

    Args:
        human: the gold seed records.
        synthetic: generated records.
        eval_records: the held-out set nothing may overlap.
        settings: the expert's curation settings.
        max_synthetic_ratio: at most this many synthetic rows per human row.
        pii: ``scrub`` (placeholders), ``reject`` (drop the row) or ``off``.
        on_row: called once per input row (progress bars).

    Returns:
        The kept records (human first, with ``meta.provenance``) and stats: counts after
        each stage, drops per reason, personal data found per kind.
    """
    from lorafleet.data.pii import scrub_record

    n = settings.decontaminate_ngram
    eval_grams: set[tuple[str, ...]] = set()
    for r in eval_records:
        eval_grams |= ngrams(record_text(r), n)
    eval_keys = {conversation_key(r) for r in eval_records}
    near = NearDuplicateIndex(settings.near_dup_threshold, settings.minhash_num_perm, settings.shingle_words) \
        if settings.near_dup_threshold < 1 else None
    drops: Counter[str] = Counter()
    found: Counter[str] = Counter()
    after: Counter[str] = Counter()
    seen: set[str] = set()
    kept: list[Record] = []
    rows: Iterable[Record] = [*human, *synthetic]
    for r in rows:
        if on_row:
            on_row()
        if pii != "off":
            scrubbed, counts = scrub_record(r)
            found += counts
            if counts and pii == "reject":
                drops[f"pii-{r.source}"] += 1
                continue
            r = scrubbed
        after["pii"] += 1
        key = conversation_key(r)
        if key in seen:
            drops[f"duplicate-{r.source}"] += 1
            continue
        after["exact-dedup"] += 1
        words = words_of(record_text(r))
        if near is not None and near.add_if_new(key, words) is not None:
            drops[f"near-duplicate-{r.source}"] += 1
            continue
        after["near-dedup"] += 1
        if key in eval_keys or (eval_grams and ngrams(words, n) & eval_grams):
            drops[f"eval-overlap-{r.source}"] += 1
            continue
        after["decontaminate"] += 1
        seen.add(key)
        kept.append(r)
    n_human = sum(r.source == "human" for r in kept)
    cap = int(max_synthetic_ratio * n_human)
    out: list[Record] = []
    n_syn = 0
    for r in kept:
        if r.source == "synthetic":
            if n_syn >= cap:
                drops["synthetic-ratio-cap"] += 1
                continue
            n_syn += 1
        out.append(r.model_copy(update={"meta": {**r.meta, "provenance": provenance(r)}}))
    stats = {
        "input": {"human": len(human), "synthetic": len(synthetic), "eval": len(eval_records)},
        "stages": {"input": len(human) + len(synthetic), **{s: after[s] for s in ("pii", "exact-dedup", "near-dedup", "decontaminate")},
                   "ratio-cap": len(out)},
        "dropped": dict(sorted(drops.items())),
        "pii": dict(sorted(found.items())),
        "pii_policy": pii,
        "output": {"human": n_human, "synthetic": n_syn, "total": len(out)},
        "decontaminate_ngram": n,
        "near_dup_threshold": settings.near_dup_threshold,
    }
    return CurationResult(records=out, stats=stats)
