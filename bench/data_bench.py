"""Data-stage throughput: GX validation at 100k records, its overhead over plain pandas,
and MinHash-LSH near-dedup scaling (10k / 50k / 100k records).

Records are built from the shipped gold seeds (all five experts): each is a seed with
5-30% of its words swapped for other words of the corpus, and every tenth a one-word
edit of an earlier one (a near-duplicate). Deterministic for ``--seed``. Reproduce:

    .venv/bin/python bench/data_bench.py                  # all of it (about 3-4 minutes on 2 cores)
    .venv/bin/python bench/data_bench.py --sizes 10000    # a quick look
    .venv/bin/python bench/data_bench.py --only validation
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def make_records(n: int, seed: int = 0) -> list:
    """``n`` job-analyzer-shaped records grounded in the shipped seeds (see the module docstring)."""
    from lorafleet.records import Message, Record, read_records

    seeds = [
        r
        for p in sorted((ROOT / "examples" / "data").glob("*/seed.jsonl"))
        for _, r in read_records(p)
    ]
    vocab = sorted({w for s in seeds for m in s.messages for w in m.content.split()})
    analyzers = [s for s in seeds if s.task == "job-analyzer"]
    rng = random.Random(seed)
    out: list[Record] = []
    for i in range(n):
        if i % 10 == 9 and out:  # a near-duplicate of an earlier record
            base = out[rng.randrange(len(out))]
            words = base.messages[1].content.split()
            words[rng.randrange(len(words))] = rng.choice(vocab)
            question = " ".join(words)
        else:
            words = rng.choice(seeds).messages[1].content.split()
            rate = rng.uniform(0.05, 0.3)
            question = " ".join(rng.choice(vocab) if rng.random() < rate else w for w in words)
        template = rng.choice(analyzers)
        out.append(
            Record(
                id=f"b{i}",
                task="job-analyzer",
                source="human",
                messages=[
                    template.messages[0],
                    Message(role="user", content=question),
                    template.messages[2],
                ],
            )
        )
    return out


def plain_pandas_checks(df, rules) -> int:
    """The suite's expectations written directly in pandas on the same frame; returns bad rows."""

    def parses(text: str) -> bool:
        try:
            json.loads(text)
        except ValueError:
            return False
        return True

    bad = df["id"].duplicated(keep=False)
    bad |= df["task"] != "job-analyzer"
    bad |= ~df["roles"].str.match(r"^(?:system,)?(?:user,assistant,)*user,assistant$")
    bad |= df["min_chars"] < 1
    bad |= df["max_chars"] > rules.max_chars
    bad |= df["total_chars"] > rules.max_total_chars
    bad |= df["pii"] != ""
    bad |= ~df["answer"].map(parses)
    bad |= df["answer_schema"].notna()
    warn = df["content_key"].duplicated(keep=False).sum() + (df["system"].nunique() > 1)
    return int(bad.sum() + warn)


def bench_validation(records: list) -> dict:
    from lorafleet.data.validate import frame, run_suite
    from lorafleet.fleet import DataRules

    rules = DataRules()
    pairs = list(enumerate(records, start=1))
    run_suite(pairs[:100], "job-analyzer", rules, "warmup")  # imports and GX's first-use costs
    t0 = time.perf_counter()
    df = frame(pairs, "job-analyzer")
    t_frame = time.perf_counter() - t0
    t0 = time.perf_counter()
    report = run_suite(pairs, "job-analyzer", rules, "bench")
    t_suite = time.perf_counter() - t0  # frame + GX validation, as validate_file runs it
    t0 = time.perf_counter()
    plain_pandas_checks(df, rules)
    t_pandas = time.perf_counter() - t0
    t_gx = t_suite - t_frame
    return {
        "records": len(records),
        "frame_s": round(t_frame, 2),
        "gx_s": round(t_gx, 2),
        "suite_total_s": round(t_suite, 2),
        "pandas_s": round(t_pandas, 2),
        "gx_over_pandas": round(t_gx / t_pandas, 2),
        "failures": len(report.failures),
    }


def bench_dedup(records: list, sizes: list[int]) -> list[dict]:
    """Curation with near-dedup, timed in its two halves.

    ``prepare_s`` is the per-row half (MinHash signatures, keys, eval overlap) that the
    cluster pipeline spreads over ``synthesis.shards`` parallel tasks; ``select_s`` is the
    one pass over every shard (LSH index, exact dedup, cap) that stays serial.
    """
    from lorafleet.data.curate import prepare_shard, select_rows
    from lorafleet.fleet import CurationSettings

    settings = CurationSettings()
    rows = []
    for n in sizes:
        t0 = time.perf_counter()
        shard = prepare_shard(records[:n], [], [], settings, pii="off")
        t1 = time.perf_counter()
        result = select_rows([shard], settings, max_synthetic_ratio=0, pii="off")
        t2 = time.perf_counter()
        rows.append(
            {
                "records": n,
                "seconds": round(t2 - t0, 2),
                "prepare_s": round(t1 - t0, 2),
                "select_s": round(t2 - t1, 2),
                "near_duplicates": result.stats["dropped"].get("near-duplicate-human", 0),
            }
        )
    base = rows[0]
    for r in rows:
        r["time_ratio"] = round(r["seconds"] / base["seconds"], 2)
        r["data_ratio"] = round(r["records"] / base["records"], 1)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 50_000, 100_000])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--only", choices=["validation", "dedup"], help="run one part")
    args = parser.parse_args()
    t0 = time.perf_counter()
    records = make_records(max(args.sizes), args.seed)
    print(f"built {len(records)} records in {time.perf_counter() - t0:.1f}s", flush=True)
    result = {}
    if args.only != "dedup":
        result["validation"] = bench_validation(records)
        print(json.dumps(result["validation"]), flush=True)
    if args.only != "validation":
        result["near_dedup"] = bench_dedup(records, sorted(args.sizes))
        print(json.dumps(result["near_dedup"]), flush=True)


if __name__ == "__main__":
    main()
