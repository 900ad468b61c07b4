"""Batched multi-LoRA: one pass per LoRA layer for a batch that mixes adapters.

PEFT's mixed-adapter forward (``adapter_names=``) loops over the distinct adapters of a
batch in every LoRA layer: it gathers each adapter's rows, runs that adapter's two
matmuls and scatters the result back. With 8 adapters on 16 modules that is 128 small
gather/matmul/scatter steps per decode step, which cost about as much as the base model.

:class:`BatchedLora` stacks every loaded adapter's weights per target module instead
(punica / S-LoRA style) and adds the update of every row in one pass per layer::

    y = base(x)
    y[rows] += ((x[rows] @ A[slot]^T) * scale[slot]) @ B[slot]^T

``rows`` are the batch rows that use an adapter, sorted by their adapter's ``slot``. Rows
for no adapter are not touched, so they equal the base output bit for bit. Ranks are
zero-padded to the largest rank on the module (rounded up to 16 bytes), and an adapter
that does not target a module has zero weights there; both are exact (the padding only
adds zeros).

Two kernels compute the same update:

* ``"grouped"``: :func:`torch.nn.functional.grouped_mm` over the whole stack, one group
  per slot (empty groups for adapters the batch does not use). No weight is copied, and
  the cost does not grow with the number of distinct adapters, but each call has a fixed
  cost of some tens of microseconds on CPU.
* ``"gather"``: each row's A and B are gathered and multiplied with :func:`torch.bmm`
  (BGMV). It copies ``rows * R * (in + out)`` weights per call.

By default, on CPU, a call uses "gather" while that copy is at most
:data:`GATHER_MAX_WEIGHTS` values and "grouped" above it, and "gather" for a module whose
input rows are not a multiple of 16 bytes (``grouped_mm`` needs aligned strides). The
line comes from decode steps on 1 and 2 threads, batch 8-64, rank 4-16, 256 and 2048
features: below it "gather" is faster or close (the demo base, 256 features, stays below
it up to batch 64 and rank 16); well above it "grouped" is up to 5x faster (2048
features, batch 64, rank 16). Other devices use "gather": CUDA's ``grouped_mm`` takes
only bf16, and PEFT keeps LoRA weights in fp32.

PEFT stays the loader, the reference and the fallback. The stack is built from the PEFT
model's LoRA layers, whose parameters are then pointed at slices of it, so every weight
is held once. PEFT's own state is left alone otherwise (its active adapter, enabled
layers): while a batch runs on the stack, a forward pre-hook on every PEFT layer routes
it to the base (``adapter_names`` all ``"__base__"``), and a forward hook on each stacked
layer adds the batched update. Outside such a batch the hooks do nothing, so the PEFT
model works as before. A batch that uses an adapter the stack cannot hold runs through
PEFT's ``adapter_names`` path; :func:`fallback_reason` says which adapters those are
(LoRA variants such as DoRA, ``lora_bias``, ``fan_in_fan_out``, targets that are not
``nn.Linear``, ``modules_to_save`` and trainable tokens). PEFT refuses DoRA in
``adapter_names`` batches, so DoRA adapters cannot generate on either path.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any, Literal

import torch
import torch.nn.functional as F

__all__ = [
    "BASE_ADAPTER",
    "GATHER_MAX_WEIGHTS",
    "BatchedLora",
    "LoraBank",
    "LoraKernel",
    "LoraTable",
    "fallback_reason",
    "lora_update",
]

# PEFT's name for "no adapter" in ``adapter_names``.
BASE_ADAPTER = "__base__"

LoraKernel = Literal["grouped", "gather"]

# Up to this many gathered weight values per call, "gather" beats "grouped" on CPU.
GATHER_MAX_WEIGHTS = 1 << 19


@dataclass(frozen=True)
class LoraTable:
    """The stacked LoRA weights of one target module, S slots, rank padded to R.

    Attributes:
        a: (S, R, in_features); slot s's A in ``a[s, :r_s]``, zeros below it.
        b: (S, out_features, R); slot s's B in ``b[s, :, :r_s]``, zeros right of it.
        scale: (S,); slot s's scaling (``alpha / r``, or ``alpha / sqrt(r)`` with rsLoRA).
    """

    a: torch.Tensor
    b: torch.Tensor
    scale: torch.Tensor

    def kernel(self, rows: int) -> LoraKernel:
        """The faster CPU kernel for ``rows`` rows (see the module docstring)."""
        _, rank, in_features = self.a.shape
        if in_features * self.a.element_size() % 16:  # grouped_mm needs aligned strides
            return "gather"
        gathered = rows * rank * (in_features + self.b.shape[1])
        return "gather" if gathered <= GATHER_MAX_WEIGHTS else "grouped"


@dataclass(frozen=True)
class LoraBank:
    """Every stacked adapter. Never changed in place: a load or unload builds a new one.

    Attributes:
        slots: adapter name -> its slot in every table.
        tables: module name (as in the PEFT model's ``named_modules``) -> its table.
    """

    slots: Mapping[str, int]
    tables: Mapping[str, LoraTable]

    @property
    def nbytes(self) -> int:
        """Bytes held by the tables, padding and zero blocks included."""
        return sum(t.a.nbytes + t.b.nbytes + t.scale.nbytes for t in self.tables.values())


@dataclass(frozen=True)
class _Route:
    """Which adapter each row of the running batch uses.

    Attributes:
        base_names: ``[BASE_ADAPTER] * N``, what every PEFT layer is told.
        rows: (M,) int64, the rows that use an adapter, sorted by slot; ``None`` if none does.
        slots: (M,) int64, their slots.
        offs: (S,) int32, ``offs[s]`` = how many of them have a slot <= s (group ends).
        kernel: how the update is computed; ``None``: :meth:`LoraTable.kernel` decides.
        uniform: the one slot of a batch whose every row uses the same adapter (the
            evaluator's batches, single-adapter traffic): plain matmuls, nothing gathered.
    """

    base_names: list[str]
    rows: torch.Tensor | None = None
    slots: torch.Tensor | None = None
    offs: torch.Tensor | None = None
    kernel: LoraKernel | None = None
    uniform: int | None = None


def lora_update(
    x: torch.Tensor,
    table: LoraTable,
    rows: torch.Tensor,
    slots: torch.Tensor,
    offs: torch.Tensor,
    kernel: LoraKernel,
) -> torch.Tensor:
    """The LoRA update of some rows of a batch, each through its own slot.

    Args:
        x: (N, T, in_features), the layer input.
        table: the module's stacked weights (S slots, rank R).
        rows: (M,) int64, the rows to update, sorted by slot.
        slots: (M,) int64, their slots.
        offs: (S,) int32, ``offs[s]`` = how many rows have a slot <= s; used by "grouped".
        kernel: "grouped" (one ``grouped_mm`` per factor over all slots) or "gather"
            (per-row weights gathered, then ``bmm``).

    Returns:
        (M, T, out_features) in the table's dtype: the update of ``x[rows[i]]``.
    """
    xs = x.index_select(0, rows).to(table.a.dtype)  # (M, T, in)
    m, t = xs.shape[:2]
    scale = table.scale.index_select(0, slots)[:, None, None]  # (M, 1, 1)
    if kernel == "grouped":
        offs = offs * t  # groups run over the M*T flattened tokens
        h = F.grouped_mm(xs.view(m * t, -1), table.a.transpose(1, 2), offs=offs)  # (M*T, R)
        h = h.view(m, t, -1) * scale
        return F.grouped_mm(h.view(m * t, -1), table.b.transpose(1, 2), offs=offs).view(m, t, -1)
    h = torch.bmm(xs, table.a.index_select(0, slots).transpose(1, 2)) * scale  # (M, T, R)
    return torch.bmm(h, table.b.index_select(0, slots).transpose(1, 2))  # (M, T, out)


def fallback_reason(peft_model: Any, name: str) -> str | None:
    """Why adapter ``name`` of a PEFT model cannot be stacked; ``None`` if it can.

    Only plain LoRA on ``nn.Linear`` modules can: every PEFT module that holds the
    adapter must be a ``peft.tuners.lora.Linear`` without a LoRA variant (DoRA, ...),
    ``lora_bias`` or ``fan_in_fan_out``.
    """
    from peft.tuners.lora import Linear as LoraLinear

    for module_name, module in peft_model.named_modules():
        holders = getattr(module, "adapter_layer_names", ())
        if not any(name in getattr(module, attr, ()) for attr in holders):
            continue
        if type(module) is not LoraLinear:
            return f"{module_name} is a {type(module).__name__}, not a LoRA Linear layer"
        if name in module.lora_variant:
            return f"{module_name} uses {type(module.lora_variant[name]).__name__}"
        if module.lora_bias[name]:
            return f"{module_name} has a LoRA bias"
        if module.fan_in_fan_out:
            return f"{module_name} stores its weight transposed (fan_in_fan_out)"
    return None


def _stack(
    peft_model: Any, names: Sequence[str]
) -> tuple[LoraBank, list[tuple[torch.nn.Parameter, torch.Tensor]]]:
    """Copy the LoRA weights of ``names`` into new tables.

    Returns:
        The bank, and (PEFT parameter, its slice of the bank) pairs.
    """
    from peft.tuners.lora import Linear as LoraLinear

    slots = {name: slot for slot, name in enumerate(names)}
    tables: dict[str, LoraTable] = {}
    views: list[tuple[torch.nn.Parameter, torch.Tensor]] = []
    with torch.no_grad():
        for module_name, layer in peft_model.named_modules():
            if type(layer) is not LoraLinear:
                continue
            held = [name for name in names if name in layer.lora_A]
            if not held:
                continue
            like = layer.lora_A[held[0]].weight
            # The largest rank, rounded up to 16 bytes (grouped_mm needs aligned strides).
            align = 16 // like.element_size()
            rank = -(-max(layer.lora_A[name].weight.shape[0] for name in held) // align) * align
            a = like.new_zeros(len(names), rank, layer.in_features)
            b = like.new_zeros(len(names), layer.out_features, rank)
            scale = like.new_zeros(len(names))
            for name in held:
                slot, wa, wb = slots[name], layer.lora_A[name].weight, layer.lora_B[name].weight
                r = wa.shape[0]
                a[slot, :r], b[slot, :, :r], scale[slot] = wa, wb, layer.scaling[name]
                views += [(wa, a[slot, :r]), (wb, b[slot, :, :r])]
            tables[module_name] = LoraTable(a, b, scale)
    return LoraBank(slots, tables), views


class BatchedLora:
    """Serves the adapters of a PEFT model from a stack, one pass per LoRA layer.

    Not thread-safe: the :class:`~lorafleet.engine.generation.Generator` calls it under its lock.

    Args:
        kernel: how the update is computed; ``None`` picks per call on CPU (see the
            module docstring) and "gather" on other devices.

    Attributes:
        bank: the stacked adapters; replaced whole by :meth:`sync`.
        fallbacks: adapter name -> why it runs through PEFT instead.
    """

    def __init__(self, kernel: LoraKernel | None = None) -> None:
        self.kernel = kernel
        self.bank = LoraBank({}, {})
        self.fallbacks: dict[str, str] = {}
        self._route: _Route | None = None
        self._hooks: list[torch.utils.hooks.RemovableHandle] = []

    def sync(self, peft_model: Any, names: Sequence[str]) -> None:
        """Stack the adapters ``names`` of ``peft_model`` anew and swap the stack in.

        The new tables are built first; if that fails, the old stack keeps serving.

        Args:
            peft_model: the ``PeftModel`` holding the adapters; ``None`` once none is left.
            names: the loaded adapters, in load order.
        """
        if peft_model is None:
            bank, views, fallbacks, modules = LoraBank({}, {}), [], {}, {}
        else:
            from peft.tuners.lora import LoraLayer
            from peft.utils.other import AuxiliaryTrainingWrapper

            fallbacks = {n: r for n in names if (r := fallback_reason(peft_model, n)) is not None}
            bank, views = _stack(peft_model, [n for n in names if n not in fallbacks])
            modules = {
                name: module
                for name, module in peft_model.named_modules()
                if isinstance(module, LoraLayer | AuxiliaryTrainingWrapper)
            }
        # No tensor is allocated below: PEFT's parameters become slices of the new stack (the old
        # one is freed with its last reference), and the hooks move to the current layers.
        for param, view in views:
            param.data = view
        for hook in self._hooks:
            hook.remove()
        self._hooks = [
            module.register_forward_pre_hook(self._route_to_base, with_kwargs=True)
            for module in modules.values()
        ]
        self._hooks += [
            modules[name].register_forward_hook(partial(self._add_update, name))
            for name in bank.tables
        ]
        self.bank, self.fallbacks = bank, fallbacks

    def covers(self, adapters: Sequence[str | None]) -> bool:
        """Whether the stack holds every adapter named (``None``: the base)."""
        return all(a is None or a in self.bank.slots for a in adapters)

    @contextlib.contextmanager
    def route(self, adapters: Sequence[str | None]) -> Iterator[None]:
        """Send each row through its adapter in the forward passes run inside the block.

        Args:
            adapters: per batch row, a stacked adapter's name, or ``None`` for the base.
        """
        base_names = [BASE_ADAPTER] * len(adapters)
        named = [(i, self.bank.slots[a]) for i, a in enumerate(adapters) if a is not None]
        if named:
            device = next(iter(self.bank.tables.values())).a.device
            rows, slots = torch.tensor(named, device=device).T
            slots, order = slots.sort(stable=True)
            offs = torch.bincount(slots, minlength=len(self.bank.slots)).cumsum(0)
            kernel = self.kernel or (None if device.type == "cpu" else "gather")
            one_slot = len(named) == len(adapters) and len({s for _, s in named}) == 1
            uniform = named[0][1] if one_slot and self.kernel is None else None
            self._route = _Route(
                base_names, rows[order], slots, offs.to(torch.int32), kernel, uniform
            )
        else:
            self._route = _Route(base_names)
        try:
            yield
        finally:
            self._route = None

    def _route_to_base(
        self, module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[tuple[Any, ...], dict[str, Any]] | None:
        """Forward pre-hook of every PEFT layer: no PEFT adapter for any row of a routed batch."""
        if self._route is None:
            return None
        return args, {**kwargs, "adapter_names": self._route.base_names}

    def _add_update(
        self, name: str, module: torch.nn.Module, args: tuple[Any, ...], output: torch.Tensor
    ) -> torch.Tensor | None:
        """Forward hook of a stacked LoRA layer: add the routed rows' updates to its output."""
        route = self._route
        if route is None or route.rows is None:
            return None
        x = args[0]
        if x.dim() != 3 or x.shape[0] != len(route.base_names):
            raise RuntimeError(
                f"{name}: batched LoRA expects inputs of shape (batch={len(route.base_names)}, "
                f"tokens, features), got {tuple(x.shape)}"
            )
        table = self.bank.tables[name]
        if route.uniform is not None:
            s = route.uniform
            h = (x.to(table.a.dtype) @ table.a[s].T) * table.scale[s]  # (N, T, R)
            return output.add_((h @ table.b[s].T).to(output.dtype))
        kernel = route.kernel or table.kernel(len(route.rows))
        update = lora_update(x, table, route.rows, route.slots, route.offs, kernel)
        return output.index_add_(0, route.rows, update.to(output.dtype))
