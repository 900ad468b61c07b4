"""The LoRA fine-tuning recipe (shaped like torchtune's single-device recipes).

``__init__`` only checks arguments; ``setup()`` builds model, data and optimizer through
small helpers that take explicit arguments; ``train()`` runs; ``cleanup()`` frees memory.
The loss only sees assistant tokens (see :func:`lorafleet.chat.encode_chat`).
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from lorafleet.base import fingerprint_model
from lorafleet.chat import IGNORE_INDEX, TokenizedExample, encode_chat
from lorafleet.engine.devices import pick_device, pick_dtype
from lorafleet.fleet import LoraSettings, TrainingSettings
from lorafleet.fleet.training import check_sharding
from lorafleet.io import atomic_dir, atomic_write_json, atomic_write_text, sha256_json
from lorafleet.records import Record
from lorafleet.train.attention import training_attention
from lorafleet.train.checkpoint import (
    gather_trainable,
    is_sharded,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from lorafleet.train.distributed import (
    DistContext,
    broadcast_rng_state,
    close_distributed,
    init_distributed,
    shard_model,
)
from lorafleet.train.errors import NonFiniteLossError, QLoraUnavailableError, TrainingOOMError
from lorafleet.train.flops import device_peak_tflops, linear_costs, training_flops
from lorafleet.train.packing import collate_packed, pack_rows

__all__ = ["LoRARecipe", "TrainResult", "load_base", "train_adapter"]

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    """What a finished run produced."""

    adapter_dir: str
    steps: int
    epochs_run: float
    train_tokens: int
    label_tokens: int
    wall_s: float
    tokens_per_s: float
    losses: list[float] = field(default_factory=list)
    learning_rates: list[float] = field(default_factory=list)
    tflops_per_s: float = (
        0.0  # model FLOPs (lorafleet.train.flops) over the steps' wall time, all ranks
    )
    mfu: float | None = None  # tflops_per_s over the peak of all ranks' devices, where it is known
    # model parameters (base and adapter) rank 0 holds: all under DDP, about 1/world_size under FSDP
    params_per_rank: int = 0
    # ranks that read the base's weights: all under DDP, rank 0 alone under FSDP (the others
    # build it on the meta device and receive rank 0's shards)
    weights_read_by: list[int] = field(default_factory=list)
    # per rank, how far its peak host memory (RSS) rose while the model was
    # loaded, wrapped and sharded (MiB)
    load_host_mb: list[float] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def _sig(x: float) -> float:
    """``x`` to 4 significant digits (throughput figures from tiny CPU runs to large GPU ones)."""
    return float(f"{x:.4g}")


def load_base(
    base_dir: str | Path,
    dtype: str = "auto",
    device: str | None = None,
    quantize_4bit: bool = False,
    attn_implementation: str | None = None,
    revision: str | None = None,
    keep_on_cpu: bool = False,
    on_meta: bool = False,
):
    """Load a base model and its tokenizer (bf16 on a GPU that supports it, else float32,
    unless told).

    Args:
        base_dir: a model directory or hub id.
        dtype: the spec's ``base.dtype``: ``"auto"`` or a torch dtype name
            (:func:`~lorafleet.engine.devices.pick_dtype`).
        device: where to put the model; default the first GPU if there is one, else CPU.
            Either way a process given GPUs (``LORAFLEET_GPUS``) that sees none stops here
            (:func:`~lorafleet.engine.devices.pick_device`).
        quantize_4bit: load the weights as 4-bit NF4 (QLoRA; needs CUDA and bitsandbytes).
        attn_implementation: transformers' attention implementation; default FlashAttention 2
            on a GPU where it is installed, else SDPA.
        revision: the spec's ``base.revision`` (a hub commit or tag); ``None`` for a local
            directory or the hub's default branch.
        keep_on_cpu: leave the weights in host memory (dtype and attention still chosen for
            ``device``): FSDP moves each rank's shards to the device, so no device ever holds
            the whole base.
        on_meta: build the model from the base's config on the ``meta`` device, reading no
            weights (tensors without storage): FSDP's ranks other than 0 do, and receive rank
            0's weights once sharded (:func:`~lorafleet.train.distributed.shard_model`).

    Returns:
        ``(model, tokenizer)``.

    Raises:
        GpuNotVisibleError: given GPUs but none is visible.
    """
    import importlib.util

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    target = pick_device(device)
    on_gpu = target.type == "cuda"
    tokenizer = AutoTokenizer.from_pretrained(base_dir, revision=revision)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    flash = on_gpu and importlib.util.find_spec("flash_attn") is not None
    kwargs = {
        "revision": revision,
        "dtype": pick_dtype(dtype, target),
        "attn_implementation": attn_implementation or ("flash_attention_2" if flash else "sdpa"),
    }
    if quantize_4bit:
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16
        )
        kwargs["device_map"] = {"": str(target)}
    if on_meta:
        config = AutoConfig.from_pretrained(base_dir, revision=revision)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(
                config, dtype=kwargs["dtype"], attn_implementation=kwargs["attn_implementation"]
            )
        return model.eval(), tokenizer  # as from_pretrained leaves it
    model = AutoModelForCausalLM.from_pretrained(base_dir, **kwargs)
    if on_gpu and not quantize_4bit and not keep_on_cpu:
        model = model.to(target)
    return model, tokenizer


def _lora_config(lora: LoraSettings):
    from peft import LoraConfig, TaskType

    return LoraConfig(
        task_type=TaskType.CAUSAL_LM,
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=lora.target_modules,
        use_rslora=lora.use_rslora,
        use_dora=lora.use_dora,
    )


class LoRARecipe:
    """Fine-tune one LoRA adapter on chat records.

    One code path for one process and for torchrun's ranks, which replicate the model (DDP)
    or shard it (FSDP, ``training.sharding: fsdp``): ``batch_size`` rows form one global
    micro-batch, split across the ranks, and the loss is the mean over every assistant
    token of the optimizer step, so the result depends neither on world size nor on
    sharding.

    Args:
        base_dir: the base model directory (or hub id).
        records: training records; assistant turns are the targets.
        lora: adapter hyper-parameters.
        training: optimizer, schedule, packing and checkpoint settings.
        output_dir: where the adapter and ``metrics.jsonl`` go (replaced atomically).
        on_step: optional callback ``(step, total_steps, loss)`` for progress display.
        run_dir: checkpoints and the live ``metrics.jsonl``; default ``<output_dir>.run``.
        resume: continue from the newest checkpoint in ``run_dir`` (if there is one).
        dist: this process's place in the run; default: read torchrun's environment.
        revision: the base's hub revision (the spec's ``base.revision``).
        dtype: the base's weight dtype (the spec's ``base.dtype``; ``"auto"``: bf16 on a GPU
            that supports it, else float32).

    Raises:
        ValueError: no records, or no assistant turn to learn from; FSDP with QLoRA.
        QLoraUnavailableError: QLoRA asked for without a CUDA GPU and bitsandbytes.
    """

    def __init__(
        self,
        base_dir: str | Path,
        records: Sequence[Record],
        lora: LoraSettings,
        training: TrainingSettings,
        output_dir: str | Path,
        on_step: Callable[[int, int, float], None] | None = None,
        run_dir: str | Path | None = None,
        resume: bool = False,
        dist: DistContext | None = None,
        revision: str | None = None,
        dtype: str = "auto",
    ) -> None:
        if not records:
            raise ValueError("no training records")
        if not any(m.role == "assistant" for r in records for m in r.messages):
            raise ValueError("no assistant turns to learn from")
        check_sharding(lora, training)
        if lora.qlora:
            _check_qlora()
        self.base_dir = str(base_dir)
        self.records = list(records)
        self.lora = lora
        self.training = training
        self.output_dir = Path(output_dir)
        self.run_dir = (
            Path(run_dir) if run_dir else self.output_dir.with_name(self.output_dir.name + ".run")
        )
        self.resume = resume
        self.on_step = on_step
        self._dist = dist
        self.revision = revision
        self.dtype = dtype

    def setup(self) -> None:
        import torch

        self.dist = self._dist or init_distributed()
        torch.manual_seed(self.training.seed)
        fsdp = self.training.sharding == "fsdp" and self.dist.world_size > 1
        peak_before = _peak_host_mb()
        self.model, self.tokenizer = self._setup_model(
            self.base_dir,
            self.lora,
            self.dist.device,
            self.training.gradient_checkpointing,
            revision=self.revision,
            dtype=self.dtype,
            keep_on_cpu=fsdp,  # FSDP moves only this rank's shards to the device
            on_meta=fsdp and not self.dist.is_main,  # FSDP: rank 0 alone reads the weights
        )
        read_weights = not any(p.is_meta for p in self.model.parameters())
        if fsdp:
            # The ranks built on meta drew no random numbers for the adapter's init: they
            # continue from rank 0's generator, as they did when each rank loaded the base.
            broadcast_rng_state(self.dist)
        self.examples = self._setup_data(self.tokenizer, self.records, self.training.max_seq_len)
        micro = sum(
            math.ceil(len(self._epoch_rows(e)) / self.training.batch_size)
            for e in range(self.training.epochs)
        )
        self.total_steps = self.training.max_steps or math.ceil(micro / self.training.grad_accum)
        # FSDP shards self.model in place (its parameters become DTensors): the optimizer follows.
        self.ddp_model = self._setup_ddp(self.model, self.dist, self.training.sharding)
        loads = self._all_gather((read_weights, _peak_host_mb() - peak_before))
        self.weights_read_by = [rank for rank, (read, _) in enumerate(loads) if read]
        self.load_host_mb = [round(mb, 1) for _, mb in loads]
        self.params_per_rank = sum(
            (p.to_local() if hasattr(p, "to_local") else p).numel() for p in self.model.parameters()
        )
        # Model FLOPs per step (lorafleet.train.flops) for TFLOP/s and, where the peak is known,
        # MFU: one forward on the device (under FSDP every rank runs it, gathering each layer).
        self.costs = linear_costs(self.model)
        if is_sharded(self.model):  # FSDP keeps the root gathered after a forward (for backward)
            self.model.reshard()
        self.peak_tflops = device_peak_tflops(self.dist.device)
        self.optimizer, self.scheduler = self._setup_optimizer(
            self.model, self.training, self.total_steps
        )
        self.identity = {
            "base_fingerprint": fingerprint_model(self.base_dir, self.revision),
            "lora": self.lora.model_dump(mode="json"),
            "data": sha256_json([[e.input_ids, e.labels] for e in self.examples])[:16],
            "plan": {
                k: getattr(self.training, k)
                for k in ("seed", "packing", "batch_size", "grad_accum", "max_seq_len")
            },
        }

    @staticmethod
    def _setup_model(
        base_dir: str,
        lora: LoraSettings,
        device: str,
        gradient_checkpointing: bool,
        revision: str | None = None,
        dtype: str = "auto",
        keep_on_cpu: bool = False,
        on_meta: bool = False,
    ):
        from peft import get_peft_model, prepare_model_for_kbit_training

        attention = training_attention(device)
        model, tokenizer = load_base(
            base_dir,
            dtype=dtype,
            device=device,
            quantize_4bit=lora.qlora,
            attn_implementation=attention,
            revision=revision,
            keep_on_cpu=keep_on_cpu,
            on_meta=on_meta,
        )
        if lora.qlora:
            model = prepare_model_for_kbit_training(
                model, use_gradient_checkpointing=gradient_checkpointing
            )
        elif gradient_checkpointing:
            model.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": False}
            )
        model = get_peft_model(model, _lora_config(lora))
        if device == "cpu":  # CUDA's dropout kernel is cheap; on CPU the per-element draw is not
            from lorafleet.train.dropout import use_geometric_lora_dropout

            use_geometric_lora_dropout(model)
        return model, tokenizer

    @staticmethod
    def _setup_data(
        tokenizer, records: Sequence[Record], max_seq_len: int
    ) -> list[TokenizedExample]:
        examples = [encode_chat(tokenizer, r.messages, max_length=max_seq_len) for r in records]
        kept = [e for e in examples if e.n_label_tokens > 0]
        if not kept:
            raise ValueError(
                f"every example lost its assistant tokens at max_seq_len={max_seq_len}"
            )
        return kept

    @staticmethod
    def _setup_optimizer(model, training: TrainingSettings, total_steps: int):
        import torch

        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(
            params, lr=training.learning_rate, weight_decay=training.weight_decay
        )
        warmup = int(training.warmup_ratio * total_steps)

        def factor(step: int) -> float:
            if step < warmup:
                return (step + 1) / (warmup + 1)
            progress = (step - warmup) / max(1, total_steps - warmup)
            return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

        return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, factor)

    @staticmethod
    def _setup_ddp(model, dist: DistContext, sharding: str = "ddp"):
        """The module the steps call: ``model`` alone on one rank; else DDP around it, or
        ``model`` itself sharded in place by FSDP (:func:`shard_model`)."""
        if dist.world_size == 1:
            return model
        if sharding == "fsdp":
            return shard_model(model, dist)
        from torch.nn.parallel import DistributedDataParallel

        ids = [int(dist.device.split(":")[1])] if dist.device.startswith("cuda") else None
        return DistributedDataParallel(model, device_ids=ids)

    def _epoch_rows(self, epoch: int) -> list[list[int]]:
        """The rows of one epoch: a pure function of (seed, epoch), so a resumed run sees the same."""
        rng = random.Random(self.training.seed * 1_000_003 + epoch)
        lengths = [len(e.input_ids) for e in self.examples]
        return pack_rows(lengths, self.training.max_seq_len, rng, packing=self.training.packing)

    def _micro_batches(
        self, epoch: int, row: int
    ) -> Iterator[tuple[int, int, list[list[TokenizedExample]]]]:
        """Global micro-batches from data position ``(epoch, row)`` on, endlessly.

        Yields:
            ``(epoch, next_row, rows)``: the position after this batch and its rows of examples.
        """
        size = self.training.batch_size
        while True:
            rows = self._epoch_rows(epoch)
            for start in range(row, len(rows), size):
                chunk = rows[start : start + size]
                yield epoch, start + len(chunk), [[self.examples[i] for i in r] for r in chunk]
            epoch, row = epoch + 1, 0

    def _forward_backward(self, rows: list[list[TokenizedExample]], n_labels: int):
        """Loss (summed over assistant tokens, divided by the step's ``n_labels``) and its gradients.

        This rank's rows run as one padding-free sequence (:func:`collate_packed`), and the
        LM head and cross-entropy run only at the positions whose next token is a label:
        the same loss as transformers' full-logits loss, without the other positions' logits.

        Returns:
            ``(loss, real tokens)`` for this rank's share of the micro-batch.
        """
        import torch
        import torch.nn.functional as F

        dist = self.dist
        mine = rows[dist.rank :: dist.world_size]
        weight = 1.0
        if not mine:  # every rank must join the gradient all-reduce, even without data
            mine, weight = rows[:1], 0.0
        batch = collate_packed(mine)
        device = torch.device(dist.device)
        cu = batch["cu_seq_lens"].to(dtype=torch.int32)
        if self.model.config._attn_implementation == "flash_attention_2":
            cu = cu.to(device)  # FlashAttention's varlen kernel reads them on the GPU
        # else the recipe's varlen attention slices by them: on the CPU they cost no device sync
        # DDP and FSDP both average gradients over ranks (FSDP's reduce-scatter divides by the
        # world size); scaling by world size turns that into the global sum.
        scale = n_labels / dist.world_size
        # bf16 autocast on a GPU that has it; fp32 elsewhere (CPU, or a GPU without bf16)
        amp = pick_dtype("auto", device)
        with torch.autocast(device_type=device.type, dtype=amp, enabled=amp != torch.float32):
            out = self.ddp_model(
                input_ids=batch["input_ids"].to(device),
                position_ids=batch["position_ids"].to(device),
                logits_to_keep=batch["logit_index"].to(device),
                cu_seq_lens_q=cu,
                cu_seq_lens_k=cu,
                max_length_q=batch["max_length"],
                max_length_k=batch["max_length"],
                use_cache=False,
            )
        logits = out.logits[0].float()  # (K, vocab): only the positions the loss looks at
        loss = (
            F.cross_entropy(logits, batch["targets"].to(device), reduction="sum") / scale * weight
        )
        loss.backward()
        return loss.detach(), batch["n_tokens"] if weight else 0

    def _all_reduce(self, values: list[float]) -> list[float]:
        if self.dist.world_size == 1:
            return values
        import torch
        import torch.distributed as tdist

        t = torch.tensor(values, dtype=torch.float64, device=self.dist.device)
        tdist.all_reduce(t)
        return t.tolist()

    def _all_gather(self, value) -> list:
        """Every rank's ``value`` (picklable), in rank order."""
        if self.dist.world_size == 1:
            return [value]
        import torch.distributed as tdist

        out = [None] * self.dist.world_size
        tdist.all_gather_object(out, value)
        return out

    def _restore(self) -> tuple[int, int, int, list[dict]]:
        """Load the newest checkpoint when resuming: ``(step, epoch, row, metrics)``."""
        ckpt = latest_checkpoint(self.run_dir) if self.resume else None
        if ckpt is None:
            return 0, 0, 0, []
        state = load_checkpoint(ckpt, self.model, self.optimizer, self.scheduler, self.identity)
        log.info("resumed from %s", ckpt)
        return state["step"], state["epoch"], state["row"], state["metrics"]

    def train(self) -> TrainResult:
        import torch

        step, epoch, row, metrics = self._restore()
        batches = self._micro_batches(epoch, row)
        live = self.run_dir / "metrics.jsonl"
        if self.dist.is_main:
            atomic_write_text(live, "".join(json.dumps(m) + "\n" for m in metrics))
        last_ckpt = latest_checkpoint(self.run_dir) if self.resume else None
        params = [p for p in self.model.parameters() if p.requires_grad]
        sharded = is_sharded(self.model)
        self.model.train()
        start = time.perf_counter()
        while step < self.total_steps:
            t0 = time.perf_counter()
            micro = [next(batches) for _ in range(self.training.grad_accum)]
            n_labels = sum(
                e.n_label_tokens - (e.labels[0] != IGNORE_INDEX)
                for _, _, rows in micro
                for r in rows
                for e in r
            )
            loss_sum, tokens = torch.zeros((), device=self.dist.device), 0
            try:
                for _, _, rows in micro:
                    loss, n = self._forward_backward(rows, max(n_labels, 1))
                    loss_sum += loss
                    tokens += n
            except torch.OutOfMemoryError as exc:
                raise TrainingOOMError(
                    f"out of accelerator memory at step {step + 1} with training.batch_size={self.training.batch_size} "
                    f"rows of up to {self.training.max_seq_len} tokens: lower training.batch_size (raise grad_accum "
                    "to keep the effective batch) or set training.gradient_checkpointing: true"
                ) from exc
            # Each rank's loss is its label tokens' share scaled by world size (see _forward_backward).
            step_loss, tokens = self._all_reduce([float(loss_sum), float(tokens)])
            step_loss /= self.dist.world_size
            if not math.isfinite(step_loss):
                kept = (
                    f"the last good checkpoint is {last_ckpt}"
                    if last_ckpt
                    else "no checkpoint was written yet"
                )
                raise NonFiniteLossError(
                    f"loss became {step_loss} at step {step + 1}; {kept} (lower training.learning_rate)"
                )
            _clip_grad_norm(params, 1.0)
            lr = self.scheduler.get_last_lr()[0]
            self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
            step += 1
            epoch, row = micro[-1][0], micro[-1][1]
            wall = time.perf_counter() - t0
            examples = [e for _, _, rows in micro for r in rows for e in r]  # every rank's share
            flops = training_flops(self.costs, [len(e.input_ids) for e in examples], n_labels).total
            entry = {
                "step": step,
                "loss": step_loss,
                "lr": lr,
                "tokens": int(tokens),
                "label_tokens": n_labels,
                "tokens_per_s": round(tokens / wall, 1),
                "tflops": flops / 1e12,
                "tflops_per_s": _sig(flops / 1e12 / wall),
            }
            if self.peak_tflops:
                entry["mfu"] = _sig(flops / 1e12 / wall / (self.peak_tflops * self.dist.world_size))
            metrics.append(entry)
            if self.dist.is_main:
                with open(live, "a", encoding="utf-8") as fh:
                    fh.write(json.dumps(entry) + "\n")
            every = self.training.checkpoint_every
            due = every and step % every == 0 and step < self.total_steps
            # Rank 0 writes; under FSDP every rank first joins the gathers of the shards.
            if due and (self.dist.is_main or sharded):
                state = {
                    "epoch": epoch,
                    "row": row,
                    "metrics": metrics,
                    "identity": self.identity,
                }
                last_ckpt = save_checkpoint(
                    self.run_dir,
                    step,
                    self.model,
                    self.optimizer,
                    self.scheduler,
                    state,
                    self.training.keep_checkpoints,
                    main=self.dist.is_main,
                )
            if self.on_step:
                self.on_step(step, self.total_steps, step_loss)
        wall = time.perf_counter() - start
        self.model.eval()
        tokens_done = sum(m["tokens"] for m in metrics)
        step_walls = sum(m["tokens"] / m["tokens_per_s"] for m in metrics if m["tokens_per_s"])
        tflops_per_s = (
            sum(m.get("tflops", 0.0) for m in metrics) / step_walls if step_walls else 0.0
        )
        result = TrainResult(
            adapter_dir=str(self.output_dir),
            steps=self.total_steps,
            epochs_run=round(epoch + row / max(1, len(self._epoch_rows(epoch))), 3),
            train_tokens=tokens_done,
            label_tokens=sum(m["label_tokens"] for m in metrics),
            wall_s=round(wall, 3),
            tokens_per_s=round(tokens_done / step_walls, 1),
            losses=[m["loss"] for m in metrics],
            learning_rates=[m["lr"] for m in metrics],
            tflops_per_s=_sig(tflops_per_s),
            mfu=_sig(tflops_per_s / (self.peak_tflops * self.dist.world_size))
            if self.peak_tflops
            else None,
            params_per_rank=self.params_per_rank,
            weights_read_by=self.weights_read_by,
            load_host_mb=self.load_host_mb,
        )
        # Under FSDP every rank joins the gather of the adapter's shards; rank 0 saves them.
        whole = {"state_dict": gather_trainable(self.model, self.dist.is_main)} if sharded else {}
        if self.dist.is_main:
            with atomic_dir(self.output_dir) as tmp:
                self.model.save_pretrained(tmp, safe_serialization=True, **whole)
                atomic_write_text(
                    tmp / "metrics.jsonl", "".join(json.dumps(m) + "\n" for m in metrics)
                )
            atomic_write_json(self.run_dir / "result.json", result.to_dict())
        return result

    def cleanup(self) -> None:
        """Free the model and optimizer; leave the process group this recipe joined."""
        del self.model, self.ddp_model, self.optimizer, self.scheduler
        import gc

        gc.collect()
        close_distributed(self.dist)


def _peak_host_mb() -> float:
    """This process's peak resident host memory so far, in MiB (Linux and macOS)."""
    import resource
    import sys

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10


def _clip_grad_norm(params: list, max_norm: float) -> None:
    """``torch.nn.utils.clip_grad_norm_`` that also holds for FSDP's sharded gradients: the
    norm of each rank's shards is made whole (all-reduced) before the gradients are scaled."""
    import torch

    grads = [p.grad for p in params if p.grad is not None]
    norm = torch.nn.utils.get_total_norm(grads)
    if hasattr(norm, "full_tensor"):  # a DTensor: a partial norm per rank
        norm = norm.full_tensor()
    torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm)


def _check_qlora() -> None:
    """Raise a one-line error unless a CUDA GPU and bitsandbytes are both present."""
    import importlib.util

    import torch

    missing = [
        what
        for what, ok in (
            ("a CUDA GPU", torch.cuda.is_available()),
            ("bitsandbytes", importlib.util.find_spec("bitsandbytes")),
        )
        if not ok
    ]
    if missing:
        raise QLoraUnavailableError(
            f"lora.qlora: 4-bit QLoRA needs {' and '.join(missing)}, not found here; set lora.qlora: false to train in full precision"
        )


def train_adapter(
    base_dir: str | Path,
    records: Sequence[Record],
    lora: LoraSettings,
    training: TrainingSettings,
    output_dir: str | Path,
    on_step: Callable[[int, int, float], None] | None = None,
    run_dir: str | Path | None = None,
    resume: bool = False,
    revision: str | None = None,
    dtype: str = "auto",
) -> TrainResult:
    """Run the recipe start to finish; see :class:`LoRARecipe`."""
    recipe = LoRARecipe(
        base_dir,
        records,
        lora,
        training,
        output_dir,
        on_step=on_step,
        run_dir=run_dir,
        resume=resume,
        revision=revision,
        dtype=dtype,
    )
    recipe.setup()
    try:
        return recipe.train()
    finally:
        recipe.cleanup()
