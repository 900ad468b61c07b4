"""Curation: exact dedup, decontamination against the eval set, a synthetic:human cap.

Every drop is counted by reason, so the report can say where the data went.
"""

from __future__ import annotations

import hashlib
import re
from collections import Counter
from dataclasses import dataclass, field

from lorafleet.fleet import CurationSettings
from lorafleet.records import Record, record_text

__all__ = ["CurationResult", "curate", "ngrams"]

WORD = re.compile(r"[a-z0-9]+")


def ngrams(text: str, n: int) -> set[tuple[str, ...]]:
    """Lower-cased word n-grams of ``text``."""
    words = WORD.findall(text.lower())
    return {tuple(words[i : i + n]) for i in range(len(words) - n + 1)}


def _key(record: Record) -> str:
    norm = "\x1e".join(f"{m.role}\x1f{' '.join(m.content.lower().split())}" for m in record.messages)
    return hashlib.sha256(norm.encode()).hexdigest()


@dataclass
class CurationResult:
    """The curated training set and what happened on the way."""

    records: list[Record]
    stats: dict = field(default_factory=dict)


def curate(
    human: list[Record],
    synthetic: list[Record],
    eval_records: list[Record],
    settings: CurationSettings,
    max_synthetic_ratio: float,
) -> CurationResult:
    """Merge human and synthetic rows into one clean training set.

    Human rows come first, so a synthetic duplicate of a seed is the one dropped.

    Args:
        human: the gold seed records.
        synthetic: generated records.
        eval_records: the held-out set nothing may overlap.
        settings: the expert's curation settings.
        max_synthetic_ratio: at most this many synthetic rows per human row.

    Returns:
        The kept records (human first) and stats: counts per stage, drops per reason.
    """
    n = settings.decontaminate_ngram
    eval_grams: set[tuple[str, ...]] = set()
    for r in eval_records:
        eval_grams |= ngrams(record_text(r), n)
    eval_keys = {_key(r) for r in eval_records}
    drops: Counter[str] = Counter()
    seen: set[str] = set()
    kept: list[Record] = []
    for r in [*human, *synthetic]:
        key = _key(r)
        if key in seen:
            drops[f"duplicate-{r.source}"] += 1
            continue
        if key in eval_keys or ngrams(record_text(r), n) & eval_grams:
            drops[f"eval-overlap-{r.source}"] += 1
            continue
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
        out.append(r)
    stats = {
        "input": {"human": len(human), "synthetic": len(synthetic), "eval": len(eval_records)},
        "dropped": dict(sorted(drops.items())),
        "output": {"human": n_human, "synthetic": n_syn, "total": len(out)},
        "decontaminate_ngram": n,
    }
    return CurationResult(records=out, stats=stats)
