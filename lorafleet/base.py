"""The base model: a small demo Llama built here, or any local path / hub id.

``prefetch_hub_base`` downloads a hub base's loadable files into the Hugging Face cache once
and names the commit its revision stood for, so that later steps load exactly those weights.

``build_demo_base`` trains a byte-level BPE tokenizer on a corpus, builds a
Llama-architecture model from a config, pre-trains it briefly on the plain text of the
corpus (no chat format, so adapters have a task and a format to learn) and saves a
normal Hugging Face model directory, cached under a fingerprint of everything that
went into it.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from fnmatch import fnmatch
from pathlib import Path

from lorafleet.chat import CHATML_TEMPLATE
from lorafleet.errors import LorafleetError
from lorafleet.io import atomic_dir, sha256_file, sha256_json

__all__ = [
    "BUILD_VERSION",
    "DemoBaseConfig",
    "build_demo_base",
    "cache_root",
    "fingerprint_model",
    "hub_commit",
    "hub_files_to_load",
    "prefetch_hub_base",
    "train_tokenizer",
]

log = logging.getLogger(__name__)

# Bump when the build procedure changes, so cached bases are rebuilt.
# 2: AdamW betas (0.9, 0.95) in pre-training.
BUILD_VERSION = 2
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>"]
MARKER = "lorafleet-base.json"

# What from_pretrained (and vLLM) read of a hub model besides its weights: config and
# generation config, the tokenizer in whichever form it was saved, and the chat template.
HUB_LOAD_FILES = ("*.json", "tokenizer.model", "*.tiktoken", "merges.txt", "vocab.txt", "*.jinja")


@dataclass(frozen=True)
class DemoBaseConfig:
    """Shape and pre-training budget of the demo base model."""

    vocab_size: int = 4096
    hidden_size: int = 256
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2
    intermediate_size: int = 704  # ~2.75 x hidden, as Llama does
    max_position_embeddings: int = 2048
    pretrain_steps: int = 300
    pretrain_seq_len: int = 256
    pretrain_batch_size: int = 8
    pretrain_lr: float = 3e-3
    seed: int = 0


def cache_root() -> Path:
    """Where built bases are cached (``$LORAFLEET_CACHE`` or ``~/.cache/lorafleet``)."""
    return Path(os.environ.get("LORAFLEET_CACHE", Path.home() / ".cache" / "lorafleet"))


def train_tokenizer(texts: Sequence[str], vocab_size: int):
    """Train a byte-level BPE tokenizer with a ChatML chat template.

    Returns:
        A ``transformers`` fast tokenizer (eos ``<|im_end|>``, pad ``<|pad|>``).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|pad|>",
        unk_token=None,
        bos_token=None,
    )
    fast.chat_template = CHATML_TEMPLATE
    return fast


def _pretrain(model, tokenizer, texts: Sequence[str], cfg: DemoBaseConfig) -> list[float]:
    import torch

    eot = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    stream: list[int] = []
    for t in texts:
        stream.extend(tokenizer(t, add_special_tokens=False)["input_ids"])
        stream.append(eot)
    n = cfg.pretrain_seq_len
    chunks = [stream[i : i + n] for i in range(0, len(stream) - n + 1, n)]
    if not chunks:
        return []
    rng = random.Random(cfg.seed)
    # beta2 0.95, as short LM pre-training runs use: the second moment follows the fast-changing
    # gradients of a few hundred steps (docs/benchmarks.md, demo fleet learning).
    opt = torch.optim.AdamW(
        model.parameters(), lr=cfg.pretrain_lr, betas=(0.9, 0.95), weight_decay=0.01
    )
    warmup = max(1, cfg.pretrain_steps // 10)

    def lr_at(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, cfg.pretrain_steps - warmup)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    model.train()
    losses = []
    order: list[int] = []
    for _ in range(cfg.pretrain_steps):
        if len(order) < cfg.pretrain_batch_size:
            order += rng.sample(range(len(chunks)), len(chunks))
        batch = torch.tensor(
            [chunks[order.pop()] for _ in range(min(cfg.pretrain_batch_size, len(chunks)))]
        )
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    model.eval()
    return losses


def build_demo_base(
    texts: Sequence[str], cfg: DemoBaseConfig, cache_dir: Path | None = None
) -> Path:
    """Build (or reuse from cache) the demo base model for a corpus.

    Args:
        texts: the pre-training corpus (plain text; never the eval sets).
        cfg: model shape and pre-training budget.
        cache_dir: cache root; defaults to :func:`cache_root`.

    Returns:
        A Hugging Face model directory (config, safetensors weights, tokenizer).
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    fp = sha256_json(
        {"version": BUILD_VERSION, "config": asdict(cfg), "corpus": sha256_json(list(texts))}
    )[:16]
    out = (cache_dir or cache_root()) / "base" / f"demo-{fp}"
    if (out / MARKER).is_file():
        log.info("reusing cached demo base %s", out)
        return out
    torch.manual_seed(cfg.seed)
    tokenizer = train_tokenizer(texts, cfg.vocab_size)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads,
        max_position_embeddings=cfg.max_position_embeddings,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
    )
    model = LlamaForCausalLM(config)
    losses = _pretrain(model, tokenizer, texts, cfg)
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        marker = {
            "fingerprint": fp,
            "build_version": BUILD_VERSION,
            "config": asdict(cfg),
            "pretrain_loss_first": losses[0] if losses else None,
            "pretrain_loss_last": losses[-1] if losses else None,
            "parameters": sum(p.numel() for p in model.parameters()),
        }
        (tmp / MARKER).write_text(json.dumps(marker, indent=2) + "\n")
    return out


def hub_commit(repo_id: str, revision: str | None = None) -> str | None:
    """The commit a hub model's ``revision`` (default ``main``) stands for, or ``None``.

    A full commit hash is its own answer; a branch or tag is read from the local Hugging Face
    cache (``refs/<revision>``, written by every download), else asked of the hub unless
    ``HF_HUB_OFFLINE`` is set. ``None`` when neither knows it.
    """
    if revision is not None and re.fullmatch(r"[0-9a-f]{40}", revision):
        return revision
    from huggingface_hub import constants

    folder = Path(constants.HF_HUB_CACHE) / f"models--{repo_id.replace('/', '--')}"
    ref = folder / "refs" / (revision or "main")
    if ref.is_file():
        return ref.read_text().strip()
    if _hub_offline():
        return None
    from huggingface_hub import HfApi

    try:
        return HfApi().model_info(repo_id, revision=revision, timeout=10).sha
    except Exception:  # unreachable hub, unknown id: the fingerprint goes without the commit
        return None


def _hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on")


def hub_files_to_load(files: Sequence[str]) -> list[str]:
    """The files of a hub model repo that loading it needs.

    Only the repo's top level (``original/``, ``onnx/`` and the like hold other formats), its
    config, tokenizer and chat template files (:data:`HUB_LOAD_FILES`), and one weight format:
    the safetensors shards and their index when there are any, else the ``*.bin`` ones.

    Args:
        files: every file path in the repo at one commit.
    """
    top = [f for f in files if "/" not in f]
    kind = ".safetensors" if any(f.endswith(".safetensors") for f in top) else ".bin"
    other_index = ".bin.index.json" if kind == ".safetensors" else ".safetensors.index.json"
    return [
        f
        for f in top
        if f.endswith(kind)
        or (any(fnmatch(f, p) for p in HUB_LOAD_FILES) and not f.endswith(other_index))
    ]


def prefetch_hub_base(repo_id: str, revision: str | None = None) -> str | None:
    """Download a hub base into the Hugging Face cache once, and pin the commit it came from.

    The revision (a branch or tag may move during a run) is resolved to a commit first; only
    the files loading needs (:func:`hub_files_to_load`) of that commit are downloaded, into
    ``HF_HUB_CACHE``, where every later step loading ``revision=<commit>`` finds them. With
    ``HF_HUB_OFFLINE`` set nothing is fetched: the commit comes from the cache (:func:`hub_commit`).

    Args:
        repo_id: the hub model id (``base.model``).
        revision: ``base.revision``; ``None`` for the default branch.

    Returns:
        The 40-hex commit; offline, the cached one or ``None``.

    Raises:
        LorafleetError: the hub refused or does not have the model or revision, or cannot be
            reached (one line naming both).
    """
    if _hub_offline():
        return hub_commit(repo_id, revision)
    # httpx2 is huggingface_hub's transport: its HTTPError covers the hub's own errors and
    # the network's (refused connection, timeout).
    from httpx2 import HTTPError
    from huggingface_hub import HfApi, snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
        RevisionResolutionError,
    )

    where = f"base.model {repo_id!r} at revision {revision or 'main'!r}"
    api = HfApi()
    try:
        pinned = api.resolve_revision(repo_id, revision=revision)
        files = hub_files_to_load(api.list_repo_files(repo_id, revision=pinned.resolved))
        snapshot_download(repo_id, revision=pinned, allow_patterns=files)
    except RevisionNotFoundError:
        raise LorafleetError(f"{where}: the hub has no such revision") from None
    except HfHubHTTPError as err:
        status = err.response.status_code
        if isinstance(err, GatedRepoError) or status in (401, 403):
            raise LorafleetError(
                f"{where}: the hub refused access (HTTP {status}; gated or private); "
                "name the Secret with a token that may read it in base.hub_token_secret"
            ) from None
        if isinstance(err, RepositoryNotFoundError):
            raise LorafleetError(f"{where}: no such model on the hub") from None
        raise LorafleetError(f"{where}: the hub answered HTTP {status}") from None
    except (HTTPError, RevisionResolutionError, OSError) as err:
        # resolve_revision wraps the network's error: name that one
        cause = err.__cause__ if isinstance(err, RevisionResolutionError) and err.__cause__ else err
        detail = next(iter(str(cause).splitlines()), "")
        raise LorafleetError(
            f"{where}: cannot download from the hub at {api.endpoint} "
            f"({type(cause).__name__}: {detail})"
        ) from None
    log.info("%s: pinned to commit %s in %s", where, pinned.resolved, api.endpoint)
    return pinned.resolved


def fingerprint_model(model: str | Path, revision: str | None = None) -> str:
    """A stable fingerprint of a base model.

    For a local directory: SHA-256 over its config and weight files. For a hub id: the id
    and the commit its ``revision`` resolves to (:func:`hub_commit`), so adapters trained on
    one revision are not taken for adapters of another; the id alone where the commit
    cannot be known (offline, never downloaded).
    """
    path = Path(model)
    if not path.is_dir():
        commit = hub_commit(str(model), revision)
        identity = {"hub_id": str(model)} | ({"commit": commit} if commit else {})
        return sha256_json(identity)[:16]
    marker = path / MARKER
    if marker.is_file():
        return json.loads(marker.read_text())["fingerprint"]
    files = sorted(
        p for p in path.iterdir() if p.name == "config.json" or p.suffix == ".safetensors"
    )
    return sha256_json({p.name: sha256_file(p) for p in files})[:16]
