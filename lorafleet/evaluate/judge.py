"""LLM-as-judge, pairwise: is the candidate's answer better than the reference's (production's)?

Every item is judged twice through any OpenAI-compatible chat endpoint, once with the
candidate shown as answer A and once as answer B, so a judge that prefers a position
cancels out. The judge must end with ``[[A]]``, ``[[B]]`` or ``[[TIE]]``
(``Verdict: A`` and a bare ``A`` / ``B`` / ``tie`` are accepted too).

Scoring rule (documented in docs/evaluation.md): per order the candidate scores 1 for a
win, 0 for a loss and 0.5 for a tie; **an unparseable verdict scores nothing**: it is
excluded and counted, and the share of orders whose verdict parsed (``parse_rate``) is
reported, so the gate can refuse a judge that mostly cannot answer (scoring gibberish as
ties would let a judge that never decides hold the win rate at 0.5 and pass a bar of 0.5).
An item's score is the mean of its parsed orders (an item with none has no score); the win
rate is the mean over scored items, with a percentile bootstrap confidence interval over
them from a seeded generator, so it is reproducible.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from openai import OpenAI

from lorafleet.errors import LorafleetError
from lorafleet.llm import CompletionError, RetryPolicy, chat, make_client, resolve_api_key

__all__ = [
    "JudgeClient",
    "Verdict",
    "aggregate",
    "bootstrap_ci",
    "judge_pairwise",
    "judge_prompt",
    "parse_verdict",
]

Verdict = str  # "A", "B", "tie" or "unparseable"
SCORE = {"win": 1.0, "loss": 0.0, "tie": 0.5}
OUTCOMES = (*SCORE, "unparseable")

_BRACKETED = re.compile(r"\[\[\s*(A|B|TIE)\s*\]\]", re.I)
_LABELLED = re.compile(r"\b(?:verdict|winner|answer)\s*[:=]\s*\**\s*(A|B|tie)\b", re.I)
_BARE = re.compile(r"^\W*(A|B|tie)\W*$", re.I)

INSTRUCTIONS = (
    "You compare two answers to the same request for a work-marketplace assistant. Judge which "
    "answer follows the system instructions and serves the user better: correct, specific, complete, "
    "on the platform. Ignore the order of the answers and their length. Reply with one short reason, "
    "then the verdict on its own line: [[A]], [[B]] or [[TIE]]."
)


def parse_verdict(text: str) -> Verdict:
    """The verdict in a judge's reply: the last ``[[X]]``, else a ``Verdict: X`` line, else a bare ``X``.

    Returns:
        ``"A"``, ``"B"``, ``"tie"`` or ``"unparseable"``.
    """
    for pattern in (_BRACKETED, _LABELLED):
        found = pattern.findall(text)
        if found:
            return _norm(found[-1])
    bare = _BARE.match(text.strip())
    return _norm(bare.group(1)) if bare else "unparseable"


def _norm(token: str) -> Verdict:
    return "tie" if token.lower() == "tie" else token.upper()


def judge_prompt(
    messages: Sequence[Mapping[str, str]], first: str, second: str
) -> list[dict[str, str]]:
    """The chat sent to the judge for one order: the request, then answers A and B."""
    request = "\n\n".join(f"[{m['role']}]\n{m['content']}" for m in messages)
    return [
        {"role": "system", "content": INSTRUCTIONS},
        {
            "role": "user",
            "content": f"Request:\n{request}\n\nAnswer A:\n{first}\n\nAnswer B:\n{second}\n\nVerdict?",
        },
    ]


def _outcome(verdict: Verdict, candidate_is: str) -> str:
    if verdict in ("tie", "unparseable"):
        return verdict
    return "win" if verdict == candidate_is else "loss"


def bootstrap_ci(
    scores: Sequence[float], confidence: float = 0.95, resamples: int = 1000, seed: int = 0
) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of ``scores`` (resampling items, seeded).

    Returns:
        ``(low, high)``; ``(nan, nan)`` for no scores.
    """
    import numpy as np

    if not scores:
        return float("nan"), float("nan")
    values = np.asarray(scores, dtype=float)
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, len(values), size=(resamples, len(values)))].mean(axis=1)
    alpha = (1 - confidence) / 2
    return float(np.quantile(means, alpha)), float(np.quantile(means, 1 - alpha))


def aggregate(
    verdicts: Sequence[tuple[Verdict, Verdict]],
    confidence: float = 0.95,
    resamples: int = 1000,
    seed: int = 0,
) -> dict:
    """Fold verdict pairs into a win rate with its confidence interval.

    Args:
        verdicts: per item, ``(verdict with the candidate as A, verdict with the candidate as B)``.
        confidence: two-sided level of the interval.
        resamples: bootstrap resamples.
        seed: bootstrap seed.

    Returns:
        ``{"items", "scored_items", "win_rate", "ci_low", "ci_high", "confidence", "outcomes",
        "parse_rate", "position_consistency"}``; ``outcomes`` counts win/loss/tie/unparseable
        over both orders; ``parse_rate`` is the share of orders whose verdict parsed;
        ``position_consistency`` is the share of items whose two orders agree (a low value
        means the judge follows position). The win rate and its interval are ``None`` when no
        verdict parsed.
    """
    outcomes: Counter[str] = Counter()
    scores, agree = [], 0
    for as_a, as_b in verdicts:
        first, second = _outcome(as_a, "A"), _outcome(as_b, "B")
        outcomes.update([first, second])
        parsed = [SCORE[o] for o in (first, second) if o in SCORE]
        if parsed:
            scores.append(sum(parsed) / len(parsed))
        agree += first == second and first != "unparseable"
    low, high = bootstrap_ci(scores, confidence, resamples, seed)
    items, scored = len(verdicts), len(scores)
    orders = 2 * items
    return {
        "items": items,
        "scored_items": scored,
        "win_rate": round(sum(scores) / scored, 4) if scored else None,
        "ci_low": round(low, 4) if scored else None,
        "ci_high": round(high, 4) if scored else None,
        "confidence": confidence,
        "outcomes": {k: outcomes[k] for k in OUTCOMES},
        "parse_rate": round((orders - outcomes["unparseable"]) / orders, 4) if orders else None,
        "position_consistency": round(agree / items, 4) if items else None,
    }


@dataclass
class JudgeClient:
    """A chat model behind an OpenAI-compatible ``/chat/completions`` endpoint.

    The key is read when the client is made, so a missing key stops the evaluate step before
    any answer is generated. Failed requests (timeouts, 429, 5xx) are retried by ``retry``.

    Attributes:
        base_url: the API root, e.g. ``http://127.0.0.1:8080/openai/v1``.
        model: the served model name.
        api_key_env: environment variable holding the API key; ``None``: a server without keys.
        max_tokens: reply budget.
        timeout: seconds per request.
        retry: how failed requests are retried.

    Raises:
        ApiKeyError: if ``api_key_env`` is named but not set.
    """

    base_url: str
    model: str
    api_key_env: str | None = None
    max_tokens: int = 64
    timeout: float = 120.0
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    _client: OpenAI = field(init=False, repr=False)

    def __post_init__(self) -> None:
        key = resolve_api_key("gate.judge", self.api_key_env)
        self._client = make_client(self.base_url, key, self.timeout)

    def complete(self, messages: Sequence[Mapping[str, str]]) -> str:
        """The judge's greedy reply to one chat.

        Raises:
            LorafleetError: if the endpoint fails for good or answers something that is no chat completion.
        """
        try:
            return chat(
                self._client,
                self.retry,
                model=self.model,
                messages=list(messages),
                temperature=0,
                max_tokens=self.max_tokens,
            ).text
        except CompletionError as exc:
            url = self.base_url.rstrip("/") + "/chat/completions"
            raise LorafleetError(f"judge: {url} model {self.model!r}: {exc}") from exc


def judge_pairwise(
    complete: Callable[[Sequence[Mapping[str, str]]], str],
    prompts: Sequence[Sequence[Mapping[str, str]]],
    candidate: Sequence[str],
    reference: Sequence[str],
    confidence: float = 0.95,
    resamples: int = 1000,
    seed: int = 0,
    on_item: Callable[[], None] | None = None,
) -> dict:
    """Judge the candidate's answers against the reference's, both orders per item.

    Args:
        complete: the judge (e.g. :meth:`JudgeClient.complete`): chat -> reply text.
        prompts: the chat each pair of answers replies to.
        candidate: the candidate's answers.
        reference: the reference arm's answers (production, or the base model).
        confidence: two-sided level of the interval.
        resamples: bootstrap resamples.
        seed: bootstrap seed.
        on_item: called after each judged item (progress bars).

    Returns:
        :func:`aggregate`'s result plus ``"examples"``: the first replies, for the report.
    """
    verdicts, examples = [], []
    for messages, cand, ref in zip(prompts, candidate, reference, strict=True):
        as_a = complete(judge_prompt(messages, cand, ref))
        as_b = complete(judge_prompt(messages, ref, cand))
        verdicts.append((parse_verdict(as_a), parse_verdict(as_b)))
        if len(examples) < 3:
            examples.append(
                {
                    "candidate_as_a": as_a[:300],
                    "candidate_as_b": as_b[:300],
                    "verdicts": list(verdicts[-1]),
                }
            )
        if on_item is not None:
            on_item()
    return {**aggregate(verdicts, confidence, resamples, seed), "examples": examples}
