"""Model FLOPs of LoRA training on a frozen base, for throughput and MFU figures.

MFU (model FLOPs utilization) is the FLOPs the algorithm needs per second over the
hardware's peak; recomputation (gradient checkpointing) is not counted, so it is MFU and
not HFU. The usual ``6 N`` per token is for full fine-tuning; with a frozen base no weight
gradient is computed for the base, so the count here is, per token:

- every base linear layer (``in x out`` weights): ``2 in out`` forward, plus ``2 in out``
  backward for its input gradient where its input needs one (the first layer's q/k/v read
  the frozen embeddings and get none);
- every LoRA pair of rank ``r``: ``2 r (in + out)`` forward, ``2 r (in + out)`` for the
  weight gradients, ``2 r out`` for B's input gradient, and ``2 r in`` for A's where its
  input needs one;
- the LM head (``hidden x vocab``): ``4 hidden vocab`` (forward and input gradient) at each
  position whose logits are computed: the recipe computes them only where the next token is
  a label, a plain Trainer at every position;
- attention, per layer and example of ``n`` tokens: ``4 n^2 H d`` forward for ``QK^T`` and
  ``PV`` (``H`` query heads of size ``d``), twice that backward, halved for the causal mask
  (the kernels skip the upper triangle): ``6 n^2 H d``.

Elementwise work (norms, activations, softmax, dropout) is not counted, as usual.
:func:`linear_costs` finds which layers exist and which inputs need gradients by running
the model once on two tokens, so any target-module choice is counted as it runs;
``tests/train/test_flops.py`` checks the count against torch's FLOP counter.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

__all__ = [
    "PEAK_TFLOPS",
    "LinearCosts",
    "TrainingFlops",
    "device_peak_tflops",
    "linear_costs",
    "training_flops",
]

# Dense bf16 peak of known GPUs in TFLOP/s (vendors' datasheets, without sparsity); a key
# matches a device name that contains all of its words, first match wins.
PEAK_TFLOPS = {"H100 PCIe": 756.0, "H100": 989.4, "H200": 989.4, "A100": 312.0}
PEAK_ENV = "LORAFLEET_PEAK_TFLOPS"


@dataclass(frozen=True)
class LinearCosts:
    """Per-token FLOPs of a model's matrix multiplications, from :func:`linear_costs`."""

    per_token: float  # base linears and LoRA pairs, forward and backward
    per_logit: float  # the LM head, forward and its input gradient, per computed position
    attention_width: int  # query heads x head size, summed over layers


@dataclass(frozen=True)
class TrainingFlops:
    """FLOPs of a training run, split by where they go."""

    linear: float
    head: float
    attention: float

    @property
    def total(self) -> float:
        return self.linear + self.head + self.attention


def linear_costs(model) -> LinearCosts:
    """Per-token FLOPs of ``model``'s linear layers and LoRA pairs (see the module doc).

    Runs one forward pass on two tokens with hooks (under a forked RNG, so dropout draws do
    not move the training RNG) to see which layers run and whether their inputs need gradients.

    Args:
        model: a transformers causal LM, usually wrapped by PEFT with LoRA layers.
    """
    import torch

    head = model.get_output_embeddings()
    seen: dict[int, tuple[torch.nn.Module, bool]] = {}

    def record(module, args):
        seen[id(module)] = (module, bool(args and args[0].requires_grad))

    hooks = [
        m.register_forward_pre_hook(record)
        for m in model.modules()
        if isinstance(m, torch.nn.Linear)
    ]
    device = next(model.parameters()).device
    try:
        with (
            torch.random.fork_rng(devices=[device] if device.type == "cuda" else []),
            torch.enable_grad(),
        ):
            model(input_ids=torch.zeros((1, 2), dtype=torch.long, device=device), use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    per_token = per_logit = 0.0
    for module, input_grad in seen.values():
        weight = module.in_features * module.out_features
        if module is head:
            per_logit = 4.0 * weight
        elif module.weight.requires_grad:  # a LoRA A or B: weight gradient too
            per_token += 4.0 * weight + (2.0 * weight if input_grad else 0.0)
        else:  # a frozen base layer (with or without LoRA around it)
            per_token += 2.0 * weight + (2.0 * weight if input_grad else 0.0)
    config = model.config
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return LinearCosts(per_token, per_logit, config.num_hidden_layers * heads * head_dim)


def training_flops(
    costs: LinearCosts, lengths: Sequence[int], logit_positions: int, causal: bool = True
) -> TrainingFlops:
    """FLOPs to train on examples of the given lengths once (one epoch of them).

    Args:
        costs: the model's :func:`linear_costs`.
        lengths: real (non-pad) tokens of each example; each attends only within itself.
        logit_positions: positions whose LM-head logits are computed (forward and backward).
        causal: count half of each attention square (what causal kernels compute).

    Returns:
        The FLOPs, by part.
    """
    square = float(sum(n * n for n in lengths))
    attention = 12.0 * square * costs.attention_width * (0.5 if causal else 1.0)
    return TrainingFlops(
        linear=costs.per_token * sum(lengths),
        head=costs.per_logit * logit_positions,
        attention=attention,
    )


def device_peak_tflops(device: str) -> float | None:
    """The dense bf16 peak of ``device`` for MFU: ``$LORAFLEET_PEAK_TFLOPS`` when set, else
    :data:`PEAK_TFLOPS` by the CUDA device's name, else ``None`` (CPU, unknown GPUs).

    Raises:
        ValueError: if ``$LORAFLEET_PEAK_TFLOPS`` is not a positive number.
    """
    import os

    import torch

    if os.environ.get(PEAK_ENV):
        try:
            peak = float(os.environ[PEAK_ENV])
        except ValueError:
            peak = 0.0
        if not peak > 0:
            raise ValueError(
                f"{PEAK_ENV}={os.environ[PEAK_ENV]!r}: expected a positive number of TFLOP/s"
            )
        return peak
    if not device.startswith("cuda") or not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name(torch.device(device))
    return next(
        (peak for key, peak in PEAK_TFLOPS.items() if all(w in name for w in key.split())), None
    )
