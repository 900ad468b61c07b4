"""Synthesis with a teacher LLM behind any OpenAI-compatible endpoint.

Each *job* asks the teacher for one new conversation, grounded in seed records sampled
for that job (the seed it expands plus a few others as examples). Jobs are planned
deterministically from the seeds and settings, so a run can stop anywhere and go on:

- answers are appended to sharded JSONL files in a work directory (job ``i`` goes to
  shard ``i % shards``), one line per finished job, flushed as it is written;
- on start, finished jobs are read back and skipped; a torn last line (a killed writer)
  is cut off; a work directory made with other settings is refused;
- the final set is assembled from the shards in job order, so an interrupted and
  resumed run yields the same records as an uninterrupted one.

Requests go through the project's OpenAI client (:mod:`lorafleet.llm`), ``concurrency`` at
a time with a timeout each; timeouts, transport errors, 429 and 5xx are retried with
exponential backoff (``Retry-After`` is honoured up to a cap). The API key comes from
``api_key_file`` or ``api_key_env``; a named source that is missing stops the run before
any request. A request that fails for good, or an answer that is no chat completion, fails
its one job (counted, and asked again on resume); the run goes on. What comes back is
parsed and checked (JSON shape, then the expert's GX suite); an optional judge scores each
parsed record on a rubric and low scores are dropped. Every drop is counted by reason.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import random
import re
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from openai import AsyncOpenAI
from pydantic import ValidationError

from lorafleet.errors import LorafleetError
from lorafleet.fleet import DataRules, JudgeSettings, TaskDefinition, TeacherSettings
from lorafleet.fleet.tasks import resolve_task
from lorafleet.io import atomic_write_json, sha256_json
from lorafleet.llm import (
    CompletionError,
    EndpointNames,
    RetryPolicy,
    chat_async,
    make_async_client,
    preflight,
)
from lorafleet.records import Message, Record

__all__ = [
    "Job",
    "TeacherGenerator",
    "load_done",
    "parse_response",
    "parse_score",
    "plan_jobs",
]

log = logging.getLogger(__name__)

SHARDS = 8
PROMPT_VERSION = 2  # bump when the prompts change: old work directories are then refused

# What the teacher is told when its task gives no instructions of its own.
TEACHER_DEFAULT = (
    "You write training data for an AI assistant. You get the assistant's instructions and example "
    "conversations. Write ONE new conversation for the same task: different people, subjects and wording, "
    "with the same structure and answer format as the examples and an answer that is correct for the new "
    "question. Never include e-mail addresses, phone numbers or payment details."
)
# The reply format the parser needs, added to every task's instructions.
TEACHER_FORMAT = (
    "Reply with one JSON object only: "
    '{"messages": [{"role": "user", "content": "..."}, {"role": "assistant", "content": "..."}]} '
    "(more user/assistant pairs if the examples have them)."
)
JUDGE_DEFAULT = (
    "5 = realistic, the answer is correct and complete for the question and follows the instructions "
    "and format; 3 = usable with flaws; 1 = wrong, off-task, unsafe or contains personal data."
)
JUDGE_FORMAT = "Reply with the score digit only."


def teacher_system(task: TaskDefinition) -> str:
    """The teacher's system prompt: the task's instructions, then the reply format."""
    return f"{task.synthesis.teacher_prompt or TEACHER_DEFAULT} {TEACHER_FORMAT}"


def judge_system(task: TaskDefinition) -> str:
    """The synthesis judge's system prompt: grade 1-5 by the task's rubric."""
    return (
        "You grade training examples for an AI assistant from 1 to 5. "
        f"{task.synthesis.judge_rubric or JUDGE_DEFAULT} {JUDGE_FORMAT}"
    )


@dataclass(frozen=True)
class Job:
    """One request to the teacher: its stable key, the seeds it is grounded in, and the chat."""

    index: int
    key: str
    seed_id: str
    example_ids: tuple[str, ...]
    messages: tuple[dict, ...]


def _turns(record: Record) -> list[dict]:
    return [{"role": m.role, "content": m.content} for m in record.messages if m.role != "system"]


def _system(record: Record) -> str | None:
    return record.messages[0].content if record.messages[0].role == "system" else None


def plan_jobs(
    seeds: list[Record],
    per_seed: int,
    task: TaskDefinition | str,
    settings: TeacherSettings,
    seed: int,
    pool: list[Record] | None = None,
) -> list[Job]:
    """The jobs of a run, deterministic for the seeds and settings.

    Args:
        seeds: the gold records to expand.
        per_seed: new conversations per seed.
        task: the expert's task definition (a name means the shipped task).
        settings: the teacher's settings (model, examples per prompt).
        seed: the synthesis seed; changes which examples each job shows.
        pool: the records examples are sampled from (default: ``seeds``); a shard of the
            seeds passes the whole seed set, so its jobs equal the unsharded run's.

    Returns:
        Jobs in order; ``key`` names a job across runs.
    """
    jobs = []
    pool = seeds if pool is None else pool
    definition = resolve_task(task)
    task, system = definition.name, teacher_system(definition)
    for seed_record in seeds:
        for k in range(per_seed):
            key = hashlib.sha256(
                f"{PROMPT_VERSION}:{seed}:{settings.model}:{seed_record.id}:{k}".encode()
            ).hexdigest()[:20]
            rng = random.Random(int(key, 16))
            others = [s for s in pool if s.id != seed_record.id]
            examples = [
                seed_record,
                *rng.sample(others, min(len(others), settings.examples_per_prompt - 1)),
            ]
            instructions = _system(seed_record) or f"You are the {task} assistant."
            shown = "\n\n".join(
                f"Example {i}:\n{json.dumps({'messages': _turns(r)}, ensure_ascii=False)}"
                for i, r in enumerate(examples, 1)
            )
            user = (
                f"Task: {task}\nAssistant instructions: {instructions}\n\n{shown}\n\n"
                f"Write new conversation number {k + 1} for this task, in the JSON format above."
            )
            messages = (
                {"role": "system", "content": system},
                {"role": "user", "content": user},
            )
            jobs.append(
                Job(len(jobs), key, seed_record.id, tuple(r.id for r in examples), messages)
            )
    return jobs


def _first_json_object(text: str) -> object | None:
    """The first JSON object in ``text`` (models wrap JSON in prose or code fences)."""
    decoder = json.JSONDecoder()
    for m in re.finditer(r"\{", text):
        try:
            return decoder.raw_decode(text, m.start())[0]
        except ValueError:
            continue
    return None


def parse_response(text: str, job: Job, seed: Record, task: str, model: str) -> Record | str:
    """Turn the teacher's answer into a record, or the reason it cannot be one.

    Args:
        text: the completion's content.
        job: the job it answers.
        seed: the seed the job expands (its system prompt is kept).
        task: the expert's task.
        model: the teacher model (provenance).

    Returns:
        The record, or a drop reason: ``no-json`` or ``bad-shape``.
    """
    obj = _first_json_object(text)
    if not isinstance(obj, dict):
        return "no-json"
    turns = obj.get("messages")
    if not isinstance(turns, list) or not turns:
        return "bad-shape"
    try:
        messages = [Message.model_validate(t) for t in turns]
    except ValidationError:
        return "bad-shape"
    if any(m.role == "system" for m in messages):
        return "bad-shape"
    system = [Message(role="system", content=s)] if (s := _system(seed)) else []
    return Record(
        id=f"{seed.id}-t{job.key[:10]}",
        task=task,
        messages=[*system, *messages],
        source="synthetic",
        meta={
            "generator": "teacher",
            "teacher_model": model,
            "seed_ids": list(job.example_ids),
            "job": job.key,
        },
    )


def parse_score(text: str) -> int | None:
    """The judge's 1-5 score: the first such digit standing alone, if any."""
    m = re.search(r"(?<!\d)([1-5])(?!\d)", text)
    return int(m.group(1)) if m else None


def _shard_path(work_dir: Path, index: int) -> Path:
    return work_dir / f"shard-{index % SHARDS:05d}.jsonl"


def load_done(work_dir: Path) -> dict[str, dict]:
    """Finished jobs by key, read from the shards; a torn last line is cut off the file."""
    done: dict[str, dict] = {}
    for path in sorted(work_dir.glob("shard-*.jsonl")):
        data = path.read_bytes()
        cut = data.rfind(b"\n") + 1
        if cut < len(data):
            log.warning(
                "%s: dropping a torn last line (%d bytes) from an interrupted run",
                path,
                len(data) - cut,
            )
            with open(path, "r+b") as fh:
                fh.truncate(cut)
        for line in data[:cut].splitlines():
            entry = json.loads(line)
            done[entry["key"]] = entry
    return done


class TeacherGenerator:
    """Seed-grounded synthesis by a teacher LLM; resumable through ``work_dir``.

    Args:
        settings: endpoint, model, concurrency, timeouts and retries.
        task: the expert's task.
        work_dir: where shards and the run's plan are kept.
        rules: the expert's data rules (the GX suite checks what comes back).
        judge: optional judge filter.
        seed: the synthesis seed.
        on_job: called after each finished job (progress bars).
        pool: the records prompts sample examples from (default: the seeds given to ``generate``).
        names: how errors name the endpoint's settings (default: the spec's
            ``synthesis.teacher`` fields; the CLI passes the flags the user typed).
    """

    name = "teacher"

    def __init__(
        self,
        settings: TeacherSettings,
        task: TaskDefinition | str,
        work_dir: str | Path,
        rules: DataRules | None = None,
        judge: JudgeSettings | None = None,
        seed: int = 0,
        on_job: Callable[[], None] | None = None,
        pool: list[Record] | None = None,
        names: EndpointNames | None = None,
    ) -> None:
        self.names = names or EndpointNames.spec("synthesis.teacher")
        self.definition = resolve_task(task)
        self.task = self.definition.name
        self.settings, self.work_dir, self.pool = settings, Path(work_dir), pool
        self.rules, self.judge, self.seed, self.on_job = rules or DataRules(), judge, seed, on_job
        self.stats: dict = {}

    # -- the plan and the work directory ------------------------------------------------

    def _fingerprint(self, jobs: list[Job]) -> dict:
        settings = self.settings.model_dump(
            mode="json", include={"model", "max_tokens", "temperature", "examples_per_prompt"}
        )
        return {
            "prompt_version": PROMPT_VERSION,
            "task": self.task,
            "task_digest": self.definition.digest(),
            "teacher": settings,
            "judge": self.judge.model_dump(mode="json") if self.judge else None,
            "jobs_sha256": sha256_json([j.key for j in jobs]),
        }

    def _open_work_dir(self, jobs: list[Job]) -> dict[str, dict]:
        self.work_dir.mkdir(parents=True, exist_ok=True)
        plan_path = self.work_dir / "plan.json"
        plan = self._fingerprint(jobs)
        if plan_path.is_file():
            if json.loads(plan_path.read_text()) != plan:
                raise LorafleetError(
                    f"{self.work_dir}: this work directory was made with other seeds or settings; use a new --work-dir"
                )
        else:
            atomic_write_json(plan_path, plan)
        return load_done(self.work_dir)

    # -- requests ------------------------------------------------------------------------

    async def _chat(
        self, client: AsyncOpenAI, model: str, messages: list[dict], max_tokens: int, seed: int
    ) -> str:
        """One chat completion with the settings' retries; returns the content.

        Raises:
            CompletionError: when the request failed for good or the answer is malformed.
        """
        s = self.settings
        completion = await chat_async(
            client,
            RetryPolicy(s.max_retries, s.backoff_s),
            model=model,
            messages=messages,
            max_tokens=max_tokens,
            temperature=s.temperature,
            seed=seed,
        )
        return completion.text

    async def _run_job(self, client: AsyncOpenAI, job: Job, seed: Record) -> dict:
        s = self.settings
        text = await self._chat(
            client, s.model, list(job.messages), s.max_tokens, int(job.key[:8], 16)
        )
        entry: dict = {"key": job.key, "index": job.index, "response": text}
        parsed = parse_response(text, job, seed, self.task, s.model)
        if self.judge is not None and isinstance(parsed, Record):
            shown = json.dumps({"messages": _turns(parsed)}, ensure_ascii=False)
            judge_messages = [
                {"role": "system", "content": judge_system(self.definition)},
                {
                    "role": "user",
                    "content": f"Task: {self.task}\nInstructions: {_system(seed) or '-'}\n\nExample:\n{shown}",
                },
            ]
            entry["judge"] = await self._chat(
                client, self.judge.model or s.model, judge_messages, 8, int(job.key[8:16], 16)
            )
        return entry

    async def _run(
        self, pending: list[Job], seeds: dict[str, Record], api_key: str | None
    ) -> Counter[str]:
        failures: Counter[str] = Counter()
        queue: asyncio.Queue[Job] = asyncio.Queue()
        for job in pending:
            queue.put_nowait(job)
        files: dict[Path, object] = {}

        async def worker(client: AsyncOpenAI) -> None:
            while not queue.empty():
                job = queue.get_nowait()
                try:
                    entry = await self._run_job(client, job, seeds[job.seed_id])
                except CompletionError as exc:
                    log.warning("teacher job %s failed: %s", job.key, exc)
                    failures["request-failed"] += 1
                else:
                    path = _shard_path(self.work_dir, job.index)
                    fh = files.get(path) or files.setdefault(path, open(path, "ab"))  # noqa: SIM115 - closed below
                    # One write per line, flushed: a kill leaves at most one torn line, cut off on resume.
                    fh.write((json.dumps(entry, ensure_ascii=False) + "\n").encode())
                    fh.flush()
                if self.on_job:
                    self.on_job()

        s = self.settings
        try:
            async with make_async_client(s.base_url, api_key, s.timeout_s) as client:
                await asyncio.gather(*(worker(client) for _ in range(s.concurrency)))
        finally:
            for fh in files.values():
                fh.close()
        return failures

    # -- assembly ------------------------------------------------------------------------

    def assemble(
        self, jobs: list[Job], seeds: dict[str, Record], done: dict[str, dict]
    ) -> tuple[list[Record], Counter[str]]:
        """The final records from finished jobs, in job order, and drops per reason."""
        from lorafleet.data.validate import validate_records

        drops: Counter[str] = Counter()
        parsed: list[Record] = []
        for job in jobs:
            entry = done.get(job.key)
            if entry is None:
                drops["not-finished"] += 1
                continue
            result = parse_response(
                entry["response"], job, seeds[job.seed_id], self.task, self.settings.model
            )
            if isinstance(result, str):
                drops[result] += 1
                continue
            if self.judge is not None:
                score = parse_score(entry.get("judge", ""))
                if score is None:
                    drops["judge-unparseable"] += 1
                    continue
                if score < self.judge.min_score:
                    drops["judge-low-score"] += 1
                    continue
                result.meta["judge_score"] = score
            parsed.append(result)
        if not parsed:
            return [], drops
        report = validate_records(parsed, self.definition, self.rules, name="teacher output")
        bad = {f.line: f.rule for f in report.failures}
        drops.update(bad.values())
        return [r for i, r in enumerate(parsed, start=1) if i not in bad], drops

    def generate(self, seeds: list[Record], per_seed: int) -> Iterable[Record]:
        """Run (or resume) the jobs, then yield the records that passed every check.

        ``self.stats`` then holds the job counts and drops per reason.
        """
        jobs = plan_jobs(seeds, per_seed, self.definition, self.settings, self.seed, self.pool)
        done = self._open_work_dir(jobs)
        pending = [j for j in jobs if j.key not in done]
        by_id = {s.id: s for s in seeds}
        log.info(
            "teacher: %d jobs, %d already done, %d to run",
            len(jobs),
            len(jobs) - len(pending),
            len(pending),
        )
        failures: Counter[str] = Counter()
        if pending:
            # Before any request: a named key source that is missing stops the run here.
            s = self.settings
            api_key = preflight(s.base_url, self.names, s.api_key_env, s.api_key_file)
            failures = asyncio.run(self._run(pending, by_id, api_key))
            if pending and failures["request-failed"] == len(pending):
                raise LorafleetError(
                    f"{self.names.base_url}: all {len(pending)} requests to {self.settings.base_url} "
                    f"failed (see the warnings above); nothing was synthesized"
                )
        records, drops = self.assemble(jobs, by_id, load_done(self.work_dir))
        self.stats = {
            "jobs": len(jobs),
            "resumed": len(jobs) - len(pending),
            "requested": len(pending),
            "request_failures": dict(failures),
            "kept": len(records),
            "dropped": dict(sorted(drops.items())),
        }
        yield from records
