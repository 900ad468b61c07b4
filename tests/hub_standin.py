"""A stand-in for the Hugging Face Hub's HTTP API, served from memory on 127.0.0.1.

It answers the calls ``huggingface_hub`` makes to download a model (``HF_ENDPOINT`` pointed
here), and keeps the hub's rules those calls rely on:

- ``GET /api/models/{repo}/revision/{rev}``: the repo's info, ``sha`` the commit ``rev``
  (a branch or a commit) stands for; ``GET /api/models/{repo}``: the same for ``main``;
- ``GET /api/models/{repo}/tree/{commit}``: every file of the commit, with size and blob id;
- ``HEAD``/``GET /{repo}/resolve/{rev}/{file}``: the file, with ``X-Repo-Commit``, ``ETag``
  (the content's SHA-256, as the hub gives for LFS files) and ``Content-Length``; no Xet
  headers, so clients take the plain HTTP download;
- an unknown repo is a 404 ``RepoNotFound``, an unknown revision a 404 ``RevisionNotFound``,
  an unknown file a 404 ``EntryNotFound``;
- a gated repo's info and tree are public, as on the hub, but its files need an
  ``Authorization: Bearer`` token: without one, a 401 ``GatedRepo``.

Any other path is a 404. Every request is recorded (``requests``: ``(method, path)``), so a test can say what was fetched.
"""

from __future__ import annotations

import hashlib
import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit

__all__ = ["HubStandIn", "StandInRepo"]


@dataclass
class StandInRepo:
    """One model repo: its commits (commit -> {path: bytes}) and branches (name -> commit)."""

    commits: dict[str, dict[str, bytes]] = field(default_factory=dict)
    branches: dict[str, str] = field(default_factory=dict)
    gated: bool = False

    def commit_of(self, revision: str) -> str | None:
        if revision in self.commits:
            return revision
        return self.branches.get(revision)


class HubStandIn:
    """The stand-in server; ``endpoint`` is its URL, for ``HF_ENDPOINT``. Call :meth:`close`."""

    def __init__(self, repos: dict[str, StandInRepo]) -> None:
        self.repos = repos
        self.requests: list[tuple[str, str]] = []
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:  # quiet
                pass

            def do_HEAD(self) -> None:
                hub._answer(self, body=False)

            def do_GET(self) -> None:
                hub._answer(self, body=True)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.endpoint = f"http://127.0.0.1:{self.server.server_port}"
        # A short poll interval: shutdown() in close() returns within it.
        self.thread = threading.Thread(
            target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self.thread.start()

    def fetched(self) -> set[str]:
        """The files downloaded (GET of ``/resolve/``), as ``repo/file`` after the revision."""
        found = set()
        for method, path in self.requests:
            repo_id, marker, rest = path.lstrip("/").partition("/resolve/")
            if method == "GET" and marker:
                found.add(f"{repo_id}/{rest.split('/', 1)[1]}")
        return found

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)

    # --- request handling ------------------------------------------------------------

    def _answer(self, request: BaseHTTPRequestHandler, body: bool) -> None:
        path = unquote(urlsplit(request.path).path)
        self.requests.append((request.command, path))
        if path.startswith("/api/models/"):
            status, headers, payload = self._api(path.removeprefix("/api/models/"))
        else:
            status, headers, payload = self._resolve(path.lstrip("/"), request.headers)
        request.send_response(status)
        for name, value in {**headers, "Content-Length": str(len(payload))}.items():
            request.send_header(name, value)
        request.end_headers()
        if body:
            request.wfile.write(payload)

    def _repo(self, rest: str, marker: str) -> tuple[str, StandInRepo | None, str]:
        """Split ``owner/name/<marker>/<tail>``."""
        repo_id, _, tail = rest.partition(f"/{marker}/")
        return repo_id, self.repos.get(repo_id), tail

    @staticmethod
    def _error(status: int, code: str, message: str) -> tuple[int, dict, bytes]:
        headers = {"X-Error-Code": code, "X-Error-Message": message}
        return (
            status,
            headers | {"Content-Type": "application/json"},
            json.dumps({"error": message}).encode(),
        )

    def _api(self, rest: str) -> tuple[int, dict, bytes]:
        marker = "tree" if "/tree/" in rest else "revision"
        if f"/{marker}/" not in rest:  # no revision: the default branch
            rest += "/revision/main"
        repo_id, repo, revision = self._repo(rest, marker)
        if repo is None:
            return self._error(404, "RepoNotFound", "Repository not found")
        commit = repo.commit_of(revision.split("/", 1)[0])
        if commit is None:
            return self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}")
        files = repo.commits[commit]
        if marker == "revision":
            info = {
                "id": repo_id,
                "modelId": repo_id,
                "sha": commit,
                "private": False,
                "gated": "manual" if repo.gated else False,
                "siblings": [{"rfilename": name} for name in sorted(files)],
            }
        else:
            info = [
                {
                    "type": "file",
                    "path": name,
                    "size": len(data),
                    "oid": hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest(),
                }
                for name, data in sorted(files.items())
            ]
        return 200, {"Content-Type": "application/json"}, json.dumps(info).encode()

    def _resolve(self, path: str, headers) -> tuple[int, dict, bytes]:
        parts = path.split("/", 4)
        if len(parts) < 5 or parts[2] != "resolve" or f"{parts[0]}/{parts[1]}" not in self.repos:
            return self._error(404, "RepoNotFound", "Repository not found")
        owner, name, _, revision, *file = parts
        repo = self.repos[f"{owner}/{name}"]
        if repo.gated and not (headers.get("Authorization") or "").startswith("Bearer "):
            return self._error(
                401, "GatedRepo", f"Access to model {owner}/{name} is restricted; log in"
            )
        commit = repo.commit_of(revision)
        if commit is None:
            return self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}")
        data = repo.commits[commit].get(file[0])
        if data is None:
            error = self._error(404, "EntryNotFound", f"{file[0]} does not exist")
            return error[0], error[1] | {"X-Repo-Commit": commit}, error[2]
        return (
            200,
            {
                "X-Repo-Commit": commit,
                "ETag": f'"{hashlib.sha256(data).hexdigest()}"',
                "Content-Type": "application/octet-stream",
            },
            data,
        )
