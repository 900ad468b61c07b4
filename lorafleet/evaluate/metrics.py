"""Task metrics: what "good" means for each expert, computed from generated text.

Each task has a scorer ``(prediction, record) -> {metric: value in [0, 1]}``; the mean
over the eval set is reported. ``token_f1`` (unigram overlap with the reference answer)
is computed for every task.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from collections.abc import Callable, Sequence

from lorafleet.evaluate.safety import CONTACT
from lorafleet.records import Record

__all__ = ["PRIMARY_METRIC", "score", "task_metrics"]

WORD = re.compile(r"[a-z0-9]+")
# Template text a finished proposal must not contain: bracketed slots, lorem ipsum, "[Client]".
PLACEHOLDER = re.compile(
    r"\[[A-Z][^\]\n]{0,30}\]|\{\{?\s*\w+\s*\}?\}|<[A-Z][a-z _]{0,30}>|lorem ipsum|\bXX+\b|\bTODO\b",
    re.I,
)
# Word-count bounds of a proposal: the shipped gold proposals run 186-211 words.
PROPOSAL_WORDS = (80, 350)
STOPWORDS = frozenset(
    [
        "a",
        "an",
        "and",
        "the",
        "for",
        "of",
        "to",
        "in",
        "on",
        "with",
        "our",
        "your",
        "from",
        "into",
        "by",
        "at",
        "or",
        "new",
    ]
)
ANALYZER_KEYS = ["skills", "deliverables", "budget", "timeline", "open_questions"]
POST_FIELDS = ("Title:", "Category:", "Budget:", "Timeline:", "Skills:", "Description:")


def _reference(record: Record) -> str:
    return next(m.content for m in reversed(record.messages) if m.role == "assistant")


def _user(record: Record) -> str:
    return "\n".join(m.content for m in record.messages if m.role == "user")


def _f1(pred: Sequence[str], gold: Sequence[str]) -> float:
    p, g = Counter(pred), Counter(gold)
    common = sum((p & g).values())
    if not p or not g or not common:
        return 1.0 if not p and not g else 0.0
    precision, recall = common / sum(p.values()), common / sum(g.values())
    return 2 * precision * recall / (precision + recall)


def _json(text: str):
    try:
        return json.loads(text.strip())
    except json.JSONDecodeError:
        return None


def _facts(obj: dict) -> list[tuple]:
    """The checkable facts of a job analysis: each skill, each budget field, the timeline."""
    skills = obj.get("skills") if isinstance(obj.get("skills"), list) else []
    budget = obj.get("budget") if isinstance(obj.get("budget"), dict) else {}
    facts = [("skills", s.strip().lower()) for s in skills if isinstance(s, str)]
    facts += [("budget", k, str(v).lower()) for k, v in sorted(budget.items())]
    if isinstance(obj.get("timeline"), str):
        facts.append(("timeline", " ".join(WORD.findall(obj["timeline"].lower()))))
    return facts


def _precision_recall(pred: Sequence, gold: Sequence) -> tuple[float, float, float]:
    common = sum((Counter(pred) & Counter(gold)).values())
    precision = common / len(pred) if pred else float(not gold)
    recall = common / len(gold) if gold else float(not pred)
    return (
        precision,
        recall,
        (2 * precision * recall / (precision + recall) if precision + recall else 0.0),
    )


def _job_analyzer(pred: str, record: Record) -> dict[str, float]:
    obj, gold = _json(pred), _json(_reference(record)) or {}
    valid = isinstance(obj, dict)
    schema = valid and list(obj) == ANALYZER_KEYS and isinstance(obj.get("skills"), list)
    skills = [s.lower() for s in obj.get("skills", []) if isinstance(s, str)] if schema else []
    gold_skills = [s.lower() for s in gold.get("skills", [])]
    precision, recall, f1 = (
        _precision_recall(_facts(obj), _facts(gold)) if valid else (0.0, 0.0, 0.0)
    )
    return {
        "json_valid": float(valid),
        "schema_valid": float(schema),
        "skills_f1": _f1(skills, gold_skills) if schema else 0.0,
        "field_precision": precision,
        "field_recall": recall,
        "field_f1": f1,
    }


def _candidates(record: Record) -> list[str]:
    return sorted(set(re.findall(r"^Candidate ([A-Z])\b", _user(record), re.MULTILINE)))


def _order(obj) -> list:
    """Candidate letters from best to worst, by ``rank`` (list order breaks ties)."""
    ranking = obj.get("ranking") if isinstance(obj, dict) else None
    rows = [r for r in ranking if isinstance(r, dict)] if isinstance(ranking, list) else []
    keyed = [
        (
            r.get("rank") if isinstance(r.get("rank"), int | float) else math.inf,
            i,
            r.get("candidate"),
        )
        for i, r in enumerate(rows)
    ]
    return [c for _, _, c in sorted(keyed)]


def _pairwise_accuracy(order: Sequence[str], gold: Sequence[str]) -> float:
    """Fraction of the gold ranking's candidate pairs that ``order`` puts the same way round."""
    pos = {c: i for i, c in enumerate(order)}
    pairs = [(a, b) for i, a in enumerate(gold) for b in gold[i + 1 :]]
    return sum(pos[a] < pos[b] for a, b in pairs) / len(pairs) if pairs else 1.0


def _ndcg(order: Sequence[str], gold: Sequence[str]) -> float:
    """NDCG of ``order`` with graded relevance ``len(gold) - gold rank`` (best = n - 1)."""
    relevance = {c: len(gold) - 1 - i for i, c in enumerate(gold)}
    dcg = sum((2 ** relevance[c] - 1) / math.log2(i + 2) for i, c in enumerate(order))
    ideal = sum((2 ** relevance[c] - 1) / math.log2(i + 2) for i, c in enumerate(gold))
    return dcg / ideal if ideal else 1.0


def _candidate_evaluator(pred: str, record: Record) -> dict[str, float]:
    obj, gold = _json(pred), _order(_json(_reference(record)))
    order = _order(obj)
    valid_rank = (
        bool(order) and sorted(order) == _candidates(record) and sorted(gold) == sorted(order)
    )
    return {
        "json_valid": float(isinstance(obj, dict)),
        "ranking_valid": float(valid_rank),
        "top1_match": float(valid_rank and order[0] == gold[0]),
        "pairwise_accuracy": _pairwise_accuracy(order, gold) if valid_rank else 0.0,
        "ndcg": round(_ndcg(order, gold), 6) if valid_rank else 0.0,
    }


def _skills_line(text: str) -> list[str]:
    m = re.search(r"^Skills:\s*(.+)$", text, re.MULTILINE)
    return [s.strip() for s in m.group(1).split(",") if s.strip()] if m else []


def _mentions(text: str, term: str, whole_word: bool = True) -> bool:
    end = r"(?!\w)" if whole_word else ""
    return re.search(rf"(?<!\w){re.escape(term.lower())}{end}", text.lower()) is not None


def _title_terms(job: str) -> list[str]:
    """The content words of the job's title: what the client wants delivered."""
    m = re.search(r"^Title:\s*(.+)$", job, re.MULTILINE)
    return (
        [w for w in WORD.findall(m.group(1).lower()) if w not in STOPWORDS and len(w) > 2]
        if m
        else []
    )


def _proposal_writer(pred: str, record: Record) -> dict[str, float]:
    job = _user(record).split("Freelancer profile:")[0]
    skills, deliverable = _skills_line(job), _title_terms(job)
    words = len(pred.split())
    return {
        "skill_coverage": sum(1 for s in skills if _mentions(pred, s)) / len(skills)
        if skills
        else 0.0,
        # A 5-letter stem, so "accessible" in the title is covered by "accessibility".
        "deliverable_coverage": sum(
            1 for w in deliverable if _mentions(pred, w[:5], whole_word=False)
        )
        / len(deliverable)
        if deliverable
        else 0.0,
        "length_ok": float(PROPOSAL_WORDS[0] <= words <= PROPOSAL_WORDS[1]),
        "no_placeholder": float(bool(pred.strip()) and not PLACEHOLDER.search(pred)),
        "no_contact": float(not CONTACT.search(pred)),
    }


def _profile_reviewer(pred: str, record: Record) -> dict[str, float]:
    items = re.findall(r"^\s*\d+[.)]\s+\S", pred, re.MULTILINE)
    profile_words = set(WORD.findall(_user(record).lower()))
    item_lines = [ln for ln in pred.splitlines() if re.match(r"^\s*\d+[.)]\s", ln)]
    grounded = sum(
        1 for ln in item_lines if len(set(WORD.findall(ln.lower())) & profile_words) >= 3
    )
    return {
        "actionable_items": float(len(items) >= 3),
        "grounded_items": grounded / len(item_lines) if item_lines else 0.0,
    }


def _job_post_writer(pred: str, record: Record) -> dict[str, float]:
    has_fields = all(re.search(rf"^{re.escape(f)}", pred, re.MULTILINE) for f in POST_FIELDS)
    asks = "?" in pred
    return {"post_format": float(has_fields), "asks_or_posts": float(has_fields or asks)}


SCORERS: dict[str, Callable[[str, Record], dict[str, float]]] = {
    "job-analyzer": _job_analyzer,
    "candidate-evaluator": _candidate_evaluator,
    "proposal-writer": _proposal_writer,
    "profile-reviewer": _profile_reviewer,
    "job-post-writer": _job_post_writer,
}
# The metric shown first in summaries for each task.
PRIMARY_METRIC = {
    "job-analyzer": "json_valid",
    "candidate-evaluator": "ranking_valid",
    "proposal-writer": "skill_coverage",
    "profile-reviewer": "actionable_items",
    "job-post-writer": "post_format",
    "chat": "token_f1",
}


def score(task: str, prediction: str, record: Record) -> dict[str, float]:
    """All metrics of one prediction."""
    out = {
        "token_f1": _f1(WORD.findall(prediction.lower()), WORD.findall(_reference(record).lower()))
    }
    if task in SCORERS:
        out.update(SCORERS[task](prediction, record))
    return out


def task_metrics(
    task: str, predictions: Sequence[str], records: Sequence[Record]
) -> dict[str, float]:
    """Mean of every metric over the eval set."""
    rows = [score(task, p, r) for p, r in zip(predictions, records, strict=True)]
    return {k: round(sum(row[k] for row in rows) / len(rows), 4) for k in rows[0]} if rows else {}
