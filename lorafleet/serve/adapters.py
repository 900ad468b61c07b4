"""Adapter admission: where an adapter comes from, and the checks it must pass before serving.

An adapter source is any :mod:`lorafleet.storage` location: a local directory,
``pvc://CLAIM/PATH`` (where the claim is mounted: ``LORAFLEET_PVC_MOUNTS``, else
``$LORAFLEET_PVC_ROOT/CLAIM``, default ``/mnt/pvc/CLAIM``), or ``s3://BUCKET/PREFIX`` /
``gs://BUCKET/PREFIX``, downloaded once, whole or not at all, into a cache directory. A
source that is malformed, leaves its claim, is missing or cannot be reached is an
:class:`AdapterRejected` (reason ``source``) carrying the storage layer's one-line message.

:func:`check_adapter_files` runs the static checks, each failure an :class:`AdapterRejected`
with a one-line reason: safetensors weights only (pickle files refused), every file listed
in ``lineage.json``'s ``files`` equal to its recorded SHA-256, rank at most the server's
maximum, target modules present in the base, the base fingerprint in ``lineage.json``
equal to the served base's, and every tensor's shape equal to what the base expects.
:func:`check_changes_output` runs the last, dynamic check once the weights are loaded: the
adapter must change the base's next-token logits on a probe prompt. A server that cannot
run a probe itself (vLLM, behind :mod:`lorafleet.serve.vllm_front`) runs
:func:`check_weights_change_something` instead: some adapted module must have a non-zero
update (``lora_B @ lora_A``, or a LoRA bias) and a non-zero ``lora_alpha``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lorafleet.base import fingerprint_model
from lorafleet.errors import LorafleetError, StorageError
from lorafleet.io import sha256_file, sha256_json
from lorafleet.storage import Storage, parse_location

__all__ = [
    "ADAPTER_NAME",
    "AdapterInfo",
    "AdapterRejected",
    "BaseModelInfo",
    "admit_files",
    "check_adapter_files",
    "check_changes_output",
    "check_weights_change_something",
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


class AdapterRejected(LorafleetError):
    """An adapter failed a check; ``reason`` is a short stable code, the message one line.

    Attributes:
        name: the adapter's served name.
        reason: one of ``name``, ``source``, ``format``, ``digest``, ``rank``,
            ``target_modules``, ``fingerprint``, ``shape``, ``no_effect``, ``load``.
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

    @classmethod
    def from_directory(cls, base_dir: str | Path) -> BaseModelInfo:
        """Read the shapes of a local base model from its ``config.json`` alone.

        The model is built on PyTorch's ``meta`` device: every module and parameter shape,
        no weights read and no memory spent on them (a server whose engine loads the
        weights itself, such as vLLM, checks adapters against this).

        Args:
            base_dir: a ``transformers`` causal-LM directory.

        Raises:
            LorafleetError: naming the directory, if it has no readable model config.
        """
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM

        path = Path(base_dir)
        if not (path / "config.json").is_file():
            raise LorafleetError(f"{path}: not a base model directory (no config.json)")
        try:
            config = AutoConfig.from_pretrained(path)
            with torch.device("meta"):
                model = AutoModelForCausalLM.from_config(config)
        except (OSError, ValueError, KeyError) as exc:
            detail = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise LorafleetError(
                f"{path / 'config.json'}: cannot build the model: {detail}"
            ) from None
        return cls.from_model(model, fingerprint_model(path))


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

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready, as the admin API lists it."""
        return {
            "name": self.name,
            "path": str(self.path),
            "rank": self.rank,
            "target_modules": list(self.target_modules),
            "base_fingerprint": self.base_fingerprint,
        }


def resolve_source(
    name: str, source: str | Path, cache_dir: Path, storage: Storage | None = None
) -> Path:
    """The local directory of an adapter source, downloading remote ones into ``cache_dir``.

    Args:
        name: the adapter's served name (for error messages).
        source: a directory, ``pvc://CLAIM/PATH``, ``s3://BUCKET/PREFIX`` or ``gs://...``.
        cache_dir: where remote adapters are downloaded (one subdirectory per source, kept:
            a source downloaded once is not downloaded again).
        storage: what reads the source; by default a :class:`~lorafleet.storage.Storage`
            configured from the environment (claim mounts, S3 endpoint, credentials).

    Returns:
        A local directory that exists.

    Raises:
        AdapterRejected: (reason ``source``) if the source is malformed, leaves its bucket
            or claim, is not mounted, is missing, or cannot be downloaded.
    """
    try:
        storage = storage or Storage()
        loc = parse_location(source)
        if loc.scheme in ("s3", "gs"):
            if not loc.key:
                raise StorageError(loc.uri, f"expected {loc.scheme}://BUCKET/PREFIX")
            path = Path(cache_dir) / f"{loc.scheme}-{sha256_json(loc.uri)[:16]}"
            if not path.is_dir():  # download_tree puts the directory in place only when whole
                storage.download_tree(loc, path)
        else:
            path = storage.local_path(loc)
    except StorageError as error:
        raise AdapterRejected(name, "source", str(error)) from None
    if path is None or not path.is_dir():
        raise AdapterRejected(name, "source", f"{loc.uri}: no such adapter directory")
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


def _read_lineage(name: str, path: Path) -> dict[str, Any] | None:
    """The adapter's ``lineage.json`` as a mapping, or None when it has none.

    Raises:
        AdapterRejected: (reason ``format``) if the file is not a JSON object.
    """
    lineage_file = path / "lineage.json"
    if not lineage_file.is_file():
        return None
    try:
        lineage = json.loads(lineage_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise AdapterRejected(name, "format", f"{lineage_file}: not valid JSON: {error}") from None
    if not isinstance(lineage, dict):
        raise AdapterRejected(name, "format", f"{lineage_file}: must be a JSON object")
    return lineage


def _check_digests(name: str, path: Path, files: Any) -> None:
    """Every file ``lineage.json`` lists under ``files`` must have the SHA-256 recorded there.

    Args:
        name: the adapter's served name.
        path: its local directory.
        files: lineage's ``files``: relative file name -> hex SHA-256; None checks nothing.

    Raises:
        AdapterRejected: (reason ``digest``) if ``files`` is malformed, names a file outside
            the adapter or a missing one, or a file's digest differs.
    """
    if files is None:
        return
    if not isinstance(files, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in files.items()
    ):
        raise AdapterRejected(
            name, "digest", "lineage.json 'files' must map file names to SHA-256 hex digests"
        )
    for relative, expected in files.items():
        parts = Path(relative).parts
        if not parts or Path(relative).is_absolute() or ".." in parts:
            raise AdapterRejected(
                name, "digest", f"lineage.json lists {relative!r}, not a file inside the adapter"
            )
        file = path / relative
        if not file.is_file():
            raise AdapterRejected(
                name, "digest", f"{relative}: listed in lineage.json but missing from {path}"
            )
        actual = sha256_file(file)
        if actual != expected.lower():
            raise AdapterRejected(
                name,
                "digest",
                f"{relative}: sha256 {actual[:12]}... does not match lineage.json's "
                f"{expected[:12]}... (changed since it was registered)",
            )


def _read_config(name: str, path: Path) -> dict[str, Any]:
    """``adapter_config.json`` as a mapping whose rank fields are integers.

    Raises:
        AdapterRejected: (reason ``format``) naming the file and what is wrong with it.
    """
    file = path / "adapter_config.json"
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise AdapterRejected(name, "format", f"{file}: not UTF-8 text") from None
    except json.JSONDecodeError as exc:
        raise AdapterRejected(
            name, "format", f"{file}: not JSON (line {exc.lineno}: {exc.msg})"
        ) from None
    if not isinstance(config, dict):
        raise AdapterRejected(name, "format", f"{file}: expected a JSON object")
    ranks = [config.get("r", 8), *(config.get("rank_pattern") or {}).values()]
    if not all(isinstance(r, int) and not isinstance(r, bool) and r > 0 for r in ranks):
        raise AdapterRejected(
            name, "format", f"{file}: r and rank_pattern must be positive integers"
        )
    return config


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
    lineage = _read_lineage(name, path)
    if lineage is not None:
        _check_digests(name, path, lineage.get("files"))
    config = _read_config(name, path)
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
    fingerprint = None
    if lineage is not None:
        fingerprint = (lineage.get("base") or {}).get("fingerprint")
        if fingerprint != base.fingerprint:
            raise AdapterRejected(
                name,
                "fingerprint",
                f"lineage.json base fingerprint {fingerprint} != served base {base.fingerprint}",
            )
    elif require_lineage:
        raise AdapterRejected(name, "fingerprint", f"{path}: no lineage.json (required)")
    rank = 0
    try:
        weights_file = safe_open(path / WEIGHTS, framework="pt")
    except Exception as exc:  # SafetensorError (truncated, bad header), OSError
        detail = " ".join(str(exc).split()) or type(exc).__name__
        raise AdapterRejected(
            name, "format", f"{path / WEIGHTS}: not a readable safetensors file ({detail})"
        ) from None
    with weights_file as weights:
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


def check_weights_change_something(name: str, path: Path) -> None:
    """Refuse an adapter whose update is zero by its weights alone (no forward pass).

    A LoRA update of a module is ``scale * lora_B @ lora_A`` (plus ``lora_B``'s bias when
    ``lora_bias``): zero when either matrix is all zeros, or ``lora_alpha`` is 0. PEFT's
    default initialisation zeroes ``lora_B``, so an adapter saved before training is such
    an adapter. Run it after :func:`check_adapter_files` (the files are known readable).

    Args:
        name: the adapter's served name.
        path: its local directory.

    Raises:
        AdapterRejected: (reason ``no_effect``) if no module's update is non-zero.
    """
    from safetensors import safe_open

    config = _read_config(name, path)
    if config.get("lora_alpha", 8) == 0 and not any((config.get("alpha_pattern") or {}).values()):
        raise AdapterRejected(name, "no_effect", "lora_alpha is 0: the update is scaled to zero")
    nonzero: dict[str, set[str]] = {}  # module -> the LoRA parts with a non-zero tensor
    with safe_open(path / WEIGHTS, framework="pt") as weights:
        for key in weights.keys():  # noqa: SIM118 (safe_open is no Mapping)
            module, part = _module_name(key)
            if not part or not bool(weights.get_tensor(key).any()):
                continue
            nonzero.setdefault(module, set()).add("bias" if key.endswith(".bias") else part)
    if not any({"lora_A", "lora_B"} <= parts or "bias" in parts for parts in nonzero.values()):
        raise AdapterRejected(
            name,
            "no_effect",
            f"{path / WEIGHTS}: every module's lora_B (or lora_A) is all zeros: "
            "the adapter does not change the base's output (saved before training?)",
        )


def admit_files(
    name: str,
    source: str | Path,
    base: BaseModelInfo,
    max_rank: int,
    *,
    base_name: str,
    cache_dir: Path,
    require_lineage: bool = False,
) -> AdapterInfo:
    """The checks every server runs before it loads an adapter: the name (valid, not the
    base's served name), the source (resolved, downloaded into ``cache_dir``), then
    :func:`check_adapter_files`.

    Raises:
        AdapterRejected: at the first failed check.
    """
    validate_name(name)
    if name == base_name:
        raise AdapterRejected(name, "name", "is the base model's served name")
    path = resolve_source(name, source, cache_dir)
    return check_adapter_files(name, path, base, max_rank, require_lineage)


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
