"""Several processes: PyTorch's FSDP2 (`fully_shard`) and DDP around a lowmem-compiled model.

Nothing here replaces PyTorch's engine: `fully_shard` shards, all-gathers and reduce-scatters, DDP
all-reduces, `torchrun` starts the processes. What makes it work with NF4 weights is in
`quantize.NF4Linear`: the packed codes and the absmax are frozen parameters, which `fully_shard`
shards on dim 0 like any other parameter and all-gathers a module at a time (bytes, so nothing is
cast: FSDP2 gathers mixed dtypes as uint8 and never casts integer parameters). The unsharded tensors
it hands the forward are the ones a single process holds, bit for bit, so the graphs the backend
compiles (and the NF4 pass matches) are the same.

This module adds the bookkeeping around it:

- :func:`fully_shard_layers_`: `fully_shard` on each decoder layer, then the root (the recipe; call
  `fully_shard` yourself for anything else) and record what is sharded in the report;
- :func:`sharding_stats`: what this rank holds of the NF4 weights, the trainable weights and the rest,
  sharded or replicated, and the largest unit FSDP2 gathers; filed in `last_report()` under
  `sharding`;
- :func:`expected_sharding`: the same numbers for a rank count, from the unsharded model;
- :func:`predicted_rank_peak`: a one-process predicted peak (`lowmem_compile.plan`) turned into the
  per-rank peak on `world_size` ranks: resident weights divided by the ranks, plus one gathered unit
  running and the next prefetched;
- :func:`trainable_state_dict` / :func:`save_adapters`: the adapters as whole tensors (a collective:
  every rank calls it), saved by rank 0 with peft's `save_pretrained`, loadable by one process.

With FSDP2 the compiled model has a graph break at every `fully_shard`-ed module (Dynamo does not
trace FSDP's hooks), so each decoder layer is a graph of its own: Dynamo compiles the layer's code
once and reuses it for every layer (twice: the first layer's input does not require grad), and the
planner of each graph sees one layer, not the step (see `predicted_rank_peak`).
"""

from __future__ import annotations

import dataclasses
from typing import Iterable

import torch
from torch import nn

from .layer_frames import layer_frames_
from .quantize import _SHARDED, NF4Linear
from .report import STORE, ShardingStats

__all__ = [
    "decoder_layers", "fully_shard_layers_", "sharding_stats", "expected_sharding", "predicted_rank_peak",
    "trainable_state_dict", "save_adapters", "ShardingStats",
]


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The decoder layers of a transformer: the elements of its longest `nn.ModuleList` of modules
    of one class (a Hugging Face model's `model.layers`, under peft too)."""
    best: list[nn.Module] = []
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) > len(best):
            if len({type(m) for m in module}) == 1:
                best = list(module)
    if not best:
        raise ValueError("no nn.ModuleList of layers found; call fully_shard on the layers yourself")
    return best


def _check_mixed_precision(model: nn.Module, mp_policy) -> None:
    param_dtype = getattr(mp_policy, "param_dtype", None)
    if param_dtype is None:
        return
    for name, module in model.named_modules():
        if isinstance(module, NF4Linear) and module.weight_absmax.dtype.is_floating_point:
            raise ValueError(
                f"{name}: an fp32 NF4 absmax would be cast to {param_dtype} by MixedPrecisionPolicy(param_dtype=...) "
                "(FSDP2 casts floating parameters when it gathers them); quantize with double_quant=True (the "
                "default: a uint8 absmax, never cast) or shard without a param_dtype")


def fully_shard_layers_(model: nn.Module, layers: Iterable[nn.Module] | None = None, **fsdp_kwargs) -> nn.Module:
    """`fully_shard(layer, **fsdp_kwargs)` for each decoder layer (:func:`decoder_layers` unless
    `layers` is given), then `fully_shard(model, **fsdp_kwargs)`; returns `model` (now an
    `FSDPModule`) after filing :func:`sharding_stats` in the report. Call it after `prepare_` /
    `quantize_` and before creating the optimizer and compiling. Layers `prepare_` made Dynamo frames
    of their own get their class back first (`layer_frames_(model, False)`): FSDP2 already breaks
    the graph at every sharded layer, and Dynamo then compiles each layer's call apart."""
    from torch.distributed.fsdp import fully_shard

    _check_mixed_precision(model, fsdp_kwargs.get("mp_policy"))
    layer_frames_(model, False)
    for layer in (decoder_layers(model) if layers is None else layers):
        fully_shard(layer, **fsdp_kwargs)
    fully_shard(model, **fsdp_kwargs)
    sharding_stats(model)
    return model


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def sharding_stats(model: nn.Module, record: bool = True) -> ShardingStats:
    """What this rank holds of `model`'s tensors and what FSDP2 shards (counted from the DTensor
    parameters `fully_shard` left: their global and local sizes). `record`: file it in the report
    (`last_report().to_dict()["sharding"]`)."""
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor

    nf4_ids = {id(getattr(m, f"weight_{n}")) for m in model.modules() if isinstance(m, NF4Linear) for n in _SHARDED}
    total = {"nf4": [0, 0], "trainable": [0, 0], "other": [0, 0]}
    replicated = sharded = 0
    ranks = 1
    for p in {id(p): p for p in model.parameters()}.values():
        kind = "nf4" if id(p) in nf4_ids else "trainable" if p.requires_grad else "other"
        total[kind][0] += _nbytes(p)  # a DTensor's numel is the global one
        if isinstance(p, DTensor):
            ranks = max(ranks, p.device_mesh.size())
            total[kind][1] += _nbytes(p.to_local())
            sharded += _nbytes(p)
        else:
            total[kind][1] += _nbytes(p)
            replicated += _nbytes(p)
    replicated += sum(_nbytes(b) for b in {id(b): b for b in model.buffers()}.values())
    # FSDP units: each fully_shard-ed module gathers its own parameters (not a nested unit's), whole.
    units = [m for m in model.modules() if isinstance(m, FSDPModule)]
    own = {}
    for u in units:
        inner = {id(p) for m in u.modules() if m is not u and isinstance(m, FSDPModule) for p in m.parameters()}
        own[id(u)] = sum(_nbytes(p) for p in {id(p): p for p in u.parameters()}.values() if id(p) not in inner)
    leaves = [u for u in units if not any(m is not u and isinstance(m, FSDPModule) for m in u.modules())]
    roots = [u for u in units if u not in leaves]
    stats = ShardingStats(
        ranks=ranks, units=len(units),
        nf4_bytes=total["nf4"][0], nf4_local_bytes=total["nf4"][1],
        trainable_bytes=total["trainable"][0], trainable_local_bytes=total["trainable"][1],
        other_bytes=total["other"][0], other_local_bytes=total["other"][1],
        sharded_bytes=sharded, replicated_bytes=replicated,
        largest_unit_bytes=max((own[id(u)] for u in leaves), default=0),
        root_unit_bytes=sum(own[id(u)] for u in roots),
    )
    if record:
        STORE.set_sharding(stats)
    return stats


def expected_sharding(model: nn.Module, world_size: int, layers: Iterable[nn.Module] | None = None) -> ShardingStats:
    """What :func:`fully_shard_layers_` would leave on rank 0 of `world_size` ranks, computed from an
    unsharded model (one process, any device, the meta device too): every parameter sharded on dim 0
    the way FSDP2 does it (rank 0 holds the first ceil(rows / world_size) rows), the decoder layers
    as units, the root holding the rest; buffers replicated. For :func:`predicted_rank_peak` at 2, 4,
    8 ranks before any of them exist."""
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    nf4_ids = {id(getattr(m, f"weight_{n}")) for m in model.modules() if isinstance(m, NF4Linear) for n in _SHARDED}
    total = {"nf4": [0, 0], "trainable": [0, 0], "other": [0, 0]}
    params = {id(p): p for p in model.parameters()}
    for p in params.values():
        kind = "nf4" if id(p) in nf4_ids else "trainable" if p.requires_grad else "other"
        total[kind][0] += _nbytes(p)
        if p.dim() == 0:
            total[kind][1] += _nbytes(p)
        else:
            rows = -(-p.shape[0] // world_size)
            total[kind][1] += min(rows, p.shape[0]) * (p.numel() // max(p.shape[0], 1)) * p.element_size()
    units = list(decoder_layers(model) if layers is None else layers)
    unit_bytes = [sum(_nbytes(p) for p in {id(p): p for p in u.parameters()}.values()) for u in units]
    everything = sum(_nbytes(p) for p in params.values())
    return ShardingStats(
        ranks=world_size, units=len(units) + 1,
        nf4_bytes=total["nf4"][0], nf4_local_bytes=total["nf4"][1],
        trainable_bytes=total["trainable"][0], trainable_local_bytes=total["trainable"][1],
        other_bytes=total["other"][0], other_local_bytes=total["other"][1],
        sharded_bytes=everything if world_size > 1 else 0,
        replicated_bytes=sum(_nbytes(b) for b in {id(b): b for b in model.buffers()}.values()),
        largest_unit_bytes=max(unit_bytes, default=0),
        root_unit_bytes=everything - sum(unit_bytes),
    )


def predicted_rank_peak(one_process_peak: int, stats: ShardingStats, world_size: int | None = None,
                        prefetch: int = 1) -> int:
    """A rank's predicted peak on `world_size` ranks (default `stats.ranks`) from the peak a single
    process predicts for the same per-rank batch (`lowmem_compile.plan(...).to_dict()["remat"]
    ["predicted_peak_bytes"]`, which holds every weight whole):

        one_process_peak - sharded + sharded / world_size
                         + (1 + prefetch) * largest_unit + root_unit

    where `sharded` is the bytes FSDP2 shards (NF4, trainable and other parameters), the largest
    unit (a decoder layer, unsharded) is gathered for the layer running and `prefetch` more come in
    ahead of it (FSDP2 prefetches the next layer in the backward, and in the forward when told), and
    the root's own parameters (embeddings, norm, LM head) stay gathered through the step
    (FSDP2 does not reshard the root after its forward). The optimizer state, which the plan does not
    count, is sharded the same way: add `2 * 4 * trainable_bytes / world_size / element size` for
    AdamW in fp32 if it matters. This is an estimate on top of the planner's, not a plan."""
    world = stats.ranks if world_size is None else world_size
    if world <= 1:
        return int(one_process_peak)
    sharded = stats.sharded_bytes
    return int(one_process_peak - sharded + sharded / world + (1 + prefetch) * stats.largest_unit_bytes
               + stats.root_unit_bytes)


def trainable_state_dict(model: nn.Module, rank0_only: bool = True) -> dict[str, torch.Tensor]:
    """The trainable parameters as whole CPU tensors, by `state_dict` name. A collective under FSDP2
    (each sharded parameter is all-gathered): every rank must call it. With `rank0_only` the other
    ranks get an empty dict (they took part in the gathers)."""
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor

    out = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        full = p.full_tensor() if isinstance(p, DTensor) else p.detach()
        out[name] = full.cpu()
    if rank0_only and dist.is_initialized() and dist.get_rank() != 0:
        return {}
    return out


def save_adapters(model: nn.Module, path: str, **save_kwargs) -> None:
    """peft's `save_pretrained(path)` of a (sharded) peft model: the adapters gathered whole
    (:func:`trainable_state_dict`, a collective), written by rank 0; the ranks meet at a barrier
    after. `PeftModel.from_pretrained(base, path)` loads them into one process."""
    import torch.distributed as dist

    state = trainable_state_dict(model, rank0_only=True)
    if not dist.is_initialized() or dist.get_rank() == 0:
        model.save_pretrained(path, state_dict=state, **save_kwargs)
    if dist.is_initialized():
        dist.barrier()

