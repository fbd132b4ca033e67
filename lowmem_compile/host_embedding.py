"""`offload_embeddings_(model)`: keep frozen embedding tables in host memory, in place.

Each selected `nn.Embedding` is swapped for a :class:`HostEmbedding` whose table is a pinned host
buffer (same name, `weight`, so `state_dict` keys do not change) and whose forward calls
`torch.ops.lowmem.host_embedding`: the looked-up rows are gathered on the host and copied to the
device the table was on. Exact (the same rows), for a table only the lookup reads. Left alone, with
the reason in the returned dict: trainable tables, tables shared with another module (an LM head tied
to its embedding still needs the table on the device), `max_norm` (it rewrites the table), and
embedding subclasses that change the forward (e.g. a scaled embedding).

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

    def __init__(self, weight: torch.Tensor, device: torch.device) -> None:
        super().__init__()
        host = weight.detach().to("cpu")
        self.register_buffer("weight", host.pin_memory() if device.type == "cuda" else host.clone())
        self.device = device
        self.num_embeddings, self.embedding_dim = weight.shape

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return torch.ops.lowmem.host_embedding(ids, self.weight, self.device)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, host table, lookups on {self.device}"


def _why_not(module: nn.Embedding, shared: bool) -> str | None:
    if type(module).forward is not nn.Embedding.forward:
        return f"{type(module).__name__} changes the embedding's forward"
    if module.weight.requires_grad:
        return "trainable"
    if shared:
        return "its table is shared with another module (tied weights)"
    if module.max_norm is not None:
        return "max_norm rewrites the table"
    return None


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
        if reason is not None:
            skipped[name] = reason
            continue
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        weight = module.weight
        setattr(parent, child, HostEmbedding(weight, weight.device))
        if weight.device.type != "cpu":
            freed += weight.numel() * weight.element_size()
        moved.append(name)
    return {"moved": moved, "bytes": freed, "skipped": skipped}
