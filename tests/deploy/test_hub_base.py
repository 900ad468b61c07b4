"""A hub base on a cluster: the pinned ``hf://`` storage URI and the token Secret that KServe's
storage initializer reads, as ``deploy render``, the Helm chart and ``spec check`` give them.

KServe's side, read in its source: ``Storage._download_hf`` (python/storage/kserve_storage)
splits ``hf://OWNER/MODEL:REVISION`` on its one ``/`` and first ``:`` and passes the revision to
``snapshot_download``; the credential builder (pkg/credentials) turns a Secret listed on the
predictor's ServiceAccount that holds the key ``HF_TOKEN`` into the storage initializer's
``HF_TOKEN`` variable.
"""

from __future__ import annotations

import pytest
import yaml
from helm_python import Chart, HelmValuesError

from lorafleet.deploy.render import render, serving_problems, serving_warnings
from lorafleet.errors import LorafleetError
from lorafleet.fleet import FleetSpec

from ..cli_support import run_lorafleet

SHA = "0e9e39f249a16976918f6564b8830bc894c89659"
PINNED = f"hf://meta-llama/Llama-3.1-8B-Instruct:{SHA}"


def _objects(objects: list[dict]) -> tuple[dict, dict]:
    """The serving ServiceAccount and the InferenceService's predictor."""
    sa = next(o for o in objects if o["metadata"]["name"] == "lorafleet-serving")
    isvc = next(o for o in objects if o["kind"] == "InferenceService")
    return sa, isvc["spec"]["predictor"]


def _base_uri(predictor: dict) -> str:
    return next(u["uri"] for u in predictor["storageUris"] if u["mountPath"] == "/mnt/models/base")


def _spec(kit, profile: str, base: dict | None = None, **serving) -> FleetSpec:
    raw = kit.fleet_for(profile).model_dump(by_alias=True)
    raw["base"].update(base or {})
    raw["serving"].update(serving)
    return FleetSpec.model_validate(raw)


def test_a_gated_hub_base_is_served_pinned_with_its_token_secret(rendered):
    # Given the test fleet: Llama 3.1 at a commit, its token in the Secret hf-token
    for profile in ("aws", "gcp"):
        sa, predictor = _objects(rendered[profile])
        # Then the storage initializer downloads that commit, with the token its
        # ServiceAccount lists (beside the cloud identity, not in place of it)
        assert _base_uri(predictor) == PINNED
        assert predictor["serviceAccountName"] == "lorafleet-serving"
        assert sa["secrets"] == [{"name": "hf-token"}]
        assert sa["metadata"]["annotations"]
        # and the serving container stays off the hub: it loads the downloaded folder
        assert "hf://" not in " ".join(predictor["model"]["args"])


def test_the_token_secret_is_listed_only_for_a_hub_base_and_beside_minio_keys(rendered, kit):
    # Given onprem with the base on a PVC: no hub download, no token on the ServiceAccount
    sa, _ = _objects(rendered["onprem"])
    assert "secrets" not in sa
    # Given onprem reading MinIO, with the base from the hub
    spec = _spec(
        kit,
        "onprem",
        base_uri="",
        adapter_store="s3://models/adapters",
        storage={"s3_endpoint": "http://minio.minio.svc:9000", "credentials_secret": "minio"},
    )
    sa, predictor = _objects(render(spec, "onprem", kit.ADAPTERS))
    # Then both Secrets are listed: KServe reads one kind of key from each
    assert sa["secrets"] == [{"name": "minio"}, {"name": "hf-token"}]
    assert _base_uri(predictor) == PINNED


def test_a_public_hub_base_has_no_token_and_an_unpinned_one_warns(kit):
    # Given a public hub base with no revision and no token
    spec = _spec(
        kit, "aws", {"model": "Qwen/Qwen2.5-0.5B", "revision": None, "hub_token_secret": None}
    )
    sa, predictor = _objects(render(spec, "aws", kit.ADAPTERS))
    assert _base_uri(predictor) == "hf://Qwen/Qwen2.5-0.5B"
    assert "secrets" not in sa
    # Then it renders, with one warning line: the pods would serve whatever main is that day
    [(field, message)] = serving_warnings(spec)
    assert field == "base.revision" and "pin the commit sha" in message and "\n" not in message
    assert serving_warnings(kit.fleet_for("aws")) == []  # pinned


@pytest.mark.parametrize(
    ("base", "serving", "field", "says"),
    [
        (
            {"model": "gpt2"},
            {},
            "base.model",
            "'gpt2': KServe reads a hub base as hf://OWNER/MODEL",
        ),
        (
            {"revision": "refs/pr/3"},
            {},
            "base.revision",
            "with no '/' in the revision; pin the commit sha",
        ),
        ({}, {"base_uri": "hf://meta-llama/Llama/extra"}, "serving.base_uri", "hf://OWNER/MODEL"),
    ],
)
def test_a_hub_base_kserve_cannot_download_is_refused_in_one_line(kit, base, serving, field, says):
    spec = _spec(kit, "aws", base, **serving)
    [(got, message)] = serving_problems(spec, "aws")
    assert got == field and says in message and "\n" not in message
    with pytest.raises(LorafleetError, match=f"^{field}: "):
        render(spec, "aws", kit.ADAPTERS)


def test_a_local_base_folder_is_mounted_on_the_local_profile_and_refused_on_a_cloud(kit, tmp_path):
    # Given a base that is a folder, not a hub id
    folder = tmp_path / "llama"
    folder.mkdir()
    spec = _spec(kit, "aws", {"model": str(folder)}, adapter_store=str(tmp_path / "adapters"))
    # Then a cloud profile names the field to set (no hf:// of a path)
    problems = dict(serving_problems(spec, "aws"))
    assert "cannot be read on profile aws" in problems["serving.base_uri"]
    # and the local profile mounts the folder from the node
    _, predictor = _objects(render(spec, "local", kit.ADAPTERS))
    volumes = {v["name"]: v["hostPath"]["path"] for v in predictor["volumes"]}
    assert volumes["base"] == str(folder)


def test_spec_check_names_the_base_field_and_its_line(tmp_path, kit):
    # Given the test fleet whose hub id has no owner
    raw = yaml.safe_load((kit.ROOT / "tests/deploy/fleet.yaml").read_text())
    raw["base"]["model"] = "gpt2"
    text = yaml.safe_dump(raw, sort_keys=False)
    (tmp_path / "fleet.yaml").write_text(text)
    model_line = text.splitlines().index("  model: gpt2") + 1
    (tmp_path / "seed.jsonl").write_text("")
    (tmp_path / "eval.jsonl").write_text("")
    # When it is checked, Then one line names the file, the line of base.model and the rule
    done = run_lorafleet("spec", "check", "fleet.yaml", cwd=tmp_path)
    assert done.returncode == 2, done.stdout
    [line] = done.stderr.splitlines()
    assert line.startswith(f"error: fleet.yaml:{model_line}: base.model: 'gpt2': KServe reads")


def test_the_chart_lists_the_token_secret_for_an_hf_base_only(kit):
    chart = Chart.load(kit.ROOT / "helm" / "lorafleet")

    def serving_sa(values: dict) -> dict:
        files = chart.render(values, name="lorafleet", namespace="lorafleet")
        docs = yaml.safe_load_all(files["lorafleet/templates/serviceaccounts.yaml"])
        return next(d for d in docs if d and d["metadata"]["name"] == "lorafleet-serving")

    hub = {"storage": {"hubTokenSecret": "hf-token"}, "serviceAccount": {"secrets": ["minio"]}}
    assert serving_sa(hub)["secrets"] == [{"name": "minio"}, {"name": "hf-token"}]
    pvc = {
        "storage": {
            "baseUri": "pvc://models/base",
            "adapterUri": "pvc://models/adapters",
            "hubTokenSecret": "hf-token",
        }
    }
    assert "secrets" not in serving_sa(pvc)


@pytest.mark.parametrize(
    ("storage", "where"),
    [
        ({"baseUri": "hf://gpt2"}, "at '/storage/baseUri'"),
        ({"baseUri": "hf://meta-llama/Llama-3.1-8B:refs/pr/3"}, "at '/storage/baseUri'"),
        ({"hubTokenSecret": "HF_TOKEN"}, "at '/storage/hubTokenSecret'"),
    ],
)
def test_the_chart_schema_refuses_what_kserve_cannot_read(kit, storage, where):
    chart = Chart.load(kit.ROOT / "helm" / "lorafleet")
    with pytest.raises(HelmValuesError) as info:
        chart.render({"storage": storage}, name="lorafleet", namespace="lorafleet")
    assert where in str(info.value)
