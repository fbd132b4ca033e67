"""`quantize_(model)`: store the frozen weights of linear layers in NF4, in place.

Each selected `nn.Linear` is swapped for an :class:`NF4Linear` that holds the packed weight and its
(optionally double-quantized) absmax as frozen parameters and calls `torch.ops.lowmem.nf4_linear`, so the op
is already in the graph Dynamo captures and every backend (lowmem, inductor, eager) runs it. The
16-bit weight is dropped. Trainable layers are never touched; under peft LoRA the frozen base layer
is quantized and the adapters stay in 16 bits.
"""

from __future__ import annotations

import fnmatch
from typing import Callable, Iterable

import torch
from torch import nn

from .formats.nf4 import DEFAULT_BLOCKSIZE, NF4Weight
from .ops import nf4 as _nf4_ops  # noqa: F401  (registers torch.ops.lowmem.nf4_linear)

#: Layers left alone unless named by `include`: the LM head, anything tied to an embedding, and
#: peft's adapters (frozen when loaded for inference, `PeftModel.from_pretrained(base, path)`).
_DEFAULT_EXCLUDE = ("lm_head", "*.lm_head", "*embed*", "*lora_*")
_TENSORS = ("packed", "absmax", "absmax2", "code2", "offset")
#: Stored as frozen `nn.Parameter`s (requires_grad=False), the rest as buffers: FSDP2's `fully_shard`
#: shards a module's parameters on dim 0 and all-gathers them a module at a time, and leaves buffers
#: replicated. The packed codes and the per-block absmax are the weight's bytes (the absmax 1/8 or
#: 1/64 of them); the nested absmax2 (one per 16384 elements), the 256-entry code2 and the scalar
#: offset are small enough to keep whole on every rank. Both kinds are in `state_dict` under the same
#: names, so checkpoints load either way.
_SHARDED = ("packed", "absmax")


class NF4Linear(nn.Module):
    """A frozen linear layer with an NF4 weight; `bias` (if any) keeps its dtype and trainability."""

    def __init__(self, weight: NF4Weight, bias: nn.Parameter | None) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.blocksize = weight.blocksize
        self.weight_dtype = weight.dtype
        for name, tensor in weight.tensors().items():
            if name in _SHARDED:
                self.register_parameter(f"weight_{name}", nn.Parameter(tensor, requires_grad=False))
            else:
                self.register_buffer(f"weight_{name}", tensor)
        self.bias = bias

    @property
    def nf4_weight(self) -> NF4Weight:
        tensors = {n: getattr(self, f"weight_{n}", None) for n in _TENSORS}
        return NF4Weight(shape=(self.out_features, self.in_features), blocksize=self.blocksize,
                         dtype=self.weight_dtype, **tensors)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.lowmem.nf4_linear(
            x, self.weight_packed, self.weight_absmax, [self.out_features, self.in_features], self.blocksize,
            self.bias, getattr(self, "weight_absmax2", None), getattr(self, "weight_code2", None),
            getattr(self, "weight_offset", None),
        )

    def dequantize(self) -> torch.Tensor:
        """The 16-bit weight the NF4 codes stand for (for export or merging adapters)."""
        return self.nf4_weight.dequantize()

    def extra_repr(self) -> str:
        nested = hasattr(self, "weight_absmax2")
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"blocksize={self.blocksize}, double_quant={nested}")


def _matches(name: str, patterns: Iterable[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def quantize_(
    model: nn.Module,
    *,
    blocksize: int = DEFAULT_BLOCKSIZE,
    double_quant: bool = True,
    include: Iterable[str] | Callable[[str, nn.Linear], bool] | None = None,
    exclude: Iterable[str] = (),
    device: torch.device | str | int | None = None,
) -> dict[str, int]:
    """Replace frozen `nn.Linear` weights of `model` by NF4 storage, in place.

    `include`: glob patterns of module names (or a predicate `(name, module) -> bool`) that select
    layers; default all frozen linears except the LM head and embeddings, which only an explicit
    pattern selects. `exclude`: glob patterns never quantized. A linear whose weight requires grad is
    never quantized. `device`: move the model there module by module, quantizing on the way (no 16-bit
    copy of the model on the device); a model with tensors on the meta device is materialized the same
    way (`prepare_`'s walk, without its embedding and `use_cache` steps). Returns {"layers",
    "bytes_before", "bytes_after"}.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"quantize_ takes an nn.Module, got {type(model).__name__}")
    if isinstance(include, str):
        include = (include,)
    if device is not None or any(t.is_meta for t in [*model.parameters(), *model.buffers()]):
        from .prepare import prepare_

        sizes = {n: m.weight.numel() * m.weight.element_size() for n, m in model.named_modules() if type(m) is nn.Linear}
        summary = prepare_(model, device, offload_embeddings=False, training=False, blocksize=blocksize,
                           double_quant=double_quant, include=include, exclude=exclude)
        return {"layers": len(summary.quantized), "bytes_before": sum(sizes[n] for n in summary.quantized),
                "bytes_after": sum(model.get_submodule(n).nf4_weight.nbytes() for n in summary.quantized)}
    chosen = []
    for name, module in model.named_modules():
        if type(module) is not nn.Linear or module.weight.requires_grad or _matches(name, exclude):
            continue
        if callable(include):
            picked = include(name, module)
        elif include is not None:
            picked = _matches(name, include)
        else:
            picked = not _matches(name, _DEFAULT_EXCLUDE)
        if picked:
            if not module.weight.is_floating_point() or module.weight.dtype == torch.float64:
                raise ValueError(f"quantize_: layer {name!r} has a {module.weight.dtype} weight; NF4 needs fp32/fp16/bf16")
            chosen.append(name)
    stats = {"layers": 0, "bytes_before": 0, "bytes_after": 0}
    for name in chosen:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        linear = getattr(parent, child)
        weight = NF4Weight.from_float(linear.weight.data, blocksize, double_quant)
        stats["layers"] += 1
        stats["bytes_before"] += linear.weight.numel() * linear.weight.element_size()
        stats["bytes_after"] += weight.nbytes()
        setattr(parent, child, NF4Linear(weight, linear.bias))
        linear.weight = None  # drop our reference to the 16-bit copy
    return stats
