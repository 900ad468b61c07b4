"""The pipeline's deploy step: put every newly registered adapter on a canary rollout.

What happens is the fleet spec's ``canary.handoff``:

- ``none`` (the local default): nothing; the register step made the candidate the
  registry's production version, and that is what serves.
- ``controller``: start the rollouts in the cluster and return; the rollout controller
  (Helm ``rolloutController.enabled``) drives them, and moves the registry's production
  pointer when it promotes one (or records in the rollout why it could not: then
  ``lorafleet registry promote`` is the operator's step).
- ``drive``: start them and drive them to the end inside the step (at most
  ``canary.drive_timeout_seconds``); a promoted candidate becomes the registry's
  production version, a rolled-back one leaves production where it was.

With a canary, the register step does not move production (unless the expert had none):
the rollout carries the registry versions (:class:`~lorafleet.rollout.state.RegistryHandoff`)
and whoever settles it as ``Promoted`` (this step's controller, the cluster's, or an
operator's ``promote``) moves the pointer, from the version the canary started from only.

An expert is put on a canary only when a production version served before this run; the
first version of an expert is served as is. In ``router`` mode each expert is one rollout
(named after it): the candidate is loaded on every predictor replica (the lorafleet
runtime, or the vLLM front) as ``EXPERT-VERSION`` from the adapter store
(``PUT /admin/adapters``), and the route ``EXPERT`` moves from the served ``EXPERT`` adapter
to it. The replicas are, unless
``canary.runtime_urls`` / ``canary.router_urls`` list them, the ready pods of the
InferenceService's Services (``k8s://NS/NAME-predictor:8080``, and ``-transformer`` for the
router), found through their EndpointSlices: the step always runs with the API (the
rollout is a ConfigMap), and the controller finds the router's pods again on every tick. In ``revision`` mode the fleet is
one rollout (named after the fleet): the InferenceService's adapter arguments move to the
new versions together with ``canaryTrafficPercent`` (one new KServe revision), and the
controller moves the revision's traffic.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any

import httpx

from lorafleet.errors import LorafleetError
from lorafleet.fleet import FleetSpec
from lorafleet.k8s_objects import ADAPTER_MOUNT, PORT
from lorafleet.rollout.controller import Controller
from lorafleet.rollout.discovery import SCHEME, resolve_urls
from lorafleet.rollout.state import ProductionMove, RegistryHandoff, RolloutState, Target
from lorafleet.rollout.store import ConfigMapStore
from lorafleet.storage import parse_location

__all__ = ["deploy_rollouts", "rollouts_markdown"]


def _in_cluster_api():
    from kubernetes import client, config
    from kubernetes.config.config_exception import ConfigException

    configuration = client.Configuration()
    try:
        config.load_incluster_config(client_configuration=configuration)
    except ConfigException as exc:
        raise LorafleetError(
            f"canary.handoff needs the Kubernetes API (in-cluster): {exc}"
        ) from None
    return client.ApiClient(configuration)


def _service(spec: FleetSpec, component: str) -> str:
    """A KServe component's Service as a ``k8s://`` URL, resolved to its ready pods on use.

    The router and the runtime keep routes and loaded adapters per replica, so a call
    through the Service's virtual IP would reach only one of them.
    """
    return f"{SCHEME}{spec.serving.namespace}/{spec.name}-{component}:{PORT}"


def _load_candidate(api, spec: FleetSpec, expert: str, version: str, served: str) -> None:
    """Load the candidate on every predictor replica through the adapter admin API: the
    lorafleet runtime's, or with ``serving.runtime: vllm`` the vLLM front's (which checks it
    and loads it into vLLM at runtime)."""
    token_env = "LORAFLEET_ADMIN_TOKEN"
    token = os.environ.get(token_env)
    if not token:
        raise LorafleetError(
            f"${token_env} is not set: loading the candidate needs the runtime's admin token"
        )
    store = (spec.serving.adapter_store or spec.registry.uri).rstrip("/")
    source = f"{store}/{expert}/{version}"
    for url in resolve_urls(spec.canary.runtime_urls or [_service(spec, "predictor")], api):
        try:
            response = httpx.put(
                f"{url.rstrip('/')}/admin/adapters/{served}",
                json={"source": source},
                headers={"authorization": f"Bearer {token}"},
                timeout=600,
            )
        except httpx.HTTPError as exc:
            raise LorafleetError(
                f"{url}: loading {served} from {source}: {type(exc).__name__}: {exc}"
            ) from None
        if response.status_code != 200:
            raise LorafleetError(
                f"{url}: loading {served} from {source}: {response.status_code} {response.text[:300]}"
            )


def _handoff(spec: FleetSpec, moves: list[tuple[str, str, str]]) -> RegistryHandoff:
    """The production pointers the rollout moves when it is promoted."""
    return RegistryHandoff(
        uri=parse_location(spec.registry.uri).uri,
        moves=[ProductionMove(expert=e, previous=old, candidate=new) for e, old, new in moves],
    )


def _start_router(controller: Controller, spec: FleetSpec, expert: str, old: str, new: str) -> str:
    served = f"{expert}-{new}"
    _load_candidate(controller.api, spec, expert, new, served)
    router = "transformer" if spec.serving.router else "predictor"  # the runtime routes by itself
    target = Target(
        route=expert,
        stable=expert,
        canary=served,
        namespace=spec.serving.namespace,
        router_urls=spec.canary.router_urls or [_service(spec, router)],
    )
    controller.start(expert, target, spec.canary, _handoff(spec, [(expert, old, new)]))
    return expert


def _start_revision(
    controller: Controller, api, spec: FleetSpec, moves: list[tuple[str, str, str]]
) -> str:
    """Move the InferenceService's adapter arguments to the new versions, at the first step's share."""
    from kubernetes.client import CustomObjectsApi
    from kubernetes.client.exceptions import ApiException

    custom = CustomObjectsApi(api)
    where = ("serving.kserve.io", "v1beta1", spec.serving.namespace, "inferenceservices", spec.name)
    try:
        live = custom.get_namespaced_custom_object(*where)
    except ApiException as exc:
        raise LorafleetError(
            f"InferenceService/{spec.name}: the API server said {exc.status} {exc.reason}"
        ) from None
    args = list(live["spec"]["predictor"]["model"].get("args") or [])
    for expert, old, new in moves:
        before, after = (
            f"{expert}={ADAPTER_MOUNT}/{expert}/{old}",
            f"{expert}={ADAPTER_MOUNT}/{expert}/{new}",
        )
        if before in args:
            args[args.index(before)] = after
        elif after not in args:  # already moved: a retried step
            raise LorafleetError(
                f"InferenceService/{spec.name}: serves no {before!r}; apply the fleet first"
            )
    patch = {
        "spec": {
            "predictor": {"canaryTrafficPercent": spec.canary.steps[0], "model": {"args": args}}
        }
    }
    try:
        custom.patch_namespaced_custom_object(*where, patch)
    except ApiException as exc:
        raise LorafleetError(
            f"InferenceService/{spec.name}: the API server said {exc.status} {exc.reason}"
        ) from None
    target = Target(mode="revision", namespace=spec.serving.namespace, isvc=spec.name)
    controller.start(spec.name, target, spec.canary, _handoff(spec, moves))
    return spec.name


def _drive(
    controller: Controller, names: list[str], timeout_s: float, poll_s: float
) -> list[RolloutState]:
    deadline = time.monotonic() + timeout_s
    while True:
        states = [controller.reconcile(n) for n in names]
        if all(s.final for s in states) or time.monotonic() >= deadline:
            return states
        time.sleep(poll_s)


def _summary(state: RolloutState) -> dict[str, Any]:
    decided = next(
        (d for d in reversed(state.history) if d.action in ("promote", "rollback", "abort")), None
    )
    last = state.last_analysis()
    return {
        "name": state.name,
        "mode": state.target.mode,
        "stable": state.target.stable,
        "canary": state.target.canary,
        "phase": state.phase,
        "weight": state.weight,
        "steps": state.steps,
        "time_to_decision_s": round(decided.at - state.started_at, 2) if decided else None,
        "last_decision": last.model_dump() if last else None,
        "message": state.message,
        "registry": (
            (state.registry.outcome or "production moves when the rollout is promoted")
            if state.registry
            else None
        ),
    }


def deploy_rollouts(
    spec: FleetSpec,
    outcomes: list[dict],
    api=None,
    clock: Callable[[], float] = time.time,
    poll_s: float = 1.0,
) -> dict[str, Any]:
    """Start (and with ``handoff: drive``, finish) the canary of every newly registered adapter.

    Args:
        spec: the fleet (its ``canary`` block and serving names).
        outcomes: one per expert, from the pipeline's ``register`` / ``reject`` steps.
        api: a ``kubernetes.client.ApiClient``; the pod's in-cluster config when ``None``.
        clock: seconds since the epoch (tests).
        poll_s: seconds between controller ticks while driving.

    Returns:
        ``{"fleet", "handoff", "mode", "rollouts": [...], "skipped": [...]}``, JSON-ready.

    Raises:
        LorafleetError: if a rollout cannot be started (no API access, candidate refused, ...).
    """
    policy = spec.canary
    result: dict[str, Any] = {
        "fleet": spec.name,
        "handoff": policy.handoff,
        "mode": policy.mode,
        "rollouts": [],
        "skipped": [],
    }
    moves = []
    for o in outcomes:
        if not o.get("registered"):
            continue
        old, new = o.get("production_version"), o["adapter_version"]
        if policy.handoff == "none":
            result["skipped"].append(
                {"expert": o["expert"], "version": new, "reason": "canary.handoff is none"}
            )
        elif not old or old == new:
            result["skipped"].append(
                {"expert": o["expert"], "version": new, "reason": "no earlier production version"}
            )
        else:
            moves.append((o["expert"], old, new))
    if not moves:
        return result
    api = api or _in_cluster_api()
    controller = Controller(ConfigMapStore(api, spec.serving.namespace), api, clock)
    if policy.mode == "revision":
        names = [_start_revision(controller, api, spec, moves)]
    else:
        names = [_start_router(controller, spec, *move) for move in moves]
    if policy.handoff == "drive":
        states = _drive(controller, names, policy.drive_timeout_seconds, poll_s)
    else:
        states = [controller.store.load(n) for n in names]
    for state in states:
        summary = _summary(state)
        experts = [m for m in moves if policy.mode == "revision" or m[0] == state.name]
        summary["experts"] = {e: {"from": old, "to": new} for e, old, new in experts}
        result["rollouts"].append(summary)
    return result


def rollouts_markdown(result: dict[str, Any]) -> str:
    """The deploy step's report for the KFP UI."""
    lines = [
        f"## Canary rollouts of fleet {result['fleet']}",
        f"handoff **{result['handoff']}**, mode **{result['mode']}**",
        "",
    ]
    if result["rollouts"]:
        lines += [
            "| rollout | stable -> canary | phase | canary share | time to decision | last decision |",
            "|---|---|---|---|---|---|",
        ]
        for r in result["rollouts"]:
            last = r["last_decision"] or {}
            decided = "-" if r["time_to_decision_s"] is None else f"{r['time_to_decision_s']} s"
            why = "; ".join(last.get("reasons") or []) or "-"
            lines.append(
                f"| {r['name']} | {r['stable'] or 'stable'} -> {r['canary'] or 'canary'} | {r['phase']} | "
                f"{r['weight']}% | {decided} | {last.get('verdict', '-')}: {why} |"
            )
    for r in result["rollouts"]:
        if r.get("registry"):
            lines.append(f"- {r['name']}: {r['registry']}")
    for s in result["skipped"]:
        lines.append(f"- {s['expert']} {s['version']}: no rollout ({s['reason']})")
    return "\n".join(lines) + "\n"
