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

The per-row work (PII, keys, eval overlap, MinHash signatures: :func:`prepare_shard`) is
independent between rows and shards across parallel tasks; the order-dependent decisions
(:func:`select_rows`) run once over every shard and give the same set for any shard count.
"""

from __future__ import annotations

import hashlib
import json
import re
import zlib
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lorafleet.fleet import CurationSettings
from lorafleet.records import Record, record_text

__all__ = [
    "CurationResult",
    "NearDuplicateIndex",
    "PreparedShard",
    "conversation_key",
    "curate",
    "ngrams",
    "prepare_shard",
    "provenance",
    "select_rows",
    "words_of",
]

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
    norm = "\x1e".join(
        f"{m.role}\x1f{' '.join(m.content.lower().split())}" for m in record.messages
    )
    return hashlib.sha256(norm.encode()).hexdigest()


def _identity(value: int) -> int:
    return int(value)


class NearDuplicateIndex:
    """MinHash-LSH over word shingles: ``add_if_new`` keeps the first of near-duplicates.

    Signatures (:meth:`signature`) and the index (:meth:`add_if_new`) are separate steps,
    so the costly signatures can be computed in parallel shards and indexed in one pass.
    Shingle hashes are rolled from per-word CRC32 hashes with numpy (no string per
    shingle), and all MinHashes share one set of permutations (the same in every process):
    together about 5x faster than hashing shingle strings one by one.

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
            (cache.get(w) or cache.setdefault(w, zlib.crc32(w.encode()) | 1) for w in words),
            dtype=np.uint64,
            count=len(words),
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

    def _minhash(self, hashvalues=None):
        from datasketch import MinHash

        return MinHash(
            num_perm=self.num_perm,
            hashfunc=_identity,
            permutations=self._permutations,
            scheme="affine32",
            hashvalues=hashvalues,
        )

    def signature(self, words: list[str]):
        """The MinHash values of a text given as its words: a ``[num_perm]`` uint64 array."""
        mh = self._minhash()
        mh.update_batch(self._shingle_hashes(words))
        return mh.hashvalues

    def add_if_new(self, key: str, signature) -> str | None:
        """Index a text's signature under ``key`` unless it near-duplicates an indexed text.

        Returns:
            ``None`` if it was added, else the key of the indexed text it duplicates.
        """
        mh = self._minhash(signature)
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


@dataclass
class PreparedShard:
    """The per-row half of curation for one shard of the rows (see :func:`prepare_shard`).

    Attributes:
        rows: the rows that passed the PII policy (scrubbed), in input order.
        order: each row's place in the whole set: ``(0, seed position)`` for human rows,
            ``(1, first seed's position, shard, position in shard)`` for synthetic ones.
        keys: each row's :func:`conversation_key`.
        contaminated: whether each row overlaps the eval set.
        signatures: ``[len(rows), num_perm]`` uint64 MinHash values; ``None`` when
            near-dedup is off.
        counts: ``input`` rows per source, ``pii`` findings per kind, ``dropped`` per reason.
    """

    rows: list[Record]
    order: list[tuple[int, ...]]
    keys: list[str]
    contaminated: list[bool]
    signatures: Any
    counts: dict

    def save(self, directory: str | Path) -> Path:
        """Write the shard to ``directory`` (rows.jsonl, signatures.npy, counts.json), atomically."""
        import numpy as np

        from lorafleet.io import atomic_dir

        with atomic_dir(directory) as tmp:
            with open(tmp / "rows.jsonl", "w", encoding="utf-8") as f:
                for r, o, k, c in zip(
                    self.rows, self.order, self.keys, self.contaminated, strict=True
                ):
                    f.write(
                        json.dumps(
                            {"order": o, "key": k, "contaminated": c, "record": r.model_dump()}
                        )
                        + "\n"
                    )
            if self.signatures is not None:
                np.save(tmp / "signatures.npy", self.signatures)
            (tmp / "counts.json").write_text(json.dumps(self.counts))
        return Path(directory)

    @classmethod
    def load(cls, directory: str | Path) -> PreparedShard:
        """Read a shard written by :meth:`save`."""
        import numpy as np

        directory = Path(directory)
        lines = [
            json.loads(line)
            for line in (directory / "rows.jsonl").read_text(encoding="utf-8").splitlines()
        ]
        sig = directory / "signatures.npy"
        return cls(
            rows=[Record.model_validate(x["record"]) for x in lines],
            order=[tuple(x["order"]) for x in lines],
            keys=[x["key"] for x in lines],
            contaminated=[x["contaminated"] for x in lines],
            signatures=np.load(sig) if sig.exists() else None,
            counts=json.loads((directory / "counts.json").read_text()),
        )


def _eval_index(eval_records: list[Record], n: int) -> tuple[set[tuple[str, ...]], set[str]]:
    grams: set[tuple[str, ...]] = set()
    for r in eval_records:
        grams |= ngrams(record_text(r), n)
    return grams, {conversation_key(r) for r in eval_records}


def prepare_shard(
    human: list[Record],
    synthetic: list[Record],
    eval_records: list[Record],
    settings: CurationSettings,
    pii: str = "scrub",
    seed_ids: list[str] | None = None,
    shard: int = 0,
    on_row: Callable[[], None] | None = None,
) -> PreparedShard:
    """The per-row work of curation, independent between rows: the part that shards.

    PII scrubbing (or rejection), the conversation key, eval overlap and the MinHash
    signature of each row. :func:`select_rows` then makes the order-dependent decisions
    (exact and near duplicates, the synthetic cap) over all shards in one pass.

    Args:
        human: this shard's human rows.
        synthetic: this shard's synthetic rows, in the order the shard produced them.
        eval_records: the whole held-out set.
        settings: the expert's curation settings.
        pii: ``scrub``, ``reject`` or ``off``.
        seed_ids: ids of all seed records in file order (default: ``human``'s), which
            place every row in the whole set.
        shard: this shard's index (orders synthetic rows of the same seed across shards).
        on_row: called once per input row (progress bars).

    Returns:
        The prepared shard.
    """
    import numpy as np

    from lorafleet.data.pii import scrub_record

    rank = {
        sid: i for i, sid in enumerate(seed_ids if seed_ids is not None else [r.id for r in human])
    }
    n = settings.decontaminate_ngram
    eval_grams, eval_keys = _eval_index(eval_records, n)
    hasher = (
        NearDuplicateIndex(
            settings.near_dup_threshold, settings.minhash_num_perm, settings.shingle_words
        )
        if settings.near_dup_threshold < 1
        else None
    )
    out = PreparedShard([], [], [], [], None, {})
    found: Counter[str] = Counter()
    drops: Counter[str] = Counter()
    signatures = []
    tagged = [((0, rank.get(r.id, len(rank))), r) for r in human]
    for i, r in enumerate(synthetic):
        first = (r.meta.get("seed_ids") or [r.id])[0]
        tagged.append(((1, rank.get(first, len(rank)), shard, i), r))
    for order, r in tagged:
        if on_row:
            on_row()
        if pii != "off":
            r, counts = scrub_record(r)
            found += counts
            if counts and pii == "reject":
                drops[f"pii-{r.source}"] += 1
                continue
        key = conversation_key(r)
        words = words_of(record_text(r))
        out.rows.append(r)
        out.order.append(order)
        out.keys.append(key)
        out.contaminated.append(
            key in eval_keys or bool(eval_grams and ngrams(words, n) & eval_grams)
        )
        if hasher is not None:
            signatures.append(hasher.signature(words))
    if hasher is not None:
        out.signatures = (
            np.stack(signatures)
            if signatures
            else np.zeros((0, settings.minhash_num_perm), dtype=np.uint64)
        )
    out.counts = {
        "input": {"human": len(human), "synthetic": len(synthetic)},
        "pii": dict(found),
        "dropped": dict(drops),
    }
    return out


def select_rows(
    shards: list[PreparedShard],
    settings: CurationSettings,
    max_synthetic_ratio: float,
    pii: str = "scrub",
    n_eval: int = 0,
) -> CurationResult:
    """The order-dependent half of curation over every prepared shard, in one pass.

    Rows are visited in their place in the whole set (human rows first, in seed order;
    then synthetic rows by their first seed), so the result is the same for any number of
    shards: exact duplicates, near duplicates (MinHash-LSH over the shards' signatures),
    eval overlap, then the cap of synthetic rows per human row.

    Args:
        shards: the output of :func:`prepare_shard` for every shard.
        settings: the expert's curation settings (as given to :func:`prepare_shard`).
        max_synthetic_ratio: at most this many synthetic rows per human row.
        pii: the PII policy the shards were prepared with (recorded in the stats).
        n_eval: size of the eval set (recorded in the stats).

    Returns:
        The kept records (with ``meta.provenance``) and the stats artifact.
    """
    near = (
        NearDuplicateIndex(
            settings.near_dup_threshold, settings.minhash_num_perm, settings.shingle_words
        )
        if settings.near_dup_threshold < 1
        else None
    )
    drops: Counter[str] = Counter()
    found: Counter[str] = Counter()
    inputs: Counter[str] = Counter()
    for sh in shards:
        drops.update(sh.counts["dropped"])
        found.update(sh.counts["pii"])
        inputs.update(sh.counts["input"])
    rows = sorted(
        ((o, s, i) for s, sh in enumerate(shards) for i, o in enumerate(sh.order)),
        key=lambda t: t[0],
    )
    after: Counter[str] = Counter()
    seen: set[str] = set()
    kept: list[Record] = []
    for _, s, i in rows:
        sh = shards[s]
        r, key = sh.rows[i], sh.keys[i]
        after["pii"] += 1
        if key in seen:
            drops[f"duplicate-{r.source}"] += 1
            continue
        after["exact-dedup"] += 1
        if near is not None and near.add_if_new(key, sh.signatures[i]) is not None:
            drops[f"near-duplicate-{r.source}"] += 1
            continue
        after["near-dedup"] += 1
        if sh.contaminated[i]:
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
        "input": {"human": inputs["human"], "synthetic": inputs["synthetic"], "eval": n_eval},
        "stages": {
            "input": inputs["human"] + inputs["synthetic"],
            **{s: after[s] for s in ("pii", "exact-dedup", "near-dedup", "decontaminate")},
            "ratio-cap": len(out),
        },
        "dropped": dict(sorted(drops.items())),
        "pii": dict(sorted(found.items())),
        "pii_policy": pii,
        "output": {"human": n_human, "synthetic": n_syn, "total": len(out)},
        "decontaminate_ngram": settings.decontaminate_ngram,
        "near_dup_threshold": settings.near_dup_threshold,
        "shards": len(shards),
    }
    return CurationResult(records=out, stats=stats)


def curate(
    human: list[Record],
    synthetic: list[Record],
    eval_records: list[Record],
    settings: CurationSettings,
    max_synthetic_ratio: float,
    pii: str = "scrub",
    on_row: Callable[[], None] | None = None,
) -> CurationResult:
    """Merge human and synthetic rows into one clean training set, in one process.

    The same as :func:`prepare_shard` on every row followed by :func:`select_rows`; the
    cluster pipeline runs the first half in parallel shards.

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
    shard = prepare_shard(human, synthetic, eval_records, settings, pii, on_row=on_row)
    return select_rows([shard], settings, max_synthetic_ratio, pii, n_eval=len(eval_records))
