"""``lorafleet rollout`` (and ``kubectl lorafleet canary``): start, watch and steer canary rollouts.

Rollouts live in a store: ConfigMaps in a namespace (``-n NS``, the cluster) or JSON files
in a directory (``--state-dir``, default ``.lorafleet/rollouts``, local runs). As a kubectl
plugin the cluster is the default (the kubeconfig context's namespace). Every command is
idempotent; ``status -o json`` is for scripts. See docs/rollout.md.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import threading
import time
from pathlib import Path
from typing import Annotated, Any, Literal

import typer

from lorafleet.commands.runner import run_app
from lorafleet.errors import LorafleetError, first_problem

__all__ = ["app", "kubectl_main", "plugin_app"]

HELP = (
    "Canary rollouts of adapters (router weights) or revisions (InferenceService "
    "canaryTrafficPercent): step-wise, judged on metrics, promoted or rolled back automatically."
)
app = typer.Typer(help=HELP, no_args_is_help=True)

DEFAULT_STATE_DIR = ".lorafleet/rollouts"

Name = Annotated[
    str, typer.Argument(help="The rollout's name (usually the route or InferenceService).")
]
Namespace = Annotated[
    str | None,
    typer.Option(
        "-n", "--namespace", help="Keep rollouts as ConfigMaps in this namespace (the cluster)."
    ),
]
StateDir = Annotated[
    Path | None,
    typer.Option(
        "--state-dir",
        help=f"Keep rollouts as JSON files here (local runs; default ${{LORAFLEET_ROLLOUT_DIR}} or {DEFAULT_STATE_DIR}).",
    ),
]
Kubeconfig = Annotated[
    Path | None,
    typer.Option(
        "--kubeconfig", help="Kubeconfig file (default: $KUBECONFIG, ~/.kube/config or in-cluster)."
    ),
]
KubeContext = Annotated[
    str | None, typer.Option("--context", help="Kubeconfig context (default: the current one).")
]
Output = Annotated[
    Literal["text", "json"],
    typer.Option("-o", "--output", help="text (at a glance) or json (for scripts)."),
]


def _kube(kubeconfig: Path | None, context: str | None) -> tuple[Any, str]:
    """An ApiClient and the context's namespace, from a kubeconfig or the pod's service account."""
    from kubernetes import client, config
    from kubernetes.config.config_exception import ConfigException

    path = (
        kubeconfig
        or os.environ.get("KUBECONFIG")
        or Path(config.KUBE_CONFIG_DEFAULT_LOCATION).expanduser()
    )
    try:
        if kubeconfig or Path(str(path).split(os.pathsep)[0]).exists():
            api = config.new_client_from_config(
                config_file=str(path), context=context, persist_config=False
            )
            contexts, active = config.list_kube_config_contexts(config_file=str(path))
            chosen = (
                next((c for c in contexts if c["name"] == context), None) if context else active
            )
            return api, (chosen or {}).get("context", {}).get("namespace") or "default"
        if "KUBERNETES_SERVICE_HOST" not in os.environ:
            raise LorafleetError(
                f"no kubeconfig at {path} and not in a cluster: pass --kubeconfig FILE "
                "(or --state-dir DIR for local rollouts)"
            )
        configuration = client.Configuration()
        config.load_incluster_config(client_configuration=configuration)
        namespace = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
        return client.ApiClient(
            configuration
        ), namespace.read_text().strip() if namespace.exists() else "default"
    except (ConfigException, OSError) as exc:
        raise LorafleetError(f"kubeconfig: {exc}") from None


def _controller(
    ctx: typer.Context,
    namespace: str | None,
    state_dir: Path | None,
    kubeconfig: Path | None,
    context: str | None,
):
    """The controller on the store the options (and the plugin's default) choose."""
    from lorafleet.rollout.controller import Controller
    from lorafleet.rollout.store import ConfigMapStore, FileStore

    cluster_default = bool((ctx.obj or {}).get("cluster")) and state_dir is None
    if namespace is not None or cluster_default:
        api, context_namespace = _kube(kubeconfig, context)
        return Controller(ConfigMapStore(api, namespace or context_namespace), api)
    # Local rollouts read a kubeconfig only when one needs the cluster (a router Service).
    return Controller(
        FileStore(state_dir or os.environ.get("LORAFLEET_ROLLOUT_DIR") or DEFAULT_STATE_DIR),
        connect=lambda: _kube(kubeconfig, context)[0],
    )


def _show(state, output: str, history: int = 5) -> None:
    from lorafleet.rollout.status import status_json, status_text

    if output == "json":
        typer.echo(json.dumps(status_json(state)))
    else:
        typer.echo(status_text(state, history=history))


def _overrides(policy: dict, items: list[str]) -> dict:
    """Apply ``--set key.path=value`` (value read as YAML) to a policy's plain data."""
    import yaml

    for item in items:
        key, eq, text = item.partition("=")
        if not eq or not key:
            raise LorafleetError(
                f"--set {item!r}: expected KEY=VALUE, e.g. analysis.interval_seconds=5"
            )
        node = policy
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise LorafleetError(f"--set {item!r}: {part} is not a mapping")
        try:
            node[leaf] = yaml.safe_load(text)
        except yaml.YAMLError:
            raise LorafleetError(f"--set {item!r}: the value is not valid YAML") from None
    return policy


def _policy(spec: Path | None, sets: list[str]):
    from pydantic import ValidationError

    from lorafleet.fleet import CanaryPolicy, load_fleet

    base = load_fleet(spec, check_files=False).canary if spec else CanaryPolicy()
    try:
        return CanaryPolicy.model_validate(_overrides(base.model_dump(), sets))
    except ValidationError as exc:
        raise LorafleetError(f"--set: {first_problem(exc, 'canary.')}") from None


@app.command("start")
def start(
    ctx: typer.Context,
    name: Name,
    spec: Annotated[
        Path | None,
        typer.Option(help="Fleet spec whose canary block is the strategy (default: the defaults)."),
    ] = None,
    set_: Annotated[
        list[str] | None,
        typer.Option(
            "--set",
            help="Override one canary field, e.g. analysis.interval_seconds=5 or steps=[20,50,100]; repeat for more.",
        ),
    ] = None,
    route: Annotated[
        str, typer.Option(help="Router mode: the public model name whose weights move.")
    ] = "",
    stable: Annotated[
        str,
        typer.Option(
            help="The production adapter (router) or revision (revision mode; default: from the InferenceService's status)."
        ),
    ] = "",
    canary: Annotated[str, typer.Option(help="The candidate adapter or revision.")] = "",
    router_url: Annotated[
        list[str] | None,
        typer.Option(
            "--router-url",
            help="Router mode: base URL of a router replica (admin API and /metrics), or "
            "k8s://NAMESPACE/SERVICE[:PORT] for every ready pod of a Service; repeat for each.",
        ),
    ] = None,
    router_service: Annotated[
        list[str] | None,
        typer.Option(
            "--router-service",
            help="Router mode: a Kubernetes Service whose ready pods are the router replicas, as "
            "[NAMESPACE/]SERVICE[:PORT] (PORT: the pods' port name or number, e.g. 8080; NAMESPACE: "
            "-n or the kubeconfig context's); found again on every tick; repeat for more.",
        ),
    ] = None,
    sticky_header: Annotated[
        str | None,
        typer.Option(help="Router mode: keep a user on one version by this request header."),
    ] = None,
    token_env: Annotated[
        str, typer.Option(help="Environment variable holding the router's admin token.")
    ] = "LORAFLEET_ADMIN_TOKEN",
    isvc: Annotated[str, typer.Option(help="Revision mode: the InferenceService.")] = "",
    namespace: Namespace = None,
    state_dir: StateDir = None,
    kubeconfig: Kubeconfig = None,
    context: KubeContext = None,
    output: Output = "text",
) -> None:
    """Start a canary at the strategy's first step (the same start again is a no-op)."""
    from pydantic import ValidationError

    from lorafleet.rollout.discovery import SCHEME
    from lorafleet.rollout.state import Target

    policy = _policy(spec, set_ or [])
    controller = _controller(ctx, namespace, state_dir, kubeconfig, context)
    where = getattr(controller.store, "namespace", "")
    if policy.mode == "revision" and not where:
        raise LorafleetError(
            f"rollout {name!r}: a revision canary lives in the cluster: pass -n NAMESPACE"
        )
    services = [
        f"{SCHEME}{s}" if "/" in s else f"{SCHEME}{where or _kube(kubeconfig, context)[1]}/{s}"
        for s in router_service or []
    ]
    try:
        target = Target(
            mode=policy.mode,
            route=route,
            stable=stable,
            canary=canary,
            router_urls=[*(router_url or []), *services],
            sticky_header=sticky_header,
            token_env=token_env,
            namespace=where,
            isvc=isvc,
        )
    except ValidationError as exc:
        # The target's rules, in the flags the user types (the model names its fields).
        given = {"--route": route, "--stable": stable, "--canary": canary}
        missing = [flag for flag, value in given.items() if not value]
        if not (router_url or services):
            missing.append("--router-url URL (or --router-service SERVICE)")
        if policy.mode == "router" and missing:
            problem = f"a router canary needs {', '.join(missing)}"
        elif policy.mode == "router" and stable == canary:
            problem = f"--stable and --canary must be different adapters (both {stable!r})"
        elif policy.mode == "revision" and not isvc:
            problem = "a revision canary needs --isvc NAME (the InferenceService)"
        else:
            problem = first_problem(exc, "")
        raise LorafleetError(f"rollout {name!r}: {problem}") from None
    _show(controller.start(name, target, policy), output)


@app.command("status")
def status(
    ctx: typer.Context,
    name: Annotated[
        str | None, typer.Argument(help="The rollout (default: list every rollout).")
    ] = None,
    history: Annotated[int, typer.Option(help="How many recent decisions to list.")] = 5,
    namespace: Namespace = None,
    state_dir: StateDir = None,
    kubeconfig: Kubeconfig = None,
    context: KubeContext = None,
    output: Output = "text",
    as_json: Annotated[
        bool, typer.Option("--json", help="The rollout state as JSON on stdout (= -o json).")
    ] = False,
) -> None:
    """Show a rollout: phase, weights, steps, last measurements and decision (or list them all)."""
    output = "json" if as_json else output
    controller = _controller(ctx, namespace, state_dir, kubeconfig, context)
    if name is not None:
        _show(controller.store.load(name), output, history)
        return
    states = [controller.store.load(n) for n in controller.store.names()]
    if output == "json":
        from lorafleet.rollout.status import status_json

        typer.echo(json.dumps([status_json(s) for s in states]))
        return
    if not states:
        typer.echo(f"no rollouts in {controller.store.where}")
    for s in states:
        typer.echo(
            f"{s.name:<32} {s.phase:<12} step {s.step + 1}/{len(s.steps)}  canary {s.weight:>3}%  {s.message}"
        )


def _command(verb: str, doc: str):
    def command(
        ctx: typer.Context,
        name: Name,
        namespace: Namespace = None,
        state_dir: StateDir = None,
        kubeconfig: Kubeconfig = None,
        context: KubeContext = None,
        output: Output = "text",
    ) -> None:
        controller = _controller(ctx, namespace, state_dir, kubeconfig, context)
        _show(getattr(controller, verb)(name), output)

    command.__doc__ = doc
    command.__name__ = verb
    return command


app.command("promote")(
    _command(
        "promote", "Send all traffic to the canary now and end the rollout (a no-op when promoted)."
    )
)
app.command("rollback")(
    _command(
        "rollback",
        "Send all traffic back to the stable version now and end the rollout (a no-op when rolled back).",
    )
)
app.command("pause")(
    _command(
        "pause", "Hold the current weights and stop analysing until resume (a no-op when paused)."
    )
)
app.command("resume")(
    _command(
        "resume", "Continue a paused rollout at its step; the inconclusive count starts again."
    )
)


@app.command("watch")
def watch(
    ctx: typer.Context,
    name: Name,
    drive: Annotated[
        bool,
        typer.Option(
            "--drive/--no-drive",
            help="Also run the controller for this rollout here (local runs, no in-cluster controller).",
        ),
    ] = False,
    timeout: Annotated[
        float | None,
        typer.Option(help="Stop watching after this many seconds (the rollout goes on)."),
    ] = None,
    namespace: Namespace = None,
    state_dir: StateDir = None,
    kubeconfig: Kubeconfig = None,
    context: KubeContext = None,
    output: Output = "text",
) -> None:
    """Follow a rollout until it ends, printing it whenever it changes (-o json: one line each).

    Exit code 0 when it was promoted, 1 when rolled back or aborted, 3 when it had not
    ended when watching stopped.
    """
    controller = _controller(ctx, namespace, state_dir, kubeconfig, context)
    seen = {"revision": -1}

    def show(state) -> None:
        if state.revision != seen["revision"]:
            seen["revision"] = state.revision
            _show(state, output, history=1)
            if output == "text":
                typer.echo("")

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    if drive:
        state = controller.drive(name, timeout, show, stop)
    else:
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            state = controller.store.load(name)
            show(state)
            if (
                state.final
                or stop.is_set()
                or (deadline is not None and time.monotonic() >= deadline)
            ):
                break
            stop.wait(1.0)
    raise typer.Exit(0 if state.phase == "Promoted" else 1 if state.final else 3)


@app.command("controller")
def controller_cmd(
    ctx: typer.Context,
    poll: Annotated[float, typer.Option(help="Seconds between rounds over every rollout.")] = 1.0,
    heartbeat: Annotated[
        Path | None, typer.Option(help="Touch this file after every round (for a liveness probe).")
    ] = None,
    namespace: Namespace = None,
    state_dir: StateDir = None,
    kubeconfig: Kubeconfig = None,
    context: KubeContext = None,
) -> None:
    """Run the controller: reconcile every rollout of the store until SIGTERM.

    The Helm chart's rollout-controller Deployment runs this in the fleet's namespace.
    """
    import logging

    from lorafleet.rollout.controller import run_controller

    logging.getLogger("lorafleet.rollout").setLevel(os.environ.get("LORAFLEET_LOG", "INFO"))
    controller = _controller(ctx, namespace, state_dir, kubeconfig, context)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    typer.echo(
        f"lorafleet rollout controller: watching rollouts in {controller.store.where}", err=True
    )
    with contextlib.suppress(KeyboardInterrupt):
        run_controller(controller, poll, stop, heartbeat)


def plugin_app() -> typer.Typer:
    """The ``kubectl lorafleet`` command: ``canary`` (and ``rollout``) run these commands."""
    plugin = typer.Typer(
        help="lorafleet for kubectl: canary rollouts of LoRA adapters and revisions.",
        no_args_is_help=True,
        pretty_exceptions_enable=False,
        add_completion=False,
    )
    plugin.add_typer(app, name="canary", help=HELP)
    plugin.add_typer(app, name="rollout", help=HELP)
    return plugin


def kubectl_main() -> None:
    """Entry point of ``kubectl-lorafleet``: rollouts in the cluster unless ``--state-dir``."""
    run_app(plugin_app(), prog_name="kubectl lorafleet", obj={"cluster": True})
