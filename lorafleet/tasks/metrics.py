"""The metric library: what "good" means for a task, declared in its definition.

A task lists metrics from this library by name, each with its parameters::

    metrics:
      - json_valid
      - {metric: json_fields, name: skills_f1, params: {fields: [skills]}}

A metric is built once per task by a *factory* ``(params, answer_schema) -> scorer``; the
scorer maps ``(prediction, example)`` to a score in ``[0, 1]``, where the example is the
eval conversation (its prompt and reference answer). The mean over the eval set is
reported under the metric's ``name`` (its library name unless renamed). ``token_f1``
(unigram overlap with the reference answer) is reported for every task.

More metrics come from installed packages through the ``lorafleet.metrics`` entry point
group: an entry point ``NAME = module:factory`` makes ``NAME`` usable in any task
definition. The factory gets the metric's ``params`` (a dict) and the task's answer JSON
Schema (or ``None``) and returns the scorer; it raises ``ValueError`` for bad parameters,
which ``lorafleet spec check`` reports.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import cache
from importlib.metadata import entry_points
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from lorafleet.tasks.safety import RULES

__all__ = [
    "ENTRY_POINT_GROUP",
    "Example",
    "MetricFactory",
    "Scorer",
    "build_scorer",
    "library",
    "token_f1",
]

ENTRY_POINT_GROUP = "lorafleet.metrics"
WORD = re.compile(r"[a-z0-9]+")


@dataclass(frozen=True)
class Example:
    """One eval conversation as a metric sees it: OpenAI-style messages, reference last."""

    messages: tuple[Mapping[str, str], ...]

    @classmethod
    def of(cls, messages: Sequence[Any]) -> Example:
        """From chat turns: mappings, or objects with ``role`` and ``content`` (records')."""
        return cls(
            tuple(
                dict(m) if isinstance(m, Mapping) else {"role": m.role, "content": m.content}
                for m in messages
            )
        )

    @property
    def reference(self) -> str:
        """The reference answer: the last assistant turn."""
        return next((m["content"] for m in reversed(self.messages) if m["role"] == "assistant"), "")

    @property
    def prompt(self) -> str:
        """Every user turn, joined by newlines."""
        return "\n".join(m["content"] for m in self.messages if m["role"] == "user")


Scorer = Callable[[str, Example], float]
MetricFactory = Callable[[Mapping[str, Any], "dict | None"], Scorer]


class _Params(BaseModel):
    """A built-in metric's parameters: unknown ones are refused."""

    model_config = ConfigDict(extra="forbid")


def _params(model: type[_Params], params: Mapping[str, Any]) -> Any:
    try:
        return model.model_validate(dict(params))
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(map(str, err["loc"]))
        message = "unknown parameter" if err["type"] == "extra_forbidden" else err["msg"]
        raise ValueError(
            f"{where}: {message.removeprefix('Value error, ')}" if where else message
        ) from None


def _regex(pattern: str, flags: int = 0) -> re.Pattern:
    try:
        return re.compile(pattern, flags)
    except re.error as exc:
        raise ValueError(f"pattern {pattern!r} does not compile: {exc}") from None


def _counter_f1(pred: Sequence, gold: Sequence) -> float:
    p, g = Counter(pred), Counter(gold)
    common = sum((p & g).values())
    if not p or not g or not common:
        return 1.0 if not p and not g else 0.0
    precision, recall = common / sum(p.values()), common / sum(g.values())
    return 2 * precision * recall / (precision + recall)


def token_f1(prediction: str, example: Example) -> float:
    """Unigram F1 of lower-cased words against the reference answer."""
    return _counter_f1(WORD.findall(prediction.lower()), WORD.findall(example.reference.lower()))


def _json(text: str) -> Any:
    try:
        return json.loads(text.strip())
    except json.JSONDecodeError:
        return None


# --- JSON answers -------------------------------------------------------------------------


class _JsonValid(_Params):
    type: Literal["object", "array", "any"] = Field(
        "object", description="the JSON value the answer must be"
    )


def _json_valid(params: Mapping[str, Any], schema: dict | None) -> Scorer:
    want = _params(_JsonValid, params).type
    kinds = {"object": dict, "array": list, "any": object}

    def scorer(prediction: str, example: Example) -> float:
        value = _json(prediction)
        return float(value is not None and isinstance(value, kinds[want]))

    return scorer


class _SchemaValid(_Params):
    key_order: bool = Field(
        False, description="also require the object's keys in the order of the schema's properties"
    )


def _schema_valid(params: Mapping[str, Any], schema: dict | None) -> Scorer:
    import fastjsonschema

    p = _params(_SchemaValid, params)
    if schema is None:
        raise ValueError("schema_valid needs the task's answer.schema")
    validate = fastjsonschema.compile(schema)
    order = list(schema.get("properties", {}))

    def scorer(prediction: str, example: Example) -> float:
        value = _json(prediction)
        if value is None:
            return 0.0
        try:
            validate(value)
        except fastjsonschema.JsonSchemaValueException:
            return 0.0
        return float(not p.key_order or not isinstance(value, dict) or list(value) == order)

    return scorer


class _JsonFields(_Params):
    fields: list[str] = Field(min_length=1, description="top-level keys whose facts are compared")
    output: Literal["f1", "precision", "recall"] = "f1"


def _facts(value: Any, fields: Sequence[str]) -> list[tuple]:
    """The checkable facts of a JSON answer: each string of a list field, each key/value of
    an object field, a string field's words; compared lower-cased."""
    if not isinstance(value, dict):
        return []
    facts: list[tuple] = []
    for f in fields:
        v = value.get(f)
        if isinstance(v, list):
            facts += [(f, s.strip().lower()) for s in v if isinstance(s, str)]
        elif isinstance(v, dict):
            facts += [(f, k, str(x).lower()) for k, x in sorted(v.items())]
        elif isinstance(v, str):
            facts.append((f, " ".join(WORD.findall(v.lower()))))
    return facts


def _json_fields(params: Mapping[str, Any], schema: dict | None) -> Scorer:
    p = _params(_JsonFields, params)

    def scorer(prediction: str, example: Example) -> float:
        value = _json(prediction)
        if not isinstance(value, dict):
            return 0.0
        pred, gold = _facts(value, p.fields), _facts(_json(example.reference), p.fields)
        common = sum((Counter(pred) & Counter(gold)).values())
        precision = common / len(pred) if pred else float(not gold)
        recall = common / len(gold) if gold else float(not pred)
        if p.output == "precision":
            return precision
        if p.output == "recall":
            return recall
        return 2 * precision * recall / (precision + recall) if precision + recall else 0.0

    return scorer


# --- rankings -----------------------------------------------------------------------------


class _Ranking(_Params):
    output: Literal["valid", "top1", "pairwise", "ndcg"] = Field(
        "valid",
        description="valid: ranks exactly the prompt's items; top1: same best item as the "
        "reference; pairwise: share of the reference's pairs in the same order; ndcg",
    )
    list_field: str = Field("ranking", description="the answer's list of ranked rows")
    item_field: str = Field("candidate", description="a row's item id")
    rank_field: str = Field("rank", description="a row's rank (1 = best; list order breaks ties)")
    prompt_items: str = Field(
        r"^Candidate ([A-Z])\b",
        description="regex (multi-line) whose first group finds the items in the prompt",
    )


def _order(value: Any, p: _Ranking) -> list:
    rows = value.get(p.list_field) if isinstance(value, dict) else None
    rows = [r for r in rows if isinstance(r, dict)] if isinstance(rows, list) else []
    keyed = [
        (
            r.get(p.rank_field) if isinstance(r.get(p.rank_field), int | float) else math.inf,
            i,
            r.get(p.item_field),
        )
        for i, r in enumerate(rows)
    ]
    return [c for _, _, c in sorted(keyed, key=lambda k: (k[0], k[1]))]


def _pairwise(order: Sequence, gold: Sequence) -> float:
    pos = {c: i for i, c in enumerate(order)}
    pairs = [(a, b) for i, a in enumerate(gold) for b in gold[i + 1 :]]
    return sum(pos[a] < pos[b] for a, b in pairs) / len(pairs) if pairs else 1.0


def _ndcg(order: Sequence, gold: Sequence) -> float:
    relevance = {c: len(gold) - 1 - i for i, c in enumerate(gold)}
    dcg = sum((2 ** relevance[c] - 1) / math.log2(i + 2) for i, c in enumerate(order))
    ideal = sum((2 ** relevance[c] - 1) / math.log2(i + 2) for i, c in enumerate(gold))
    return dcg / ideal if ideal else 1.0


def _ranking(params: Mapping[str, Any], schema: dict | None) -> Scorer:
    p = _params(_Ranking, params)
    items = _regex(p.prompt_items, re.MULTILINE)

    def scorer(prediction: str, example: Example) -> float:
        order, gold = _order(_json(prediction), p), _order(_json(example.reference), p)
        asked = sorted(set(items.findall(example.prompt)))
        valid = bool(order) and sorted(order) == asked and sorted(gold) == sorted(order)
        if p.output == "valid" or not valid:
            return float(valid)
        if p.output == "top1":
            return float(order[0] == gold[0])
        if p.output == "pairwise":
            return _pairwise(order, gold)
        return round(_ndcg(order, gold), 6)

    return scorer


# --- text answers -------------------------------------------------------------------------


class _Coverage(_Params):
    source: str = Field(
        description="regex (multi-line) whose first group, found in the prompt, holds the terms"
    )
    split: Literal["list", "words"] = Field(
        "list", description="list: the group is a separated list; words: its content words"
    )
    separator: str = ","
    prompt_until: str | None = Field(
        None, description="only the prompt before this text is searched"
    )
    stopwords: list[str] = Field(default_factory=list, description="words never counted (words)")
    min_length: int = Field(1, ge=1, description="shortest word counted (words)")
    stem: int | None = Field(
        None, ge=1, description="match on the first N letters, so 'accessible' covers 'access'"
    )


def _mentions(text: str, term: str, whole_word: bool) -> bool:
    end = r"(?!\w)" if whole_word else ""
    return re.search(rf"(?<!\w){re.escape(term.lower())}{end}", text.lower()) is not None


def _coverage(params: Mapping[str, Any], schema: dict | None) -> Scorer:
    p = _params(_Coverage, params)
    source, stop = _regex(p.source, re.MULTILINE), set(p.stopwords)
    if source.groups < 1:
        raise ValueError("source: the pattern needs a group that captures the terms")

    def terms(prompt: str) -> list[str]:
        if p.prompt_until is not None:
            prompt = prompt.split(p.prompt_until)[0]
        m = source.search(prompt)
        if not m:
            return []
        if p.split == "list":
            return [s.strip() for s in m.group(1).split(p.separator) if s.strip()]
        return [
            w for w in WORD.findall(m.group(1).lower()) if w not in stop and len(w) >= p.min_length
        ]

    def scorer(prediction: str, example: Example) -> float:
        found = terms(example.prompt)
        if not found:
            return 0.0
        hits = sum(
            _mentions(prediction, t[: p.stem] if p.stem else t, whole_word=p.stem is None)
            for t in found
        )
        return hits / len(found)

    return scorer


class _Length(_Params):
    min_words: int = Field(0, ge=0)
    max_words: int | None = Field(None, ge=1)


def _length(params: Mapping[str, Any], schema: dict | None) -> Scorer:
    p = _params(_Length, params)

    def scorer(prediction: str, example: Example) -> float:
        n = len(prediction.split())
        return float(p.min_words <= n and (p.max_words is None or n <= p.max_words))

    return scorer


class _Regex(_Params):
    pattern: str
    absent: bool = Field(False, description="score 1 when the pattern is NOT found")
    min_count: int = Field(1, ge=1, description="matches needed (when not absent)")
    ignore_case: bool = False
    multiline: bool = Field(True, description="^ and $ match at every line")
    nonempty: bool = Field(False, description="an empty answer scores 0 whatever the pattern")


def _regex_metric(params: Mapping[str, Any], schema: dict | None) -> Scorer:
    p = _params(_Regex, params)
    flags = (re.IGNORECASE if p.ignore_case else 0) | (re.MULTILINE if p.multiline else 0)
    pattern = _regex(p.pattern, flags)

    def scorer(prediction: str, example: Example) -> float:
        if p.nonempty and not prediction.strip():
            return 0.0
        if p.absent:
            return float(not pattern.search(prediction))
        return float(sum(1 for _ in pattern.finditer(prediction)) >= p.min_count)

    return scorer


class _Sections(_Params):
    sections: list[str] = Field(min_length=1, description="headings or keywords that must appear")
    at_line_start: bool = Field(True, description="each must start a line (a heading)")
    ignore_case: bool = False
    output: Literal["all", "share"] = Field(
        "all", description="all: 1 only when every one appears; share: the share that appears"
    )


def _sections(params: Mapping[str, Any], schema: dict | None) -> Scorer:
    p = _params(_Sections, params)
    flags = re.MULTILINE | (re.IGNORECASE if p.ignore_case else 0)
    patterns = [
        re.compile(("^" if p.at_line_start else "") + re.escape(s), flags) for s in p.sections
    ]

    def scorer(prediction: str, example: Example) -> float:
        found = sum(1 for pat in patterns if pat.search(prediction))
        return float(found == len(patterns)) if p.output == "all" else found / len(patterns)

    return scorer


class _Grounded(_Params):
    lines: str = Field(r"^\s*\d+[.)]\s", description="regex a line of interest starts with")
    min_shared_words: int = Field(3, ge=1, description="words a line must share with the prompt")


def _grounded(params: Mapping[str, Any], schema: dict | None) -> Scorer:
    p = _params(_Grounded, params)
    line = _regex(p.lines)

    def scorer(prediction: str, example: Example) -> float:
        prompt_words = set(WORD.findall(example.prompt.lower()))
        items = [ln for ln in prediction.splitlines() if line.match(ln)]
        grounded = sum(
            1
            for ln in items
            if len(set(WORD.findall(ln.lower())) & prompt_words) >= p.min_shared_words
        )
        return grounded / len(items) if items else 0.0

    return scorer


class _SafetyRule(_Params):
    rule: str = Field(description=f"one of: {', '.join(RULES)}")


def _safety_rule(params: Mapping[str, Any], schema: dict | None) -> Scorer:
    rule = _params(_SafetyRule, params).rule
    if rule not in RULES:
        raise ValueError(f"rule: unknown safety rule {rule!r}; known: {', '.join(RULES)}")
    check = RULES[rule]

    def scorer(prediction: str, example: Example) -> float:
        return float(check(prediction))

    return scorer


def _exact_match(params: Mapping[str, Any], schema: dict | None) -> Scorer:
    _params(_Params, params)

    def scorer(prediction: str, example: Example) -> float:
        return float(" ".join(prediction.split()) == " ".join(example.reference.split()))

    return scorer


class _AnyOf(_Params):
    of: list[str | dict] = Field(min_length=2, description="metric uses; the best score counts")


def _any_of(params: Mapping[str, Any], schema: dict | None) -> Scorer:
    p = _params(_AnyOf, params)
    scorers = [build_scorer(*_use(u), schema) for u in p.of]

    def scorer(prediction: str, example: Example) -> float:
        return max(s(prediction, example) for s in scorers)

    return scorer


def _use(use: str | Mapping[str, Any]) -> tuple[str, Mapping[str, Any]]:
    if isinstance(use, str):
        return use, {}
    if "metric" not in use:
        raise ValueError("of: each entry needs a 'metric'")
    return use["metric"], use.get("params") or {}


BUILTIN: dict[str, MetricFactory] = {
    "token_f1": lambda params, schema: (_params(_Params, params), token_f1)[1],
    "exact_match": _exact_match,
    "json_valid": _json_valid,
    "schema_valid": _schema_valid,
    "json_fields": _json_fields,
    "ranking": _ranking,
    "coverage": _coverage,
    "length": _length,
    "regex": _regex_metric,
    "sections": _sections,
    "grounded_lines": _grounded,
    "safety_rule": _safety_rule,
    "any_of": _any_of,
}


@cache
def _installed() -> dict[str, Any]:
    """Metrics that installed packages offer through the entry point group."""
    return {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}


def library() -> list[str]:
    """Every metric name a task may use: the built-ins, then installed ones."""
    return [*BUILTIN, *(n for n in sorted(_installed()) if n not in BUILTIN)]


def build_scorer(metric: str, params: Mapping[str, Any], answer_schema: dict | None) -> Scorer:
    """The scorer of one metric use.

    Raises:
        ValueError: An unknown metric, a package's metric that fails to load, or bad
            parameters, in one line.
    """
    factory = BUILTIN.get(metric)
    if factory is None:
        ep = _installed().get(metric)
        if ep is None:
            raise ValueError(f"unknown metric {metric!r}; known: {', '.join(library())}")
        try:
            factory = ep.load()
        except Exception as exc:  # a broken plug-in package: name it, don't crash
            raise ValueError(f"metric {metric!r} ({ep.value}) failed to load: {exc}") from None
    try:
        scorer = factory(params, answer_schema)
    except ValueError:
        raise
    except Exception as exc:  # a plug-in's own mistake, reported as its metric's
        raise ValueError(f"metric {metric!r}: {type(exc).__name__}: {exc}") from None
    if not callable(scorer):
        raise ValueError(
            f"metric {metric!r}: its factory returned {type(scorer).__name__}, not a scorer"
        )
    return scorer
