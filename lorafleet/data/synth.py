"""Synthetic expansion of the human gold set.

One interface (:class:`Generator`), generators chosen by name: ``programmatic`` (here)
and ``teacher`` (:mod:`lorafleet.data.teacher`, an LLM behind an OpenAI-compatible
endpoint). The programmatic generator
is seed-grounded: it takes a real seed conversation and changes the facts that vary in
real traffic (budgets, durations, names, interchangeable skills, phrasing) *consistently
across every turn*, so the assistant's answer stays correct for the changed question.
It is deterministic for a seed.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from lorafleet.errors import LorafleetError
from lorafleet.fleet import DataRules, SynthesisSettings, TaskDefinition
from lorafleet.llm import EndpointNames
from lorafleet.records import Message, Record

__all__ = ["Generator", "ProgrammaticGenerator", "SynthesisResult", "make_generator", "synthesize"]

# Skills a client could swap for one another without changing the rest of the job.
SKILL_GROUPS: tuple[tuple[str, ...], ...] = (
    ("React", "Vue.js", "Svelte", "Angular"),
    ("Node.js", "Django", "Laravel", "Ruby on Rails", "FastAPI"),
    ("PostgreSQL", "MySQL"),
    ("Figma", "Sketch", "Adobe XD"),
    ("Flutter", "React Native"),
    ("Tableau", "Power BI", "Looker Studio"),
    ("AWS", "GCP", "Azure"),
    ("Shopify", "WooCommerce", "BigCommerce"),
    ("Spanish", "French", "German", "Portuguese", "Italian"),
    ("Mailchimp", "Klaviyo"),
    ("Premiere Pro", "DaVinci Resolve", "Final Cut Pro"),
    ("QuickBooks", "Xero"),
    ("Zendesk", "Freshdesk", "Intercom"),
    ("PyTorch", "TensorFlow"),
    ("Terraform", "Pulumi"),
    ("GitHub Actions", "GitLab CI"),
    ("WordPress", "Webflow"),
)
FIRST_NAMES = (
    "Amara",
    "Bruno",
    "Chen",
    "Dalia",
    "Emeka",
    "Farah",
    "Goran",
    "Hana",
    "Ivan",
    "Jonas",
    "Keiko",
    "Lucia",
    "Mateo",
    "Nadia",
    "Omar",
    "Priya",
    "Rafael",
    "Sofia",
    "Tariq",
    "Yuki",
)
# Client phrasings that mean the same thing; only user turns are rephrased.
PHRASES: tuple[tuple[str, ...], ...] = (
    ("I need", "I'm looking for", "We need"),
    ("Looking for", "Seeking", "Searching for"),
    ("as soon as possible", "soon", "quickly"),
    ("Thanks", "Thank you", "Thanks in advance"),
)
MONEY = re.compile(r"\$(\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(k\b)?")
DURATION = re.compile(r"\b(\d{1,2}) (day|week|month)(s?)\b")
NAME_LINE = re.compile(r"^Name: ([A-Z][a-z]+)\s*$", re.MULTILINE)


class Generator(Protocol):
    """Anything that turns seed records into new synthetic records.

    A generator may also expose ``stats`` (a dict) describing its last run.
    """

    name: str

    def generate(self, seeds: list[Record], per_seed: int) -> Iterable[Record]:
        """Yield up to ``per_seed`` new records per seed, each with ``meta.seed_ids``."""
        ...


def _round_like_a_person(value: float) -> int:
    """Round a money amount the way people write it."""
    step = 5 if value < 200 else 50 if value < 2000 else 100 if value < 10000 else 500
    return max(step, int(round(value / step) * step))


def _fmt_money(value: int, had_comma: bool, had_k: bool) -> str:
    if had_k:
        return f"${value / 1000:g}k"
    return f"${value:,}" if had_comma or value >= 10000 else f"${value}"


@dataclass
class _Plan:
    """The consistent changes for one variant."""

    factor: float
    durations: dict[int, int]
    names: dict[str, str]
    skills: dict[str, str]
    phrases: dict[str, str]

    def describe(self) -> list[str]:
        out = [f"money x{self.factor:g}"] if self.factor != 1 else []
        out += [
            f"{a} -> {b}" for d in (self.names, self.skills, self.phrases) for a, b in d.items()
        ]
        out += [f"{a} -> {b} (duration)" for a, b in self.durations.items()]
        return out


def _sub_words(text: str, mapping: dict[str, str]) -> str:
    if not mapping:
        return text
    pattern = re.compile(
        r"(?<![\w.])("
        + "|".join(re.escape(k) for k in sorted(mapping, key=len, reverse=True))
        + r")(?![\w])"
    )
    return pattern.sub(lambda m: mapping[m.group(1)], text)


class ProgrammaticGenerator:
    """Seed-grounded variants with consistent fact changes; deterministic for ``seed``."""

    name = "programmatic"

    def __init__(self, seed: int = 0) -> None:
        self.seed = seed

    def _rng(self, record_id: str, k: int) -> random.Random:
        digest = hashlib.sha256(f"{self.seed}:{record_id}:{k}".encode()).digest()
        return random.Random(int.from_bytes(digest[:8], "big"))

    def _plan(self, text: str, rng: random.Random) -> _Plan:
        factor = rng.choice((0.6, 0.75, 0.8, 1.25, 1.5, 2.0))
        durations = {}
        for n in sorted({int(m.group(1)) for m in DURATION.finditer(text)}):
            durations[n] = max(1, n + rng.choice((-1, 1, 2)))
        names = {
            n: rng.choice([f for f in FIRST_NAMES if f != n]) for n in set(NAME_LINE.findall(text))
        }
        skills = {}
        for group in SKILL_GROUPS:
            for s in group:
                if re.search(rf"(?<![\w.]){re.escape(s)}(?!\w)", text) and rng.random() < 0.6:
                    choices = [
                        g
                        for g in group
                        if g != s and not re.search(rf"(?<![\w.]){re.escape(g)}(?!\w)", text)
                    ]
                    if choices:
                        skills[s] = rng.choice(choices)
        phrases = {}
        for group in PHRASES:
            for p in group:
                if p in text and rng.random() < 0.7:
                    phrases[p] = rng.choice([g for g in group if g != p])
        return _Plan(factor, durations, names, skills, phrases)

    @staticmethod
    def _apply_json(content: str, plan: _Plan, money: Callable[[float], int]) -> str:
        """Scale numeric budgets inside a JSON answer the same way as the text."""
        try:
            obj = json.loads(content)
        except json.JSONDecodeError:
            return content
        budget = obj.get("budget") if isinstance(obj, dict) else None
        if not isinstance(budget, dict):
            return content
        for key in ("min", "max"):
            if isinstance(budget.get(key), int | float) and not isinstance(budget.get(key), bool):
                budget[key] = money(budget[key])
        return json.dumps(obj, ensure_ascii=False)

    def _apply(self, msg: Message, plan: _Plan) -> Message:
        def money(value: float) -> int:
            return _round_like_a_person(value * plan.factor)

        text = msg.content
        if text.lstrip().startswith("{"):
            text = self._apply_json(text, plan, money)

        def money_sub(m: re.Match) -> str:
            raw, k = m.group(1), m.group(2)
            value = int(raw.replace(",", "")) * (1000 if k else 1)
            return _fmt_money(money(value), "," in raw, bool(k))

        text = MONEY.sub(money_sub, text)
        text = re.sub(
            r"(\$\d[\d,]*)-(\d[\d,]*)(?=/hr)",
            lambda m: f"{m.group(1)}-{money(int(m.group(2).replace(',', '')))}",
            text,
        )
        text = DURATION.sub(
            lambda m: (
                f"{plan.durations.get(int(m.group(1)), int(m.group(1)))} {m.group(2)}"
                + ("s" if plan.durations.get(int(m.group(1)), int(m.group(1))) != 1 else "")
            ),
            text,
        )
        text = _sub_words(text, {**plan.names, **plan.skills})
        if msg.role == "user":
            text = _sub_words(text, plan.phrases)
        return Message(role=msg.role, content=text)

    def generate(self, seeds: list[Record], per_seed: int) -> Iterable[Record]:
        """Yield up to ``per_seed`` distinct variants of every seed."""
        for seed in seeds:
            text = "\n".join(m.content for m in seed.messages)
            seen = {text}
            for k in range(per_seed * 3):  # a few spare tries for seeds with little to vary
                if len(seen) > per_seed:
                    break
                plan = self._plan(text, self._rng(seed.id, k))
                messages = [self._apply(m, plan) for m in seed.messages]
                body = "\n".join(m.content for m in messages)
                if body in seen:
                    continue
                seen.add(body)
                yield Record(
                    id=f"{seed.id}-syn{len(seen) - 1}",
                    task=seed.task,
                    messages=messages,
                    source="synthetic",
                    meta={
                        "generator": self.name,
                        "generator_seed": self.seed,
                        "seed_ids": [seed.id],
                        "changes": plan.describe(),
                        **{k: v for k, v in seed.meta.items() if k == "category"},
                    },
                )


@dataclass
class SynthesisResult:
    """The generated records and what the generator reports about the run."""

    records: list[Record]
    stats: dict


def make_generator(
    settings: SynthesisSettings,
    task: TaskDefinition | str = "chat",
    rules: DataRules | None = None,
    work_dir: str | Path | None = None,
    on_job: Callable[[], None] | None = None,
    pool: list[Record] | None = None,
    names: EndpointNames | None = None,
) -> Generator:
    """The generator named by the spec.

    Args:
        settings: the expert's synthesis settings.
        task: the expert's task definition, or a shipped task's name (the teacher's prompts
            and checks need it).
        rules: the expert's data rules (the teacher's output is validated with them).
        work_dir: the teacher's resumable work directory (required for ``teacher``).
        on_job: progress callback, called once per finished teacher job.
        pool: all seeds, when only a shard of them is expanded (teacher prompts sample examples from it).
        names: how the teacher's errors name its endpoint settings (default: the spec's
            fields; the CLI passes the flags the user typed).

    Raises:
        LorafleetError: for a teacher without a work directory.
    """
    if settings.generator == "programmatic":
        return ProgrammaticGenerator(seed=settings.seed)
    if settings.generator == "teacher" and settings.teacher is not None:
        if work_dir is None:
            raise LorafleetError(
                "synthesis.generator 'teacher' needs a work directory for its resumable shards"
            )
        from lorafleet.data.teacher import TeacherGenerator

        return TeacherGenerator(
            settings.teacher,
            task,
            work_dir,
            rules,
            settings.judge,
            settings.seed,
            on_job,
            pool,
            names,
        )
    raise LorafleetError(f"synthesis.generator: no generator called {settings.generator!r}")


def synthesize(
    seeds: list[Record],
    settings: SynthesisSettings,
    task: TaskDefinition | str = "chat",
    rules: DataRules | None = None,
    work_dir: str | Path | None = None,
    on_job: Callable[[], None] | None = None,
    pool: list[Record] | None = None,
    names: EndpointNames | None = None,
) -> SynthesisResult:
    """Expand ``seeds`` with the spec's generator; the seeds themselves are not included.

    Arguments are those of :func:`make_generator`.
    """
    if settings.generator == "none" or settings.per_seed == 0:
        return SynthesisResult([], {"generator": settings.generator, "records": 0})
    generator = make_generator(settings, task, rules, work_dir, on_job, pool, names)
    records = list(generator.generate(seeds, settings.per_seed))
    return SynthesisResult(
        records,
        {"generator": generator.name, "records": len(records), **getattr(generator, "stats", {})},
    )
