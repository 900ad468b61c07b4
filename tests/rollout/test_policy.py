"""The canary block of the fleet spec: defaults, PromQL templates, and mistakes as FILE:LINE: field."""

from __future__ import annotations

import string
from pathlib import Path

import pytest

from lorafleet.errors import SpecError
from lorafleet.fleet import REVISION_QUERIES, ROUTER_QUERIES, CanaryPolicy, load_fleet

SPEC = """\
name: tiny
experts:
  - {name: job-analyzer, task: job-analyzer, seed_data: s.jsonl, eval_data: e.jsonl}
canary:
  steps: [20, 50, 100]
{extra}"""


def _load(tmp_path: Path, extra: str):
    (tmp_path / "f.yaml").write_text(SPEC.replace("{extra}", extra))
    return load_fleet(tmp_path / "f.yaml", check_files=False)


def test_defaults_are_a_router_canary_from_the_routers_metrics(tmp_path: Path) -> None:
    policy = _load(tmp_path, "").canary
    assert (policy.mode, policy.analysis.source, policy.handoff) == ("router", "router", "none")
    assert policy.queries() == ROUTER_QUERIES
    revision = CanaryPolicy.model_validate(
        {
            "mode": "revision",
            "analysis": {
                "source": "prometheus",
                "prometheus_url": "http://p:9090",
                "queries": {"requests": "sum(x)"},
            },
        }
    )
    assert revision.queries() == {**REVISION_QUERIES, "requests": "sum(x)"}


def test_a_full_canary_block_loads(tmp_path: Path) -> None:
    policy = _load(
        tmp_path,
        """\
  mode: revision
  handoff: controller
  analysis:
    source: prometheus
    prometheus_url: http://prometheus.monitoring:9090
    interval_seconds: 15
    queries: {p95_latency_ms: 'histogram_quantile(0.95, sum by (le) (rate(x_bucket{rev="$version"}[$interval])))'}
    judge: {min_score: 3.5, query: 'avg(judge{adapter="$version"})'}
""",
    ).canary
    assert (
        policy.mode,
        policy.handoff,
        policy.analysis.interval_seconds,
        policy.analysis.judge.min_score,
    ) == ("revision", "controller", 15, 3.5)


@pytest.mark.parametrize(
    ("extra", "line", "field", "message"),
    [
        (
            "  analysis: {source: prometheus}\n",
            6,
            "canary.analysis",
            "source 'prometheus' needs prometheus_url",
        ),
        ("  mode: revision\n", 5, "canary", "mode 'revision' needs analysis.source 'prometheus'"),
        (
            "  analysis:\n    queries: {requests: 'sum(x{a=\"$adapter\"})'}\n",
            7,
            "canary.analysis",
            "unknown placeholder $adapter; known: $route, $version, $namespace, $interval",
        ),
        (
            "  analysis: {interval_seconds: 0}\n",
            6,
            "canary.analysis.interval_seconds",
            "greater than 0",
        ),
        ("  handoff: later\n", 6, "canary.handoff", "'none', 'drive' or 'controller'"),
        (
            "  analysis: {judge: {min_score: 3, metrik: x}}\n",
            6,
            "canary.analysis.judge.metrik",
            "unknown field",
        ),
    ],
)
def test_mistakes_name_file_line_and_field(
    tmp_path: Path, extra: str, line: int, field: str, message: str
) -> None:
    with pytest.raises(SpecError) as err:
        _load(tmp_path, extra)
    assert (err.value.line, err.value.field) == (line, field)
    assert message in err.value.message
    assert str(err.value).startswith(f"{tmp_path / 'f.yaml'}:{line}: {field}: ")


@pytest.mark.parametrize("mode_queries", ["router", "revision"])
def test_every_default_query_is_valid_promql(mode_queries: str) -> None:
    """The default PromQL of both canary modes parses with a PromQL parser, placeholders
    filled as the rollout fills them (revision mode's never met a real Prometheus here)."""
    import promql_parser

    from lorafleet.fleet import QUERY_SAMPLE, REVISION_QUERIES, ROUTER_QUERIES, check_promql

    queries = ROUTER_QUERIES if mode_queries == "router" else REVISION_QUERIES
    for name, template in queries.items():
        check_promql(template, name)
        expr = promql_parser.parse(string.Template(template).substitute(QUERY_SAMPLE))
        assert "$" not in str(expr)


@pytest.mark.parametrize(
    ("analysis", "message"),
    [
        (
            {"queries": {"requests": "sum(increase(x[$interval])"}},
            "queries.requests: not valid PromQL",
        ),
        (
            {"queries": {"error_rate": "rate(x{a=}[$interval])"}},
            "queries.error_rate: not valid PromQL",
        ),
        (
            {
                "source": "prometheus",
                "prometheus_url": "http://p:9090",
                "judge": {"min_score": 0.5, "query": 'avg(score{adapter="$version"}[[$interval])'},
            },
            "judge.query: not valid PromQL",
        ),
    ],
)
def test_a_malformed_query_is_refused_when_the_spec_is_read(analysis: dict, message: str) -> None:
    from pydantic import ValidationError

    from lorafleet.fleet import CanaryAnalysis

    with pytest.raises(ValidationError, match=message):
        CanaryAnalysis.model_validate(analysis)
