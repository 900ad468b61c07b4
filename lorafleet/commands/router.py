"""``lorafleet router``: the standalone router proxy's command line, defined once.

``lorafleet router`` and ``python -m lorafleet.serve.router`` (the KServe transformer
container's command, :func:`standalone_app`) run this one command. KServe appends
``--model_name``, ``--predictor_host`` and ``--http_port`` to a transformer's arguments,
so those spellings are accepted as well.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer

from lorafleet.commands.serve import API_KEYS_HELP, RPM_HELP
from lorafleet.serve.auth import DEFAULT_RPM, ApiKeys

__all__ = ["router", "standalone_app"]


def router(
    upstream: Annotated[
        str,
        typer.Option(
            "--upstream",
            "--predictor-host",
            "--predictor_host",
            help="Upstream base URL, or host:port as KServe passes it to a transformer.",
        ),
    ],
    routes: Annotated[
        Path | None,
        typer.Option(
            help='JSON file {"routes": {NAME: {"targets": [...]}}} of weighted adapter versions.'
        ),
    ] = None,
    host: Annotated[str, typer.Option(help="Address to bind; 0.0.0.0 inside a pod.")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", "--http_port", help="HTTP port.")] = 8080,
    api_keys_file: Annotated[
        Path | None,
        typer.Option(metavar="FILE", envvar="LORAFLEET_API_KEYS_FILE", help=API_KEYS_HELP),
    ] = None,
    api_key_rpm: Annotated[int, typer.Option(min=1, help=RPM_HELP)] = DEFAULT_RPM,
    model_name: Annotated[
        str | None, typer.Option("--model_name", hidden=True, help="Passed by KServe; unused.")
    ] = None,
) -> None:
    """Run the OpenAI-compatible router in front of an upstream server.

    Each request goes to an adapter version of its route (weighted, optionally sticky by a
    header); /admin/routes changes the weights (bearer token from $LORAFLEET_ADMIN_TOKEN).
    With API keys, the router checks them itself and forwards each client's Authorization
    header, so an upstream with the same keys file accepts the same keys.
    The transformer container runs the same command as python -m lorafleet.serve.router.
    """
    # The server stack loads only when the router starts: `lorafleet --help` stays fast.
    import uvicorn

    from lorafleet.serve.proxy import proxy_app
    from lorafleet.serve.routes import RouteTable

    table = RouteTable.from_file(routes) if routes else RouteTable()
    url = upstream if "://" in upstream else f"http://{upstream}"
    keys = ApiKeys.from_file(api_keys_file, api_key_rpm) if api_keys_file else None
    app = proxy_app(url, table, os.environ.get("LORAFLEET_ADMIN_TOKEN"), api_keys=keys)
    uvicorn.run(app, host=host, port=port, log_level="warning")


def standalone_app() -> typer.Typer:
    """The router command alone: ``python -m lorafleet.serve.router`` (the transformer)."""
    app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
    app.command()(router)
    return app
