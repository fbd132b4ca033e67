"""Host embedding op: the rows of a frozen embedding table that lives in host memory.

`host_embedding(ids, weight, device)` gathers `weight[ids]` on the host and returns it on `device`.
A frozen table is read only by the forward's lookup, one row a token, so keeping it off the device
costs one small host gather and one copy of the looked-up rows (64 MiB at 8192 tokens of a
4096-wide bf16 table) instead of the table itself (0.98 GiB for Llama-3's 128256 × 4096).

On CUDA the rows are gathered into pinned memory and copied without blocking; the ids come to the
host first (a synchronisation at the start of the forward, when the step has little queued).
No autograd: the table is frozen (`offload_embeddings_` refuses a trainable one).
"""

from __future__ import annotations

import torch

from .library import define_op


def _check(ids: torch.Tensor, weight: torch.Tensor) -> None:
    if weight.device.type != "cpu" or weight.dim() != 2:
        raise ValueError(f"host_embedding: the table must be a 2-D host tensor, got {tuple(weight.shape)} on {weight.device}")
    if ids.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"host_embedding: ids must be int32/int64, got {ids.dtype}")


def _host_embedding(ids: torch.Tensor, weight: torch.Tensor, device: torch.device) -> torch.Tensor:
    _check(ids, weight)
    device = torch.device(device)
    flat = ids.reshape(-1).to("cpu")
    rows = torch.empty((flat.numel(), weight.shape[1]), dtype=weight.dtype, pin_memory=device.type == "cuda")
    torch.index_select(weight, 0, flat, out=rows)
    rows = rows.view(*ids.shape, weight.shape[1])
    if device.type == "cpu":
        return rows
    return rows.to(device, non_blocking=True)


def _host_embedding_fake(ids: torch.Tensor, weight: torch.Tensor, device: torch.device) -> torch.Tensor:
    _check(ids, weight)
    return torch.empty((*ids.shape, weight.shape[1]), dtype=weight.dtype, device=device)


host_embedding = define_op(
    "host_embedding", "(Tensor ids, Tensor weight, Device device) -> Tensor",
    reference=_host_embedding, fake=_host_embedding_fake,
)  # fmt: skip
