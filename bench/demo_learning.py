"""Did the demo's experts learn their task? One table from a `lorafleet run` summary.

Per expert: the task's primary metric for the base model and for the candidate adapter,
the change, how often the generation budget cut an answer, the held-out loss ratio and
the gate's verdict; then the run's wall time. Reads ``runs/<id>/summary.json``:

    rm -rf /tmp/demo-cache && LORAFLEET_CACHE=/tmp/demo-cache make demo
    .venv/bin/python bench/demo_learning.py runs/<id>/summary.json [--min-gain 0.25]

Exits 1 when fewer than ``--min-experts`` experts gained at least ``--min-gain``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def rows(summary: dict) -> list[dict]:
    """One row per expert: primary metric base -> candidate and what explains it."""
    experts = summary["experts"]
    items = experts.items() if isinstance(experts, dict) else ((e["name"], e) for e in experts)
    out = []
    for name, e in items:
        metric = e["primary_metric"]
        base = e["metrics_base"].get(metric, 0.0)
        cand = e["metrics_candidate"].get(metric, 0.0)
        out.append(
            {
                "expert": name,
                "metric": metric,
                "base": base,
                "candidate": cand,
                "gain": round(cand - base, 4),
                "truncated": e["generation_candidate"].get("truncated_rate"),
                "loss_ratio": round(e["eval_loss_candidate"] / e["eval_loss_base"], 3),
                "gate": "pass" if e.get("gate_passed") else "fail",
            }
        )
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("summary", type=Path, help="runs/<id>/summary.json")
    parser.add_argument("--min-gain", type=float, default=0.25)
    parser.add_argument("--min-experts", type=int, default=3)
    args = parser.parse_args(argv)
    summary = json.loads(args.summary.read_text())
    table = rows(summary)
    print("| expert | primary metric | base | candidate | gain | truncated | loss ratio | gate |")
    print("|---|---|---|---|---|---|---|---|")
    for r in table:
        print(
            f"| {r['expert']} | {r['metric']} | {r['base']:.4f} | {r['candidate']:.4f} "
            f"| {r['gain']:+.4f} | {r['truncated']} | {r['loss_ratio']} | {r['gate']} |"
        )
    learned = sum(r["gain"] >= args.min_gain for r in table)
    print(
        f"\n{learned}/{len(table)} experts gained >= {args.min_gain}; "
        f"wall time {summary.get('wall_time_s')} s (run {summary.get('run_id')})"
    )
    return 0 if learned >= args.min_experts else 1


if __name__ == "__main__":
    sys.exit(main())
