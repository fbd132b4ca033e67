"""`offload_embeddings_(model)`: keep frozen embedding tables in host memory, in place.

Each selected `nn.Embedding` is swapped for a :class:`HostEmbedding` whose table is a pinned host
buffer (same name, `weight`, so `state_dict` keys do not change) and whose forward calls
`torch.ops.lowmem.host_embedding`: the looked-up rows are gathered on the host and copied to the
device the table was on. Exact (the same rows), for a table only the lookup reads. A scaled
embedding (an `nn.Embedding` subclass whose forward is the lookup times a constant `embed_scale`,
as Gemma's multiplies by √hidden) moves too, with its scale applied on the device the same way
(rows · embed_scale in the table's dtype: the same values); the form is checked by running the
module's own forward on a few ids, not by its class name. Left alone, with the reason in the
returned dict: trainable tables, tables shared with another module (an LM head tied to its
embedding reads the whole table every step, so it must stay on the device: Gemma, Gemma 2 and
Gemma 3 checkpoints tie theirs), `max_norm` (it rewrites the table), and other subclasses that
change the forward.

Call it after moving the model to its device: `model.to(device)` would move the table back.
"""

from __future__ import annotations

import fnmatch
from typing import Iterable

import torch
from torch import nn

from .ops import host_embedding as _host_embedding_op  # noqa: F401  (registers torch.ops.lowmem.host_embedding)


class HostEmbedding(nn.Module):
    """A frozen embedding table in (pinned) host memory; lookups arrive on `device`."""

    def __init__(self, weight: torch.Tensor, device: torch.device, embed_scale: torch.Tensor | None = None) -> None:
        super().__init__()
        host = weight.detach().to("cpu")
        self.register_buffer("weight", host.pin_memory() if device.type == "cuda" else host.clone())
        # the scale of a scaled embedding, in the table's dtype on the lookup's device (not saved,
        # like the modules it replaces keep it)
        self.register_buffer("embed_scale", embed_scale, persistent=False)
        self.device = device
        self.num_embeddings, self.embedding_dim = weight.shape

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        rows = torch.ops.lowmem.host_embedding(ids, self.weight, self.device)
        return rows if self.embed_scale is None else rows * self.embed_scale

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, host table, lookups on {self.device}"


def _why_not(module: nn.Embedding, shared: bool) -> str | None:
    if module.weight.requires_grad:
        return "trainable"
    if shared:
        return "its table is shared with another module (tied weights: the LM head reads all of it every step)"
    if module.max_norm is not None:
        return "max_norm rewrites the table"
    return None


def _scale_of(module: nn.Embedding) -> tuple[torch.Tensor | None, str | None]:
    """(embed_scale in the table's dtype, None) for a plain lookup (scale None) or a scaled one, whose
    own forward must equal `lookup · embed_scale` bit for bit on a spread of ids; (None, reason) else."""
    if type(module).forward is nn.Embedding.forward:
        return None, None
    name = type(module).__name__
    scale = getattr(module, "embed_scale", None)
    if not (isinstance(scale, (int, float)) or (torch.is_tensor(scale) and scale.numel() == 1)):
        return None, f"{name} changes the embedding's forward (not a lookup times a constant embed_scale)"
    weight = module.weight
    scale = torch.as_tensor(scale, device=weight.device).reshape(()).to(weight.dtype)
    ids = torch.arange(0, module.num_embeddings, max(1, module.num_embeddings // 16), device=weight.device)
    with torch.no_grad():
        same = torch.equal(module(ids), nn.functional.embedding(ids, weight, module.padding_idx) * scale)
    if not same:
        return None, f"{name}'s forward is not its lookup times embed_scale"
    return scale.clone(), None


def offload_embeddings_(model: nn.Module, *, exclude: Iterable[str] = ()) -> dict:
    """Move the tables of frozen `nn.Embedding` modules of `model` to host memory, in place.

    `exclude`: glob patterns of module names left alone. Returns {"moved": [names], "bytes": device
    bytes freed, "skipped": {name: reason}}.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"offload_embeddings_ takes an nn.Module, got {type(model).__name__}")
    owners: dict[int, int] = {}
    for module in model.modules():
        for p in module.parameters(recurse=False):
            owners[id(p)] = owners.get(id(p), 0) + 1
    moved, skipped, freed = [], {}, 0
    for name, module in list(model.named_modules()):
        if not name or not isinstance(module, nn.Embedding) or any(fnmatch.fnmatchcase(name, p) for p in exclude):
            continue
        reason = _why_not(module, owners.get(id(module.weight), 0) > 1)
        scale, reason = (None, reason) if reason is not None else _scale_of(module)
        if reason is not None:
            skipped[name] = reason
            continue
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        weight = module.weight
        setattr(parent, child, HostEmbedding(weight, weight.device, scale))
        if weight.device.type != "cpu":
            freed += weight.numel() * weight.element_size()
        moved.append(name)
    return {"moved": moved, "bytes": freed, "skipped": skipped}
