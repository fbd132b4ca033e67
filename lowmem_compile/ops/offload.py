"""Offload ops: a saved activation parked in host memory between the forward and the backward.

`offload(x)` returns a host copy of `x`; `reload(host, device)` returns a device copy of it. The
partitioner inserts them after it has split the step (`passes/offload.py`), so they need no autograd.

On CUDA the copies run on one side stream per device, so the forward never waits for a
device-to-host copy: `offload` orders the side stream after the work that produced `x`, copies into
pinned memory there, and marks `x` as used by the side stream (the caching allocator then does not
hand its memory out again until the copy is done). The host tensor is only ever read by `reload`,
which copies on the same side stream (so after the offload finished) and makes the current stream
wait for it before returning. The pinned block is returned to PyTorch's host allocator, which
records the copy's event and does not reuse the block before it completes.
On other devices both are plain copies (the reference behaviour every path must match).
"""

from __future__ import annotations

import torch

from .library import define_op

_STREAMS: dict[int, torch.cuda.Stream] = {}


def _copy_stream(device: torch.device) -> torch.cuda.Stream:
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _STREAMS:
        _STREAMS[index] = torch.cuda.Stream(device=index)
    return _STREAMS[index]


def _offload(x: torch.Tensor) -> torch.Tensor:
    host = torch.empty(x.shape, dtype=x.dtype, pin_memory=x.device.type == "cuda")
    if x.device.type != "cuda":
        return host.copy_(x)
    stream = _copy_stream(x.device)
    stream.wait_stream(torch.cuda.current_stream(x.device))
    with torch.cuda.stream(stream):
        host.copy_(x, non_blocking=True)
    x.record_stream(stream)
    return host


def _offload_fake(x: torch.Tensor) -> torch.Tensor:
    return torch.empty(x.shape, dtype=x.dtype, device="cpu")


def _check_host(host: torch.Tensor) -> None:
    if host.device.type != "cpu":
        raise ValueError(f"reload: expected a host tensor from offload, got one on {host.device}")


def _reload(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    _check_host(host)
    device = torch.device(device)
    if device.type != "cuda":
        return host.to(device, copy=True)
    out = torch.empty(host.shape, dtype=host.dtype, device=device)
    stream = _copy_stream(device)
    current = torch.cuda.current_stream(device)
    stream.wait_stream(current)  # `out` may reuse memory the current stream freed moments ago
    with torch.cuda.stream(stream):
        out.copy_(host, non_blocking=True)
    current.wait_stream(stream)
    return out


def _reload_fake(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    _check_host(host)
    return torch.empty(host.shape, dtype=host.dtype, device=device)


offload = define_op("offload", "(Tensor x) -> Tensor", reference=_offload, fake=_offload_fake)
reload = define_op("reload", "(Tensor host, Device device) -> Tensor", reference=_reload, fake=_reload_fake)
