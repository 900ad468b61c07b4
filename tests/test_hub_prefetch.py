"""build-base downloads a hub base once into the model cache and pins its revision's commit for
the run (lorafleet.base.prefetch_hub_base, lorafleet.components.runtime.export_base/pinned_spec).

No hub is reachable here: tests/hub_standin.py serves the hub's HTTP API from memory, with the
rules the download relies on (404 for an unknown repo, revision or file; 401 for a gated repo's
files without an ``Authorization: Bearer`` token), and records every request. Its repo holds
the tiny demo base's files under ``acme/tiny``, plus files loading must not fetch. The code
under test runs in a fresh process, as a pipeline step would: huggingface_hub reads
``HF_ENDPOINT``, ``HF_HOME`` and ``HF_HUB_OFFLINE`` when it is imported, and a step shares
only the model cache (``HF_HOME``) with the others.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest
from safetensors.torch import load_file, save

from lorafleet.base import fingerprint_model, hub_files_to_load
from lorafleet.components.runtime import REF_FILE, base_path, pinned_spec
from lorafleet.fleet import load_fleet

from .hub_standin import HubStandIn, StandInRepo

# Subprocesses with the hub's environment, a local server, a tiny model: seconds, not millis.
pytestmark = pytest.mark.integration

REPO = "acme/tiny"
GATED = "acme/gated"
COMMIT_A = "a" * 40
COMMIT_B = "b" * 40
# Files a hub repo often holds that loading the model does not need.
DECOYS = {
    "pytorch_model.bin": b"decoy",
    "original/consolidated.00.pth": b"decoy",
    "original/params.json": b"{}",
    "README.md": b"# tiny\n",
}
CLUSTER_SPEC = Path(__file__).resolve().parents[1] / "examples" / "fleet-cluster.yaml"
WEIGHT = "model.embed_tokens.weight"


def _repo_files(base: Path, shift: float = 0.0) -> dict[str, bytes]:
    """The tiny base's files (weights shifted by ``shift``, so commits can be told apart)."""
    files = {p.name: p.read_bytes() for p in base.iterdir() if p.is_file()}
    if shift:
        weights = load_file(base / "model.safetensors")
        shifted = {k: v + shift for k, v in weights.items()}
        files["model.safetensors"] = save(shifted, metadata={"format": "pt"})
    return files | DECOYS


@pytest.fixture
def hub(tiny_base: Path) -> Iterator[HubStandIn]:
    tiny = StandInRepo(commits={COMMIT_A: _repo_files(tiny_base)}, branches={"main": COMMIT_A})
    gated = StandInRepo(
        commits={COMMIT_A: _repo_files(tiny_base)}, branches={"main": COMMIT_A}, gated=True
    )
    server = HubStandIn({REPO: tiny, GATED: gated})
    yield server
    server.close()


def _run(hub: HubStandIn, hf_home: Path, code: str, offline: bool = False, **env: str) -> dict:
    """Run ``code`` in a fresh process with the hub at ``hub`` and the cache at ``hf_home``;
    return the JSON of its last line."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE"))}
    clean = {k: v for k, v in clean.items() if "proxy" not in k.lower()}
    done = subprocess.run(
        [sys.executable, "-c", code],
        env=clean
        | {
            "HF_ENDPOINT": hub.endpoint,
            "HF_HOME": str(hf_home),
            "HF_HUB_OFFLINE": "1" if offline else "0",
            "HF_HUB_DISABLE_PROGRESS_BARS": "1",
            "HF_HUB_DISABLE_TELEMETRY": "1",
        }
        | env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.splitlines()[-1])


def _weight_sum(base: Path, shift: float = 0.0) -> float:
    return float((load_file(base / "model.safetensors")[WEIGHT] + shift).double().sum())


# Loads the base as a step does (AutoModelForCausalLM), at each revision given in REVISIONS.
LOAD = (
    "import json\n"
    "from transformers import AutoModelForCausalLM, AutoTokenizer\n"
    "sums = {}\n"
    "for rev in REVISIONS:\n"
    f"    model = AutoModelForCausalLM.from_pretrained({REPO!r}, revision=rev)\n"
    f"    AutoTokenizer.from_pretrained({REPO!r}, revision=rev)\n"
    f"    sums[rev] = float(model.get_parameter({WEIGHT!r}).double().sum())\n"
    "print(json.dumps(sums))\n"
)


def test_only_the_files_loading_needs_are_chosen() -> None:
    files = ["config.json", "model-00001-of-00002.safetensors", "model.safetensors.index.json"]
    files += ["pytorch_model.bin", "pytorch_model.bin.index.json", "tokenizer.model"]
    files += ["original/consolidated.00.pth", "original/tokenizer.model", "README.md"]
    assert hub_files_to_load(files) == [
        "config.json",
        "model-00001-of-00002.safetensors",
        "model.safetensors.index.json",
        "tokenizer.model",
    ]
    # a repo with only PyTorch weights still loads
    assert hub_files_to_load(["config.json", "pytorch_model.bin"]) == [
        "config.json",
        "pytorch_model.bin",
    ]


def test_prefetch_downloads_once_and_the_cache_then_loads_offline(
    hub: HubStandIn, tiny_base: Path, tmp_path: Path
) -> None:
    # Given a hub base, its branch main at COMMIT_A
    hf_home = tmp_path / "hf"
    # When build-base prefetches it (no revision given: the default branch)
    got = _run(
        hub,
        hf_home,
        "import json\nfrom lorafleet.base import prefetch_hub_base\n"
        f"print(json.dumps(prefetch_hub_base({REPO!r})))\n",
    )
    # Then it names the commit main stood for, and fetched what loading needs and nothing else
    assert got == COMMIT_A
    fetched = {f.removeprefix(f"{REPO}/") for f in hub.fetched()}
    assert "model.safetensors" in fetched and "config.json" in fetched
    assert fetched == set(hub_files_to_load(list(hub.repos[REPO].commits[COMMIT_A])))
    assert not fetched & set(DECOYS)
    asked = len(hub.requests)
    # And a later step, offline, loads that commit from the cache alone
    sums = _run(hub, hf_home, f"REVISIONS = [{COMMIT_A!r}]\n" + LOAD, offline=True)
    assert sums[COMMIT_A] == pytest.approx(_weight_sum(tiny_base), rel=1e-6)
    offline_commit = _run(
        hub,
        hf_home,
        "import json\nfrom lorafleet.base import prefetch_hub_base\n"
        f"print(json.dumps(prefetch_hub_base({REPO!r}, 'main')))\n",
        offline=True,
    )
    assert offline_commit == COMMIT_A
    assert len(hub.requests) == asked


def test_a_moved_branch_does_not_move_the_pinned_run(
    hub: HubStandIn, tiny_base: Path, tmp_path: Path
) -> None:
    # Given build-base exported a hub base at main into its artifact
    hf_home, artifact = tmp_path / "hf", tmp_path / "base"
    exported = _run(
        hub,
        hf_home,
        "import json\nfrom types import SimpleNamespace\n"
        "from lorafleet.components.runtime import export_base\n"
        "from lorafleet.fleet import BaseSpec\n"
        f"spec = SimpleNamespace(base=BaseSpec(model={REPO!r}, revision='main'))\n"
        f"base = SimpleNamespace(path={str(artifact)!r}, metadata={{}})\n"
        "export_base(spec, base)\n"
        "print(json.dumps(base.metadata))\n",
    )
    # Then the artifact names the model and the commit, and the fingerprint is the commit's
    assert (artifact / REF_FILE).read_text() == f"{REPO}\n{COMMIT_A}\n"
    assert exported["revision"] == COMMIT_A
    assert exported["fingerprint"] == fingerprint_model(REPO, COMMIT_A)
    # When main moves on the hub during the run
    repo = hub.repos[REPO]
    repo.commits[COMMIT_B] = _repo_files(tiny_base, shift=1.0)
    repo.branches["main"] = COMMIT_B
    # Then the later steps' spec names the pinned commit, not main
    spec = load_fleet(CLUSTER_SPEC, check_files=False)
    spec = spec.model_copy(
        update={"base": spec.base.model_copy(update={"model": REPO, "revision": "main"})}
    )
    assert spec.base.revision == "main"
    pinned = pinned_spec(spec, SimpleNamespace(path=str(artifact)))
    assert pinned.base.revision == COMMIT_A and pinned.base.model == REPO
    assert base_path(SimpleNamespace(path=str(artifact))) == REPO
    # and a step that may reach the hub loads the pinned weights, while main now gives others
    sums = _run(hub, hf_home, f"REVISIONS = [{pinned.base.revision!r}, 'main']\n" + LOAD)
    assert sums[COMMIT_A] == pytest.approx(_weight_sum(tiny_base), rel=1e-6)
    assert sums["main"] == pytest.approx(_weight_sum(tiny_base, shift=1.0), rel=1e-6)
    assert sums["main"] != pytest.approx(sums[COMMIT_A])


def test_demo_and_local_bases_are_not_pinned(tiny_base: Path, tmp_path: Path) -> None:
    spec = load_fleet(CLUSTER_SPEC, check_files=False)
    demo = SimpleNamespace(path=str(tiny_base))
    assert pinned_spec(spec, demo) is spec and base_path(demo) == str(tiny_base)
    local = tmp_path / "local"
    local.mkdir()
    (local / REF_FILE).write_text(f"{tiny_base}\n")
    assert pinned_spec(spec, SimpleNamespace(path=str(local))) is spec
    assert base_path(SimpleNamespace(path=str(local))) == str(tiny_base)


PREFETCH_ERRORS = (
    "import json\nfrom lorafleet.base import prefetch_hub_base\n"
    "from lorafleet.errors import LorafleetError\n"
    "out = {}\n"
    "for repo, rev in CASES:\n"
    "    try:\n"
    "        out[f'{repo}@{rev}'] = prefetch_hub_base(repo, rev)\n"
    "    except LorafleetError as err:\n"
    "        out[f'{repo}@{rev}'] = 'error: ' + str(err)\n"
    "print(json.dumps(out))\n"
)


def test_hub_errors_are_one_line_naming_the_model_and_revision(
    hub: HubStandIn, tmp_path: Path, unreachable_endpoint: str
) -> None:
    cases = [(GATED, "main"), ("acme/nothing", "main"), (REPO, "v9")]
    got = _run(hub, tmp_path / "hf", f"CASES = {cases!r}\n" + PREFETCH_ERRORS)
    for (repo, rev), text in zip(cases, got.values(), strict=True):
        assert text.startswith("error: ") and "\n" not in text, text
        assert f"base.model {repo!r} at revision {rev!r}" in text
    gated, unknown, revision = got.values()
    assert "HTTP 401" in gated and "base.hub_token_secret" in gated
    assert "no such model on the hub" in unknown
    assert "no such revision" in revision
    unreachable = _run(
        hub,
        tmp_path / "hf3",
        f"CASES = {[(REPO, 'main')]!r}\n" + PREFETCH_ERRORS,
        HF_ENDPOINT=unreachable_endpoint,
    )
    (text,) = unreachable.values()
    assert text.startswith(
        f"error: base.model {REPO!r} at revision 'main': cannot download from "
        f"the hub at {unreachable_endpoint} (ConnectError: "
    )
    assert "\n" not in text
    # and with a token the gated base downloads
    with_token = _run(
        hub, tmp_path / "hf2", f"CASES = {[(GATED, 'main')]!r}\n" + PREFETCH_ERRORS, HF_TOKEN="hf_x"
    )
    assert with_token == {f"{GATED}@main": COMMIT_A}
    assert f"{GATED}/model.safetensors" in hub.fetched()
