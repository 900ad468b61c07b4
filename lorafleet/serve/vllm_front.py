"""lorafleet in front of vLLM: adapter admission, per-adapter routes, faults and metrics.

``python -m lorafleet.serve.vllm_front [FRONT FLAGS] [vLLM FLAGS]``

vLLM's own ``POST /v1/load_lora_adapter`` has no authentication and loads an adapter that
changes nothing, or one trained on another base. The front is the only way in: it runs
vLLM as its child on ``127.0.0.1`` and serves, on its own port, the router
(:func:`~lorafleet.serve.proxy.proxy_app`: ``/openai/v1`` forwarded to vLLM's ``/v1``
with a :class:`~lorafleet.serve.routes.RouteTable` of weighted adapter versions,
per-adapter ``/metrics``, ``/admin/routes``, ``/admin/faults``) plus the native runtime's
``/admin/adapters`` (:mod:`lorafleet.serve.admin`), whose loads pass the admission checks
of :mod:`lorafleet.serve.adapters` before vLLM sees them.

Front flags (every other argument is vLLM's, passed on verbatim and in order):

- ``--host`` (default ``0.0.0.0``), ``--port`` (``8080``): where the front listens;
- ``--adapter NAME=SOURCE`` (repeatable): a startup adapter, ``SOURCE`` as
  :func:`~lorafleet.serve.adapters.resolve_source` takes it (directory, ``pvc://``,
  ``s3://``, ``gs://``);
- ``--require-lineage``: refuse adapters without ``lineage.json``;
- ``--vllm-uds PATH``: vLLM's Unix socket (default: ``vllm.sock`` in a private temporary
  directory, mode 0700); vLLM has no TCP port;
- ``--vllm-python``: the interpreter that runs ``-m vllm.entrypoints.openai.api_server``
  (default ``$LORAFLEET_VLLM_PYTHON``, else this interpreter);
- ``--api-keys-file`` (default ``$LORAFLEET_API_KEYS_FILE``) / ``--api-key-rpm``: API
  keys of the OpenAI routes (:mod:`lorafleet.serve.auth`);
- ``--adapter-cache DIR``: where ``s3://`` and ``gs://`` adapters are downloaded;
- ``--startup-timeout-s`` (``900``): how long vLLM may take to become healthy.

vLLM's ``--lora-modules`` is refused (an adapter reaches vLLM only through admission), as
is ``--uds``; vLLM never gets a ``--host``/``--port`` of the command line (those are the
front's): it listens on a Unix socket only (``--vllm-uds``), which no other container of the
pod, and nothing outside it, can reach; the front talks to it over that socket, where
Nagle's algorithm does not apply, so its connections are reused. ``--enable-lora`` is
added when missing. The base directory is vLLM's ``--model`` (read without loading its
weights: :meth:`~lorafleet.serve.adapters.BaseModelInfo.from_directory`), the rank limit
vLLM's ``--max-lora-rank`` (vLLM's default 16). The admin bearer token is
``$LORAFLEET_ADMIN_TOKEN``; without one the admin API answers 403.

Start-up: every ``--adapter`` passes the static checks and the weight-only "changes
something" check (:func:`~lorafleet.serve.adapters.check_weights_change_something`), or
the front exits with one ``error:`` line (code 2) before vLLM starts. Then vLLM starts
(``VLLM_ALLOW_RUNTIME_LORA_UPDATING=True``), the front waits for its ``/health``, loads
each adapter through ``POST /v1/load_lora_adapter`` and only then reports ready.
``/v2/health/live`` is vLLM's process running, ``/v2/health/ready`` vLLM healthy with the
start-up adapters loaded. SIGTERM/SIGINT stop vLLM with the front; if vLLM dies, the front
exits non-zero.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import uvicorn
from fastapi import FastAPI

from lorafleet.errors import LorafleetError
from lorafleet.llm import openai_error_line
from lorafleet.serve.adapters import (
    AdapterInfo,
    AdapterRejected,
    BaseModelInfo,
    admit_files,
    check_weights_change_something,
)
from lorafleet.serve.admin import adapters_admin_router
from lorafleet.serve.auth import DEFAULT_RPM, ApiKeys
from lorafleet.serve.faults import FaultTable
from lorafleet.serve.metrics import ServingMetrics
from lorafleet.serve.proxy import proxy_app
from lorafleet.serve.routes import RouteTable

__all__ = [
    "FrontConfig",
    "VllmAdapters",
    "VllmProcess",
    "front_app",
    "main",
    "parse_command_line",
    "split_args",
    "vllm_command",
    "vllm_option",
]

# vLLM's own default of --max-lora-rank (vllm.config.LoRAConfig.max_lora_rank).
VLLM_DEFAULT_MAX_LORA_RANK = 16
# vLLM's OpenAI server, as vLLM's own images run it.
VLLM_ENTRY_POINT = "vllm.entrypoints.openai.api_server"
# vLLM's LoRA resolvers load an adapter by name from a directory or the hub when a request
# names an unknown model: around admission. They never reach the child's environment.
VLLM_RESOLVER_ENV = ("VLLM_LORA_RESOLVER_CACHE_DIR", "VLLM_LORA_RESOLVER_HF_REPO_LIST")
# The longest one load_lora_adapter may take (vLLM reads the weights and warms them up).
VLLM_LOAD_TIMEOUT_S = 300.0


class _FrontParser(argparse.ArgumentParser):
    """An argument parser whose mistakes are a :class:`LorafleetError` (one line), not
    argparse's usage text and exit."""

    def error(self, message: str):  # type: ignore[override]
        raise LorafleetError(message)


def _front_parser() -> argparse.ArgumentParser:
    """The front's own flags; ``--help`` shows them (vLLM's are vLLM's to document)."""
    parser = _FrontParser(
        prog="python -m lorafleet.serve.vllm_front",
        description=(
            "Serve vLLM behind lorafleet's adapter admission checks, routes, faults and "
            "metrics. Every argument not listed here is vLLM's and is passed on verbatim "
            "(vLLM itself listens only on a Unix socket, --vllm-uds; --lora-modules is refused)."
        ),
        allow_abbrev=False,
    )
    parser.add_argument("--host", default="0.0.0.0", help="Address the front binds.")
    parser.add_argument("--port", type=int, default=8080, help="Port the front listens on.")
    parser.add_argument(
        "--adapter",
        action="append",
        default=[],
        metavar="NAME=SOURCE",
        help="A startup adapter: served name = directory, pvc://CLAIM/PATH, s3:// or gs://. "
        "Repeatable; each must pass the admission checks or the front exits.",
    )
    parser.add_argument(
        "--require-lineage", action="store_true", help="Refuse adapters without lineage.json."
    )
    parser.add_argument(
        "--vllm-uds",
        default=None,
        metavar="PATH",
        help="vLLM's Unix socket; vLLM has no TCP port "
        "(default: vllm.sock in a private temporary directory).",
    )
    parser.add_argument(
        "--vllm-python",
        default=None,
        help="Python interpreter with vLLM installed "
        "(default: $LORAFLEET_VLLM_PYTHON, else this interpreter).",
    )
    parser.add_argument(
        "--api-keys-file",
        default=None,
        metavar="FILE",
        help="API keys of /openai/v1, one NAME:KEY[:RPM] per line "
        "(default: $LORAFLEET_API_KEYS_FILE; open when unset).",
    )
    parser.add_argument(
        "--api-key-rpm",
        type=int,
        default=DEFAULT_RPM,
        help="Requests per minute of an API key whose line sets none.",
    )
    parser.add_argument(
        "--adapter-cache",
        default=None,
        metavar="DIR",
        help="Where s3:// and gs:// adapters are downloaded (default: a temporary directory).",
    )
    parser.add_argument(
        "--startup-timeout-s",
        type=float,
        default=900.0,
        help="Seconds vLLM may take to become healthy before the front gives up.",
    )
    return parser


# Front flags that take a value, and those that do not (argparse checks their values).
_VALUED = (
    "--host",
    "--port",
    "--adapter",
    "--vllm-uds",
    "--vllm-python",
    "--api-keys-file",
    "--api-key-rpm",
    "--adapter-cache",
    "--startup-timeout-s",
)
_SWITCHES = ("--require-lineage", "-h", "--help")
# vLLM flags the front refuses, and why.
_REFUSED = {
    "--lora-modules": "adapters reach vLLM only through lorafleet's admission checks: "
    "use --adapter NAME=SOURCE",
    "--uds": "the front chooses vLLM's socket: use --vllm-uds PATH",
    "--no-enable-lora": "the front serves LoRA adapters; vLLM needs --enable-lora",
}


def _flag(token: str) -> str:
    """The option name of a token (``--x=1`` -> ``--x``), underscores as dashes (vLLM
    accepts both spellings)."""
    name = token.split("=", 1)[0]
    return "--" + name[2:].replace("_", "-") if name.startswith("--") else name


def split_args(argv: Sequence[str]) -> tuple[argparse.Namespace, list[str]]:
    """Split a command line into the front's options and vLLM's arguments.

    Front flags (see the module docstring) may appear anywhere, as ``--flag VALUE`` or
    ``--flag=VALUE``; every other token is vLLM's and keeps its order and spelling.

    Args:
        argv: the arguments after ``python -m lorafleet.serve.vllm_front``.

    Returns:
        The front's namespace (``vllm_python`` and ``api_keys_file`` resolved from the
        environment when not given) and vLLM's arguments as given, without any
        ``--host``/``--port`` (the front adds vLLM's own when it starts it:
        :func:`vllm_command`).

    Raises:
        LorafleetError: a front flag without a valid value, a refused vLLM flag
            (``--lora-modules``, ``--uds``), or an ``--adapter`` that is not ``NAME=SOURCE``.
    """
    front: list[str] = []
    vllm: list[str] = []
    tokens = list(argv)
    i = 0
    while i < len(tokens):
        token = tokens[i]
        flag = _flag(token)
        if flag in _REFUSED:
            raise LorafleetError(f"{token.split('=', 1)[0]}: not accepted: {_REFUSED[flag]}")
        if flag in _VALUED:
            if "=" in token:
                front.append(token)
            elif i + 1 < len(tokens):
                front += [token, tokens[i + 1]]
                i += 1
            else:
                raise LorafleetError(f"{token}: expects a value")
        elif flag in _SWITCHES:
            front.append(token)
        else:
            vllm.append(token)
        i += 1
    namespace = _front_parser().parse_args(front)
    namespace.vllm_python = (
        namespace.vllm_python or os.environ.get("LORAFLEET_VLLM_PYTHON") or sys.executable
    )
    namespace.api_keys_file = namespace.api_keys_file or os.environ.get("LORAFLEET_API_KEYS_FILE")
    for item in namespace.adapter:
        name, sep, source = item.partition("=")
        if not sep or not name or not source:
            raise LorafleetError(f"--adapter {item!r}: expected NAME=SOURCE")
    return namespace, vllm


def vllm_option(args: Sequence[str], name: str) -> str | None:
    """The (first) value of a vLLM option in its argument list; the last one given wins,
    as in argparse.

    Args:
        args: vLLM's arguments.
        name: the option, e.g. ``--max-lora-rank`` (``--max_lora_rank`` matches too).
    """
    value = None
    for i, token in enumerate(args):
        if _flag(token) != name:
            continue
        if "=" in token:
            value = token.split("=", 1)[1]
        elif i + 1 < len(args) and not args[i + 1].startswith("--"):
            value = args[i + 1]
    return value


@dataclass(frozen=True)
class FrontConfig:
    """The front's settings, read from its command line.

    Attributes:
        host: address the front binds.
        port: the front's port.
        adapters: startup adapters, served name -> source.
        require_lineage: refuse adapters without ``lineage.json``.
        vllm_uds: vLLM's Unix socket (``None``: one in a private temporary directory).
        vllm_python: the interpreter that runs vLLM.
        vllm_args: vLLM's arguments from the command line (without host and port).
        base_dir: the base model directory (vLLM's ``--model``).
        served_name: the base's served name (vLLM's first ``--served-model-name``, else
            ``--model``).
        max_rank: the largest LoRA rank admitted (vLLM's ``--max-lora-rank``).
        api_keys_file: the API keys of ``/openai/v1``, if any.
        api_key_rpm: requests per minute of a key whose line sets none.
        adapter_cache: where remote adapters are downloaded (``None``: a temp directory).
        startup_timeout_s: how long vLLM may take to become healthy.
    """

    host: str
    port: int
    adapters: Mapping[str, str]
    require_lineage: bool
    vllm_uds: str | None
    vllm_python: str
    vllm_args: tuple[str, ...]
    base_dir: Path
    served_name: str
    max_rank: int
    api_keys_file: str | None = None
    api_key_rpm: int = DEFAULT_RPM
    adapter_cache: str | None = None
    startup_timeout_s: float = 900.0


def parse_command_line(argv: Sequence[str]) -> FrontConfig:
    """The front's settings from its command line (see :func:`split_args`).

    Raises:
        LorafleetError: naming the flag, if one is missing or malformed (no ``--model``,
            a non-integer ``--max-lora-rank``, an adapter named twice or after the base).
    """
    front, vllm = split_args(argv)
    model = vllm_option(vllm, "--model")
    if not model:
        raise LorafleetError("--model: vLLM's base model directory is required")
    rank_text = vllm_option(vllm, "--max-lora-rank")
    try:
        max_rank = int(rank_text) if rank_text is not None else VLLM_DEFAULT_MAX_LORA_RANK
    except ValueError:
        raise LorafleetError(f"--max-lora-rank {rank_text!r}: expected an integer") from None
    served_name = vllm_option(vllm, "--served-model-name") or model
    adapters: dict[str, str] = {}
    for item in front.adapter:
        name, _, source = item.partition("=")
        if name in adapters:
            raise LorafleetError(f"--adapter {name}: given twice")
        if name == served_name:
            raise LorafleetError(f"--adapter {name}: is the base model's served name")
        adapters[name] = source
    return FrontConfig(
        host=front.host,
        port=front.port,
        adapters=adapters,
        require_lineage=front.require_lineage,
        vllm_uds=front.vllm_uds,
        vllm_python=front.vllm_python,
        vllm_args=tuple(vllm),
        base_dir=Path(model),
        served_name=served_name,
        max_rank=max_rank,
        api_keys_file=front.api_keys_file,
        api_key_rpm=front.api_key_rpm,
        adapter_cache=front.adapter_cache,
        startup_timeout_s=front.startup_timeout_s,
    )


def vllm_command(config: FrontConfig, uds: str) -> list[str]:
    """vLLM's command line: its arguments as given, ``--enable-lora`` when missing, and
    its address, the Unix socket ``uds`` (no TCP port: nothing but the front reaches it)."""
    args = list(config.vllm_args)
    if not any(_flag(a) == "--enable-lora" for a in args):
        args.append("--enable-lora")
    return [config.vllm_python, "-m", VLLM_ENTRY_POINT, *args, "--uds", uds]


# The longest path a Unix socket address holds (sun_path is 108 bytes, NUL-terminated).
_MAX_UDS_BYTES = 107


def vllm_socket_path(given: str | None, private_dir: Path) -> str:
    """Where vLLM's socket goes: ``given`` (a stale socket there is removed), else
    ``vllm.sock`` in ``private_dir``.

    Raises:
        LorafleetError: naming ``--vllm-uds``: the path is too long for a socket, something
            other than a socket is there, or its directory does not exist.
    """
    if given is None:
        return str(private_dir / "vllm.sock")
    path = Path(given)
    if len(os.fsencode(given)) > _MAX_UDS_BYTES:
        raise LorafleetError(
            f"--vllm-uds {given}: longer than a Unix socket path may be ({_MAX_UDS_BYTES} bytes)"
        )
    if not path.parent.is_dir():
        raise LorafleetError(f"--vllm-uds {given}: directory {path.parent} does not exist")
    if path.is_socket():
        path.unlink()  # left by an earlier run: vLLM cannot bind over it
    elif path.exists() or path.is_symlink():
        raise LorafleetError(f"--vllm-uds {given}: exists and is not a socket")
    return given


def _death_signal() -> Callable[[], None] | None:
    """What the child runs before exec to get SIGTERM when the front's process dies
    (Linux's ``PR_SET_PDEATHSIG``), so a front killed outright leaves no vLLM behind;
    ``None`` where there is no ``prctl``. The function is looked up here, in the parent:
    after the fork only the call itself runs."""
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    return lambda: prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG


class VllmProcess:
    """vLLM's OpenAI server as a child process in its own process group.

    Args:
        command: the command line (:func:`vllm_command`).
        uds: the Unix socket it listens on (``url`` is the HTTP base URL over it).
        env: its environment: this one with ``VLLM_ALLOW_RUNTIME_LORA_UPDATING=True``
            and without vLLM's LoRA resolvers when ``None``.
    """

    def __init__(
        self, command: Sequence[str], uds: str, env: Mapping[str, str] | None = None
    ) -> None:
        self.command = list(command)
        self.uds, self.url = uds, "http://vllm"
        if env is None:
            env = {k: v for k, v in os.environ.items() if k not in VLLM_RESOLVER_ENV}
        self.env = {**env, "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True"}
        self._process: subprocess.Popen | None = None

    def start(self) -> None:
        """Start vLLM (call from the main thread: the death signal follows the thread
        that started it)."""
        self._process = subprocess.Popen(
            self.command, env=self.env, start_new_session=True, preexec_fn=_death_signal()
        )

    @property
    def returncode(self) -> int | None:
        """vLLM's exit code once it has exited; ``None`` while it runs (or before start)."""
        return None if self._process is None else self._process.poll()

    def alive(self) -> bool:
        """Whether vLLM was started and still runs."""
        return self._process is not None and self._process.poll() is None

    def stop(self, grace_s: float = 30.0) -> None:
        """SIGTERM to vLLM, SIGKILL to its process group after ``grace_s`` or once it has
        exited (its engine and worker processes with it). Idempotent."""
        process = self._process
        if process is None:
            return
        if process.poll() is None:
            process.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(grace_s)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(5)


def admit(
    name: str,
    source: str | Path,
    base: BaseModelInfo,
    max_rank: int,
    *,
    base_name: str,
    cache_dir: Path,
    require_lineage: bool = False,
) -> AdapterInfo:
    """Every admission check the front runs before vLLM sees an adapter.

    Args:
        name: the adapter's served name.
        source: where it is (directory, ``pvc://``, ``s3://``, ``gs://``).
        base: the served base.
        max_rank: vLLM's ``--max-lora-rank``.
        base_name: the base's served name (an adapter may not take it).
        cache_dir: where remote adapters are downloaded.
        require_lineage: refuse adapters without ``lineage.json``.

    Raises:
        AdapterRejected: at the first failed check (reason ``name``, ``source``,
            ``format``, ``digest``, ``rank``, ``target_modules``, ``fingerprint``,
            ``shape`` or ``no_effect``).
    """
    info = admit_files(
        name,
        source,
        base,
        max_rank,
        base_name=base_name,
        cache_dir=cache_dir,
        require_lineage=require_lineage,
    )
    check_weights_change_something(name, info.path)
    return info


class VllmAdapters:
    """The adapters served by vLLM, admitted by the front; what the adapter admin API
    (:func:`~lorafleet.serve.admin.adapters_admin_router`) drives, as it drives the native
    runtime (same ``name``, ``routes``, ``adapter_table``, ``load_adapter``,
    ``unload_adapter``).

    Args:
        name: the base's served name.
        base: the served base.
        client: vLLM's client (``base_url`` = vLLM).
        max_rank: vLLM's ``--max-lora-rank``.
        require_lineage: refuse adapters without ``lineage.json``.
        cache_dir: where remote adapters are downloaded.
        routes: the front's route table.
    """

    def __init__(
        self,
        name: str,
        base: BaseModelInfo,
        client: httpx.AsyncClient,
        max_rank: int,
        *,
        require_lineage: bool = False,
        cache_dir: Path,
        routes: RouteTable | None = None,
    ) -> None:
        self.name, self.base, self.client = name, base, client
        self.max_rank, self.require_lineage, self.cache_dir = max_rank, require_lineage, cache_dir
        self.routes = routes or RouteTable()
        self._infos: dict[str, AdapterInfo] = {}
        # One load or unload at a time: vLLM's table and ours change together.
        self._lock = asyncio.Lock()

    def has_adapter(self, name: str) -> bool:
        """Whether an adapter of that served name is loaded."""
        return name in self._infos

    def adapter_table(self) -> list[dict[str, Any]]:
        """The served adapters, JSON-ready: name, path, rank, target modules, base
        fingerprint (as the native runtime lists them)."""
        return [info.as_dict() for info in self._infos.values()]

    def check(self, name: str, source: str | Path) -> AdapterInfo:
        """Run the admission checks (:func:`admit`) with this server's settings."""
        return admit(
            name,
            source,
            self.base,
            self.max_rank,
            base_name=self.name,
            cache_dir=self.cache_dir,
            require_lineage=self.require_lineage,
        )

    async def load_adapter(self, name: str, source: str | Path) -> AdapterInfo:
        """Check an adapter, then load it into vLLM; a served version of ``name`` is
        replaced in place only once the new one passed every check and vLLM loaded it
        (vLLM loads the new weights before it drops the old).

        Raises:
            AdapterRejected: if a check fails, or vLLM refuses it (reason ``load``); the
                served version, if any, stays.
        """
        async with self._lock:
            info = await asyncio.to_thread(self.check, name, source)
            await self.install(info)
            return info

    async def install(self, info: AdapterInfo) -> None:
        """Load an admitted adapter into vLLM under its served name.

        Raises:
            AdapterRejected: (reason ``load``) if vLLM refuses it or cannot be reached.
        """
        body = {
            "lora_name": info.name,
            "lora_path": str(info.path.resolve()),
            "load_inplace": info.name in self._infos,
        }
        try:
            response = await self.client.post(
                "/v1/load_lora_adapter", json=body, timeout=VLLM_LOAD_TIMEOUT_S
            )
        except httpx.TransportError as exc:
            raise AdapterRejected(info.name, "load", f"vLLM unreachable: {exc}") from None
        if response.status_code != 200:
            detail = f"vLLM refused it ({response.status_code}): {openai_error_line(response)}"
            raise AdapterRejected(info.name, "load", detail)
        self._infos[info.name] = info

    async def unload_adapter(self, name: str) -> None:
        """Unload an adapter from vLLM.

        Raises:
            KeyError: if no adapter of that name is loaded.
            LorafleetError: if vLLM fails to unload it.
        """
        async with self._lock:
            if name not in self._infos:
                raise KeyError(name)
            try:
                response = await self.client.post(
                    "/v1/unload_lora_adapter", json={"lora_name": name}
                )
            except httpx.TransportError as exc:
                raise LorafleetError(f"adapter {name!r}: vLLM unreachable: {exc}") from None
            if response.status_code not in (200, 404):  # 404: vLLM holds it no more either
                raise LorafleetError(f"adapter {name!r}: vLLM: {openai_error_line(response)}")
            del self._infos[name]


async def _vllm_healthy(client: httpx.AsyncClient) -> bool:
    """Whether vLLM answers ``GET /health`` with 200."""
    try:
        return (await client.get("/health", timeout=5.0)).status_code == 200
    except httpx.TransportError:
        return False


def front_app(
    adapters: VllmAdapters,
    vllm: VllmProcess,
    *,
    admin_token: str | None,
    is_started: Callable[[], bool],
    api_keys: ApiKeys | None = None,
    metrics: ServingMetrics | None = None,
    faults: FaultTable | None = None,
) -> FastAPI:
    """The front's HTTP app: the router in front of vLLM, plus ``/admin/adapters``.

    Args:
        adapters: the admitted adapters (its ``routes`` is the router's table).
        vllm: the vLLM child (its process is the liveness).
        admin_token: bearer token of ``/admin`` (``None``: admin API disabled).
        is_started: a callable, true once the start-up adapters are loaded.
        api_keys: the keys ``/openai/v1`` requires; open when ``None``.
        metrics: where to count; a fresh registry when ``None``.
        faults: faults of canary drills; an empty table when ``None``.
    """

    async def ready() -> bool:
        return bool(is_started()) and vllm.alive() and await _vllm_healthy(adapters.client)

    app = proxy_app(
        vllm.url,
        adapters.routes,
        admin_token,
        metrics,
        api_keys=api_keys,
        upstream_prefix="/v1",
        upstream_uds=vllm.uds,
        faults=faults if faults is not None else FaultTable(),
        known=lambda name: adapters.has_adapter(name) or name == adapters.name,
        is_live=vllm.alive,
        is_ready=ready,
    )
    app.title = "lorafleet vLLM front"
    app.include_router(adapters_admin_router(adapters, admin_token))
    return app


class _Front:
    """One run of the front: vLLM started, the app served, vLLM watched.

    Args:
        config: the settings.
        base: the served base.
        startup: the start-up adapters, already admitted.
        vllm: the vLLM child, started.
        cache_dir: where remote adapters are downloaded.
        api_keys: the keys ``/openai/v1`` requires; open when ``None``.
    """

    def __init__(
        self,
        config: FrontConfig,
        base: BaseModelInfo,
        startup: Sequence[AdapterInfo],
        vllm: VllmProcess,
        cache_dir: Path,
        api_keys: ApiKeys | None,
    ) -> None:
        self.config, self.base, self.startup, self.vllm = config, base, startup, vllm
        self.cache_dir, self.api_keys = cache_dir, api_keys
        self.started = False
        self.failure: str | None = None

    async def run(self, sock: socket.socket) -> None:
        """Serve on ``sock`` until a signal, or until vLLM fails (``self.failure``)."""
        transport = httpx.AsyncHTTPTransport(uds=self.vllm.uds)
        async with httpx.AsyncClient(
            base_url=self.vllm.url, transport=transport, timeout=30.0
        ) as client:
            adapters = VllmAdapters(
                self.config.served_name,
                self.base,
                client,
                self.config.max_rank,
                require_lineage=self.config.require_lineage,
                cache_dir=self.cache_dir,
            )
            app = front_app(
                adapters,
                self.vllm,
                admin_token=os.environ.get("LORAFLEET_ADMIN_TOKEN") or None,
                is_started=lambda: self.started,
                api_keys=self.api_keys,
            )
            server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
            watch = asyncio.create_task(self._watch(adapters, server))
            try:
                await server.serve(sockets=[sock])
            finally:
                watch.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await watch

    async def _watch(self, adapters: VllmAdapters, server: uvicorn.Server) -> None:
        """Wait for vLLM, load the start-up adapters, report ready, then watch vLLM; any
        failure stops the server with ``self.failure`` set."""
        try:
            await self._start_up(adapters)
            self.started = True
            print(self._listening_line(adapters), file=sys.stderr, flush=True)
            while self.vllm.alive():
                await asyncio.sleep(1.0)
            self.failure = f"vLLM exited with code {self.vllm.returncode}"
        except LorafleetError as exc:
            self.failure = str(exc)
        server.should_exit = True

    async def _start_up(self, adapters: VllmAdapters) -> None:
        deadline = time.monotonic() + self.config.startup_timeout_s
        while not await _vllm_healthy(adapters.client):
            if not self.vllm.alive():
                raise LorafleetError(
                    f"vLLM exited with code {self.vllm.returncode} before it was healthy"
                )
            if time.monotonic() > deadline:
                raise LorafleetError(
                    f"vLLM not healthy after {self.config.startup_timeout_s:.0f} s "
                    "(--startup-timeout-s)"
                )
            await asyncio.sleep(0.5)
        for info in self.startup:
            await adapters.install(info)

    def _listening_line(self, adapters: VllmAdapters) -> str:
        models = [adapters.name, *(a["name"] for a in adapters.adapter_table())]
        return (
            f"listening on http://{self.config.host}:{self.config.port} (OpenAI API at "
            f"/openai/v1, metrics at /metrics; vLLM at unix:{self.vllm.uds}): "
            f"{len(models)} model{'s' if len(models) != 1 else ''}: {', '.join(models)}"
        )


def _bind(host: str, port: int) -> socket.socket:
    """The front's listening socket, bound before vLLM starts (a taken port stops the
    front before it spends minutes starting vLLM)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # proto named: asyncio sets TCP_NODELAY only on sockets whose proto is IPPROTO_TCP, and
    # without it a response's body waits ~40 ms behind its headers (Nagle, delayed ACK).
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise LorafleetError(
            f"--host {host} --port {port}: cannot listen: {exc.strerror}"
        ) from None
    sock.listen(2048)
    sock.set_inheritable(False)
    return sock


def run(config: FrontConfig) -> int:
    """Check the start-up adapters, start vLLM, serve until a signal or vLLM's failure.

    Returns:
        The exit code: 0 after SIGTERM/SIGINT, 1 when vLLM failed (the reason printed).

    Raises:
        LorafleetError: (before vLLM starts) the base directory cannot be read, a start-up
            adapter fails a check, the API keys file is malformed, the front's port is taken,
            ``--vllm-uds`` cannot be a socket.
    """
    base = BaseModelInfo.from_directory(config.base_dir)
    cache = Path(config.adapter_cache or tempfile.mkdtemp(prefix="lorafleet-adapters-"))
    startup = [
        admit(
            name,
            source,
            base,
            config.max_rank,
            base_name=config.served_name,
            cache_dir=cache,
            require_lineage=config.require_lineage,
        )
        for name, source in config.adapters.items()
    ]
    keys = config.api_keys_file
    api_keys = ApiKeys.from_file(keys, config.api_key_rpm) if keys else None
    sock = _bind(config.host, config.port)
    private = Path(tempfile.mkdtemp(prefix="lorafleet-vllm-"))  # 0700: only this user
    try:
        uds = vllm_socket_path(config.vllm_uds, private)
        vllm = VllmProcess(vllm_command(config, uds), uds)
        front = _Front(config, base, startup, vllm, cache, api_keys)
        # uvicorn re-raises a signal it handled once it has shut down; these handlers make
        # that a no-op, so vLLM is stopped below and the front exits 0.
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: None)
        vllm.start()
        try:
            asyncio.run(front.run(sock))
        finally:
            vllm.stop()
            with contextlib.suppress(OSError):
                Path(uds).unlink()  # vLLM leaves its socket behind
    finally:
        sock.close()
        shutil.rmtree(private, ignore_errors=True)
    if front.failure is not None:
        print(f"error: {front.failure}", file=sys.stderr, flush=True)
        return 1
    return 0


def main(argv: Sequence[str] | None = None) -> None:
    """Command line: ``python -m lorafleet.serve.vllm_front [FRONT FLAGS] [vLLM FLAGS]``.

    A user mistake (a flag, the base, a start-up adapter) is one ``error:`` line and exit
    code 2, and vLLM never starts; vLLM failing is exit code 1.
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        config = parse_command_line(sys.argv[1:] if argv is None else argv)
        code = run(config)
    except LorafleetError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        sys.exit(exc.exit_code)
    sys.exit(code)


if __name__ == "__main__":
    main()
