"""Task metrics: what "good" means for each expert, computed from generated text.

Each task has a scorer ``(prediction, record) -> {metric: value in [0, 1]}``; the mean
over the eval set is reported. ``token_f1`` (unigram overlap with the reference answer)
is computed for every task.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Callable, Sequence

from lorafleet.records import Record

__all__ = ["PRIMARY_METRIC", "score", "task_metrics"]

WORD = re.compile(r"[a-z0-9]+")
CONTACT = re.compile(r"[\w.+-]+@[\w-]+\.[\w.]+|https?://|\+?\d[\d\s().-]{8,}\d|\b(whatsapp|telegram|skype)\b", re.I)
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


def _job_analyzer(pred: str, record: Record) -> dict[str, float]:
    obj, gold = _json(pred), _json(_reference(record)) or {}
    valid = isinstance(obj, dict)
    schema = valid and list(obj) == ANALYZER_KEYS and isinstance(obj.get("skills"), list)
    skills = [s.lower() for s in obj.get("skills", []) if isinstance(s, str)] if schema else []
    gold_skills = [s.lower() for s in gold.get("skills", [])]
    return {"json_valid": float(valid), "schema_valid": float(schema), "skills_f1": _f1(skills, gold_skills) if schema else 0.0}


def _candidates(record: Record) -> list[str]:
    return sorted(set(re.findall(r"^Candidate ([A-Z])\b", _user(record), re.MULTILINE)))


def _candidate_evaluator(pred: str, record: Record) -> dict[str, float]:
    obj, gold = _json(pred), _json(_reference(record)) or {}
    ranking = obj.get("ranking") if isinstance(obj, dict) else None
    letters = [r.get("candidate") for r in ranking if isinstance(r, dict)] if isinstance(ranking, list) else []
    valid_rank = bool(letters) and sorted(letters) == _candidates(record)
    gold_top = next((r["candidate"] for r in gold.get("ranking", []) if r.get("rank") == 1), None)
    top = next((r.get("candidate") for r in ranking if isinstance(r, dict) and r.get("rank") == 1), None) if valid_rank else None
    return {"json_valid": float(isinstance(obj, dict)), "ranking_valid": float(valid_rank), "top1_match": float(top is not None and top == gold_top)}


def _skills_line(text: str) -> list[str]:
    m = re.search(r"^Skills:\s*(.+)$", text, re.MULTILINE)
    return [s.strip() for s in m.group(1).split(",") if s.strip()] if m else []


def _mentions(text: str, term: str) -> bool:
    return re.search(rf"(?<!\w){re.escape(term.lower())}(?!\w)", text.lower()) is not None


def _proposal_writer(pred: str, record: Record) -> dict[str, float]:
    job = _user(record).split("Freelancer profile:")[0]
    skills = _skills_line(job)
    covered = sum(1 for s in skills if _mentions(pred, s)) / len(skills) if skills else 0.0
    return {"skill_coverage": covered, "no_contact": float(not CONTACT.search(pred))}


def _profile_reviewer(pred: str, record: Record) -> dict[str, float]:
    items = re.findall(r"^\s*\d+[.)]\s+\S", pred, re.MULTILINE)
    profile_words = set(WORD.findall(_user(record).lower()))
    item_lines = [ln for ln in pred.splitlines() if re.match(r"^\s*\d+[.)]\s", ln)]
    grounded = sum(1 for ln in item_lines if len(set(WORD.findall(ln.lower())) & profile_words) >= 3)
    return {"actionable_items": float(len(items) >= 3), "grounded_items": grounded / len(item_lines) if item_lines else 0.0}


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
    out = {"token_f1": _f1(WORD.findall(prediction.lower()), WORD.findall(_reference(record).lower()))}
    if task in SCORERS:
        out.update(SCORERS[task](prediction, record))
    return out


def task_metrics(task: str, predictions: Sequence[str], records: Sequence[Record]) -> dict[str, float]:
    """Mean of every metric over the eval set."""
    rows = [score(task, p, r) for p, r in zip(predictions, records, strict=True)]
    return {k: round(sum(row[k] for row in rows) / len(rows), 4) for k in rows[0]} if rows else {}
