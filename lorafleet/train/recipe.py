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
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from lorafleet.chat import IGNORE_INDEX, TokenizedExample, encode_chat
from lorafleet.fleet import LoraSettings, TrainingSettings
from lorafleet.io import atomic_dir, atomic_write_text
from lorafleet.records import Record

__all__ = ["LoRARecipe", "TrainResult", "collate", "load_base", "train_adapter"]

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

    def to_dict(self) -> dict:
        return asdict(self)


def load_base(base_dir: str | Path, dtype: str = "auto"):
    """Load a base model and its tokenizer (float32 on CPU, bf16 on GPU unless told)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if dtype == "auto":
        torch_dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float32
    else:
        torch_dtype = getattr(torch, dtype)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch_dtype)
    if torch.cuda.is_available():
        model = model.to("cuda")
    return model, tokenizer


def collate(examples: Sequence[TokenizedExample], pad_id: int):
    """Right-pad a batch.

    Returns:
        ``input_ids``, ``attention_mask``, ``labels``: LongTensors of shape (B, T_max).
    """
    import torch

    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e.input_ids)
        ids[i, :n] = torch.tensor(e.input_ids)
        labels[i, :n] = torch.tensor(e.labels)
        mask[i, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


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

    Args:
        base_dir: the base model directory (or hub id).
        records: training records; assistant turns are the targets.
        lora: adapter hyper-parameters.
        training: optimizer and schedule settings.
        output_dir: where the adapter and ``metrics.jsonl`` go (replaced atomically).
        on_step: optional callback ``(step, total_steps, loss)`` for progress display.
    """

    def __init__(
        self,
        base_dir: str | Path,
        records: Sequence[Record],
        lora: LoraSettings,
        training: TrainingSettings,
        output_dir: str | Path,
        on_step: Callable[[int, int, float], None] | None = None,
    ) -> None:
        if not records:
            raise ValueError("no training records")
        if not any(m.role == "assistant" for r in records for m in r.messages):
            raise ValueError("no assistant turns to learn from")
        self.base_dir = str(base_dir)
        self.records = list(records)
        self.lora = lora
        self.training = training
        self.output_dir = Path(output_dir)
        self.on_step = on_step

    def setup(self) -> None:
        import torch

        torch.manual_seed(self.training.seed)
        self.model, self.tokenizer = self._setup_model(self.base_dir, self.lora)
        self.examples = self._setup_data(self.tokenizer, self.records, self.training.max_seq_len)
        per_epoch = math.ceil(len(self.examples) / (self.training.batch_size * self.training.grad_accum))
        self.total_steps = self.training.max_steps or per_epoch * self.training.epochs
        self.optimizer, self.scheduler = self._setup_optimizer(self.model, self.training, self.total_steps)

    @staticmethod
    def _setup_model(base_dir: str, lora: LoraSettings):
        from peft import get_peft_model

        model, tokenizer = load_base(base_dir)
        model = get_peft_model(model, _lora_config(lora))
        return model, tokenizer

    @staticmethod
    def _setup_data(tokenizer, records: Sequence[Record], max_seq_len: int) -> list[TokenizedExample]:
        examples = [encode_chat(tokenizer, r.messages, max_length=max_seq_len) for r in records]
        kept = [e for e in examples if e.n_label_tokens > 0]
        if not kept:
            raise ValueError(f"every example lost its assistant tokens at max_seq_len={max_seq_len}")
        return kept

    @staticmethod
    def _setup_optimizer(model, training: TrainingSettings, total_steps: int):
        import torch

        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=training.learning_rate, weight_decay=training.weight_decay)
        warmup = int(training.warmup_ratio * total_steps)

        def factor(step: int) -> float:
            if step < warmup:
                return (step + 1) / (warmup + 1)
            progress = (step - warmup) / max(1, total_steps - warmup)
            return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

        return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, factor)

    def _batches(self, rng: random.Random):
        """Endless shuffled micro-batches, one epoch after another.

        Examples of similar length go together (sorted within shuffled windows of 8
        batches), so little compute is spent on padding; batch order stays random.
        """
        size = self.training.batch_size
        while True:
            order = list(range(len(self.examples)))
            rng.shuffle(order)
            batches = []
            for w in range(0, len(order), size * 8):
                window = sorted(order[w : w + size * 8], key=lambda j: len(self.examples[j].input_ids))
                batches += [window[i : i + size] for i in range(0, len(window), size)]
            rng.shuffle(batches)
            for batch in batches:
                yield [self.examples[j] for j in batch]

    def train(self) -> TrainResult:
        import torch

        device = next(self.model.parameters()).device
        rng = random.Random(self.training.seed)
        batches = self._batches(rng)
        self.model.train()
        losses, lrs = [], []
        tokens = label_tokens = 0
        start = time.perf_counter()
        for step in range(self.total_steps):
            step_loss = 0.0
            for _ in range(self.training.grad_accum):
                batch = {k: v.to(device) for k, v in collate(next(batches), self.tokenizer.pad_token_id).items()}
                loss = self.model(**batch).loss / self.training.grad_accum
                loss.backward()
                step_loss += loss.item()
                tokens += int(batch["attention_mask"].sum())
                label_tokens += int((batch["labels"] != IGNORE_INDEX).sum())
            if not math.isfinite(step_loss):
                raise FloatingPointError(f"loss became {step_loss} at step {step}; lower the learning rate")
            torch.nn.utils.clip_grad_norm_([p for p in self.model.parameters() if p.requires_grad], 1.0)
            lrs.append(self.scheduler.get_last_lr()[0])
            self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
            losses.append(step_loss)
            if self.on_step:
                self.on_step(step + 1, self.total_steps, step_loss)
        wall = time.perf_counter() - start
        self.model.eval()
        result = TrainResult(
            adapter_dir=str(self.output_dir),
            steps=self.total_steps,
            epochs_run=self.total_steps * self.training.batch_size * self.training.grad_accum / len(self.examples),
            train_tokens=tokens,
            label_tokens=label_tokens,
            wall_s=round(wall, 3),
            tokens_per_s=round(tokens / wall, 1) if wall > 0 else 0.0,
            losses=losses,
            learning_rates=lrs,
        )
        with atomic_dir(self.output_dir) as tmp:
            self.model.save_pretrained(tmp, safe_serialization=True)
            metrics = "".join(
                json.dumps({"step": i + 1, "loss": loss, "lr": lr}) + "\n" for i, (loss, lr) in enumerate(zip(losses, lrs, strict=True))
            )
            atomic_write_text(tmp / "metrics.jsonl", metrics)
        return result

    def cleanup(self) -> None:
        del self.model, self.optimizer, self.scheduler
        import gc

        gc.collect()


def train_adapter(
    base_dir: str | Path,
    records: Sequence[Record],
    lora: LoraSettings,
    training: TrainingSettings,
    output_dir: str | Path,
    on_step: Callable[[int, int, float], None] | None = None,
) -> TrainResult:
    """Run the recipe start to finish; see :class:`LoRARecipe`."""
    recipe = LoRARecipe(base_dir, records, lora, training, output_dir, on_step=on_step)
    recipe.setup()
    try:
        return recipe.train()
    finally:
        recipe.cleanup()
