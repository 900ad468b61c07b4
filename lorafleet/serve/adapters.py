"""Adapter admission: where an adapter comes from, and the checks it must pass before serving.

An adapter source is a local directory, ``pvc://CLAIM/PATH`` (the claim mounted at
``$LORAFLEET_PVC_ROOT/CLAIM``, default ``/mnt/pvc/CLAIM``), or ``s3://BUCKET/PREFIX`` /
``gs://BUCKET/PREFIX``, downloaded once into a cache directory by an optional hook
(``boto3`` / ``google-cloud-storage``; a clear error names the missing package).

:func:`check_adapter_files` runs the static checks, each failure an :class:`AdapterRejected`
with a one-line reason: safetensors weights only (pickle files refused), rank at most the
server's maximum, target modules present in the base, the base fingerprint in
``lineage.json`` equal to the served base's, and every tensor's shape equal to what the base
expects. :func:`check_changes_output` runs the last, dynamic check once the weights are
loaded: the adapter must change the base's next-token logits on a probe prompt.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lorafleet.errors import LorafleetError
from lorafleet.io import atomic_dir, sha256_json

__all__ = [
    "ADAPTER_NAME",
    "AdapterInfo",
    "AdapterRejected",
    "BaseModelInfo",
    "Downloader",
    "check_adapter_files",
    "check_changes_output",
    "resolve_source",
    "validate_name",
]

# Letters, digits, "-" and "_": no "/", "." or ".." (no path traversal), and a valid PEFT
# adapter key (torch module names may not hold ".").
ADAPTER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")
WEIGHTS = "adapter_model.safetensors"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")
# The smallest logit change that counts as "changes the output" (float32 noise is ~1e-7).
MIN_LOGIT_CHANGE = 1e-5

# download(bucket, prefix, dest): copy every object under prefix into the directory dest.
Downloader = Callable[[str, str, Path], None]


class AdapterRejected(LorafleetError):
    """An adapter failed a check; ``reason`` is a short stable code, the message one line.

    Attributes:
        name: the adapter's served name.
        reason: one of ``name``, ``source``, ``format``, ``rank``, ``target_modules``,
            ``fingerprint``, ``shape``, ``no_effect``, ``load``.
        detail: what exactly is wrong.
    """

    def __init__(self, name: str, reason: str, detail: str) -> None:
        self.name, self.reason, self.detail = name, reason, detail
        super().__init__(f"adapter {name!r} rejected ({reason}): {detail}")


def validate_name(name: str) -> str:
    """Return ``name`` if it may name an adapter or a route.

    Raises:
        AdapterRejected: (reason ``name``) otherwise.
    """
    if not ADAPTER_NAME.fullmatch(name):
        raise AdapterRejected(
            name, "name", f"names match {ADAPTER_NAME.pattern} (no '/', '.' or spaces)"
        )
    return name


@dataclass(frozen=True)
class BaseModelInfo:
    """What the checks need to know about the served base model.

    Attributes:
        fingerprint: :func:`lorafleet.base.fingerprint_model` of the base directory.
        linear_shapes: linear module name -> (in_features, out_features).
        param_shapes: parameter name -> shape.
    """

    fingerprint: str
    linear_shapes: Mapping[str, tuple[int, int]]
    param_shapes: Mapping[str, tuple[int, ...]]

    @classmethod
    def from_model(cls, model: Any, fingerprint: str) -> BaseModelInfo:
        """Read the shapes of a ``transformers`` model (before any adapter is loaded)."""
        import torch

        linear = {
            name: (m.in_features, m.out_features)
            for name, m in model.named_modules()
            if isinstance(m, torch.nn.Linear)
        }
        params = {name: tuple(p.shape) for name, p in model.named_parameters()}
        return cls(fingerprint, linear, params)


@dataclass(frozen=True)
class AdapterInfo:
    """An adapter that passed the static checks.

    Attributes:
        name: served name.
        path: local directory.
        rank: the largest LoRA rank among its tensors.
        target_modules: the module names (or pattern) it adapts.
        base_fingerprint: the base fingerprint from its ``lineage.json``, if it has one.
    """

    name: str
    path: Path
    rank: int
    target_modules: tuple[str, ...]
    base_fingerprint: str | None


def _download_s3(bucket: str, prefix: str, dest: Path) -> None:
    try:
        import boto3
    except ImportError:
        raise LorafleetError(
            "s3:// adapters need boto3: pip install boto3 (or mount the bucket and use a path)"
        ) from None
    client = boto3.client("s3", endpoint_url=os.environ.get("AWS_ENDPOINT_URL") or None)
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for obj in page.get("Contents", []):
            relative = obj["Key"][len(prefix) :].lstrip("/")
            if relative:
                (dest / relative).parent.mkdir(parents=True, exist_ok=True)
                client.download_file(bucket, obj["Key"], str(dest / relative))


def _download_gcs(bucket: str, prefix: str, dest: Path) -> None:
    try:
        from google.cloud import storage
    except ImportError:
        raise LorafleetError(
            "gs:// adapters need google-cloud-storage: pip install google-cloud-storage "
            "(or mount the bucket and use a path)"
        ) from None
    for blob in storage.Client().list_blobs(bucket, prefix=prefix):
        relative = blob.name[len(prefix) :].lstrip("/")
        if relative:
            (dest / relative).parent.mkdir(parents=True, exist_ok=True)
            blob.download_to_filename(str(dest / relative))


DOWNLOADERS: dict[str, Downloader] = {"s3": _download_s3, "gs": _download_gcs}


def resolve_source(
    name: str,
    source: str | Path,
    cache_dir: Path,
    downloaders: Mapping[str, Downloader] | None = None,
) -> Path:
    """The local directory of an adapter source, downloading remote ones into ``cache_dir``.

    Args:
        name: the adapter's served name (for error messages).
        source: a directory, ``pvc://CLAIM/PATH``, ``s3://BUCKET/PREFIX`` or ``gs://...``.
        cache_dir: where remote adapters are downloaded (one subdirectory per source).
        downloaders: scheme -> download hook; defaults to boto3 / google-cloud-storage.

    Returns:
        A local directory that exists.

    Raises:
        AdapterRejected: (reason ``source``) if the source is malformed or missing.
        LorafleetError: if a remote scheme's client library is not installed.
    """
    text = str(source)
    scheme, sep, rest = text.partition("://")
    if not sep:
        path = Path(text)
    elif scheme == "pvc":
        claim, _, sub = rest.partition("/")
        root = Path(os.environ.get("LORAFLEET_PVC_ROOT", "/mnt/pvc")) / claim
        path = root / sub
        if not claim or ".." in Path(sub).parts:
            raise AdapterRejected(name, "source", f"{text}: expected pvc://CLAIM/PATH without '..'")
    elif scheme in (downloaders or DOWNLOADERS):
        bucket, _, prefix = rest.partition("/")
        if not bucket or not prefix:
            raise AdapterRejected(name, "source", f"{text}: expected {scheme}://BUCKET/PREFIX")
        path = cache_dir / f"{scheme}-{sha256_json(text)[:16]}"
        if not path.is_dir():
            with atomic_dir(path) as tmp:
                (downloaders or DOWNLOADERS)[scheme](bucket, prefix.rstrip("/"), tmp)
    else:
        raise AdapterRejected(name, "source", f"{text}: unknown scheme {scheme!r}")
    if not path.is_dir():
        raise AdapterRejected(name, "source", f"{path}: no such adapter directory")
    return path


def _module_name(key: str) -> tuple[str, str]:
    """Split a PEFT weight key into (base module name, LoRA part), e.g.
    ``base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`` ->
    (``model.layers.0.self_attn.q_proj``, ``lora_A``); part is ``""`` for other tensors."""
    key = key.removeprefix("base_model.model.")
    for part in ("lora_A", "lora_B"):
        marker = f".{part}."
        if marker in key:
            return key.split(marker)[0], part
    return key, ""


def _targets_present(targets: Any, linear: Mapping[str, tuple[int, int]]) -> list[str]:
    """The configured target modules that match no linear module of the base."""
    if isinstance(targets, str):
        if targets == "all-linear" or any(re.fullmatch(targets, n) for n in linear):
            return []
        return [targets]
    return [t for t in targets or [] if not any(n == t or n.endswith(f".{t}") for n in linear)]


def check_adapter_files(
    name: str,
    path: Path,
    base: BaseModelInfo,
    max_rank: int,
    require_lineage: bool = False,
) -> AdapterInfo:
    """Run every check that needs no forward pass.

    Args:
        name: the adapter's served name.
        path: its local directory.
        base: the served base model.
        max_rank: the largest LoRA rank the server accepts.
        require_lineage: refuse adapters without ``lineage.json`` (else it is checked when
            present).

    Returns:
        What the checks learned about the adapter.

    Raises:
        AdapterRejected: at the first failed check.
    """
    from safetensors import safe_open

    validate_name(name)
    pickles = sorted(p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise AdapterRejected(
            name,
            "format",
            f"{path}: pickle weights refused ({', '.join(pickles)}); "
            "save with safetensors (save_pretrained(safe_serialization=True))",
        )
    if not (path / WEIGHTS).is_file() or not (path / "adapter_config.json").is_file():
        raise AdapterRejected(name, "format", f"{path}: needs adapter_config.json and {WEIGHTS}")
    config = json.loads((path / "adapter_config.json").read_text())
    if config.get("peft_type", "LORA") != "LORA":
        raise AdapterRejected(name, "format", f"peft_type {config['peft_type']!r} is not LORA")
    ranks = [int(config.get("r", 8)), *map(int, (config.get("rank_pattern") or {}).values())]
    if max(ranks) > max_rank:
        raise AdapterRejected(
            name, "rank", f"rank {max(ranks)} exceeds the server's max rank {max_rank}"
        )
    missing = _targets_present(config.get("target_modules"), base.linear_shapes)
    if missing:
        raise AdapterRejected(
            name, "target_modules", f"target modules not in the base model: {', '.join(missing)}"
        )
    lineage_file = path / "lineage.json"
    fingerprint = None
    if lineage_file.is_file():
        fingerprint = json.loads(lineage_file.read_text()).get("base", {}).get("fingerprint")
        if fingerprint != base.fingerprint:
            raise AdapterRejected(
                name,
                "fingerprint",
                f"lineage.json base fingerprint {fingerprint} != served base {base.fingerprint}",
            )
    elif require_lineage:
        raise AdapterRejected(name, "fingerprint", f"{path}: no lineage.json (required)")
    rank = 0
    with safe_open(path / WEIGHTS, framework="pt") as weights:
        for key in weights.keys():  # noqa: SIM118 (safe_open is no Mapping)
            shape = tuple(weights.get_slice(key).get_shape())
            module, part = _module_name(key)
            if part and module not in base.linear_shapes:
                raise AdapterRejected(name, "shape", f"{key}: no linear module {module} in base")
            if part and key.endswith(".bias"):  # lora_bias=True: B carries a bias of out_features
                out_f = base.linear_shapes[module][1]
                ok = part == "lora_B" and shape == (out_f,)
                expected = f"({out_f},)" if part == "lora_B" else "no bias on lora_A"
            elif part:
                in_f, out_f = base.linear_shapes[module]
                ok = len(shape) == 2 and (
                    shape[1] == in_f if part == "lora_A" else shape[0] == out_f
                )
                expected = f"(r, {in_f})" if part == "lora_A" else f"({out_f}, r)"
                if ok:
                    rank = max(rank, shape[0] if part == "lora_A" else shape[1])
            else:
                ok = base.param_shapes.get(module) == shape
                expected = str(base.param_shapes.get(module, "no such parameter"))
            if not ok:
                raise AdapterRejected(
                    name, "shape", f"{key}: shape {shape}, base expects {expected}"
                )
    if rank > max_rank:
        raise AdapterRejected(name, "rank", f"tensor rank {rank} exceeds max rank {max_rank}")
    targets = config.get("target_modules") or ()
    targets = (targets,) if isinstance(targets, str) else tuple(targets)
    return AdapterInfo(name, path, max(rank, *ranks), targets, fingerprint)


def check_changes_output(name: str, base_logits: Any, adapter_logits: Any) -> None:
    """Refuse an adapter whose probe logits equal the base's (a zero or no-op update).

    Args:
        name: the adapter's served name.
        base_logits: the base's next-token logits on the probe, shape (V,).
        adapter_logits: the adapter's on the same probe, shape (V,).

    Raises:
        AdapterRejected: (reason ``no_effect``) if no logit moved by ``MIN_LOGIT_CHANGE``.
    """
    change = float((adapter_logits - base_logits).abs().max())
    if change < MIN_LOGIT_CHANGE:
        raise AdapterRejected(
            name, "no_effect", f"does not change the base's output (max logit change {change:.1e})"
        )
