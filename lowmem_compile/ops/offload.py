"""Offload ops: a saved activation parked in host memory between the forward and the backward.

`offload(x)` returns a host copy of `x`. In the backward, `prefetch(host, device)` starts the copy
back and returns a ticket (an empty tensor), and `reload(host, device, ticket)` returns the device
copy: the pass puts the prefetch ahead of the reload by about the copy's time on its time model,
so the copy runs while the backward computes. `reload` without a ticket copies on the spot. The partitioner inserts all three after it
has split the step (`passes/offload.py`), so they need no autograd.

On CUDA the copies run on one side stream per device, so neither the forward nor the backward
waits for a copy it does not need yet:
* `offload` orders the side stream after the work that produced `x`, copies into pinned memory
  there, and marks `x` as used by the side stream (the caching allocator then does not hand its
  memory out again until the copy is done). The pinned block goes back to PyTorch's host allocator,
  which records the copy's event and does not reuse the block before it completes.
* `prefetch` allocates the device copy on the current stream (so it is ordered like any other
  allocation there), makes the side stream wait for the current one (the block may have been freed
  by work still queued), copies, and records an event. `reload` makes the current stream wait for
  that event only, not for copies prefetched after it. The device copy travels from `prefetch` to
  `reload` in a table keyed by the host tensor's id; the entry leaves when the host tensor dies, so
  a key cannot be reused while it exists; a `reload` whose entry is missing copies synchronously.
`prefetch(host, device, ahead)` with `ahead > 0` also starts the copy back of the host tensor parked
`ahead` offloads before `host` (the same value of the layer before, when one compiled layer body
parks `ahead` values a call): the previous layer's values travel while this layer's backward runs,
as they would with the whole step in one graph. Offloads are remembered in order (weakly) for this.
On other devices all of these are plain copies (the reference behaviour every path must match).

Page-locking host memory is slow (2.0 GiB/s on an H100 host), and a parked step asks for all its
pinned blocks in its first run: Llama-3-8B's lean step parks 10.1 GiB at 8192 tokens and 32 GiB at
131072, seconds of that step (bench/results/layers/2026-12-07T22/). `pin_ahead` allocates blocks of
the sizes a plan will park on a thread while the rest of the step compiles, and `settle_pinned`
hands them to PyTorch's host allocator before the step runs; its cache serves the step's requests of
the same sizes (it rounds every size up to a power of two).
"""

from __future__ import annotations

import logging
import threading
import time
import weakref
from typing import Sequence

import torch

from .library import define_op

log = logging.getLogger(__name__)

_STREAMS: dict[int, torch.cuda.Stream] = {}
_PARKED: list[weakref.ref] = []
"""The host copies `offload` made, in order, while they live (a call's lookahead finds the values of
the call before it here)."""
_PREFETCHED: dict[int, tuple[weakref.ref, torch.Tensor, torch.cuda.Event | None]] = {}
"""id(host) -> (a weak reference to host, its device copy, the copy's event on CUDA). An entry
leaves with its reload, or with its host tensor when no reload came (a backward that raised), so
a failed step leaves no device copy behind."""


def _copy_stream(device: torch.device) -> torch.cuda.Stream:
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _STREAMS:
        _STREAMS[index] = torch.cuda.Stream(device=index)
    return _STREAMS[index]


class _PinAhead(threading.Thread):
    """Pinned host blocks allocated on a thread of their own, kept until `settle_pinned`."""

    def __init__(self, sizes: Sequence[int], device: torch.device) -> None:
        super().__init__(name="lowmem-pin-ahead", daemon=True)
        self.sizes, self.device = list(sizes), device
        self.blocks: list[torch.Tensor] = []
        self.seconds = 0.0
        self.error: str | None = None

    def run(self) -> None:
        start = time.perf_counter()
        try:
            with torch.cuda.device(self.device):
                for size in self.sizes:
                    self.blocks.append(torch.empty(size, dtype=torch.uint8, pin_memory=True))
        except RuntimeError as exc:  # out of pinnable memory: the step pins the rest itself, as without this
            self.error = f"{type(exc).__name__}: {exc}"[:200]
        self.seconds = time.perf_counter() - start


_PIN_AHEAD: list[_PinAhead] = []


def pin_ahead(sizes: Sequence[int], device: torch.device) -> None:
    """Start pinning host blocks of `sizes` bytes for a plan that parks values of those sizes on
    `device` (module docstring). Nothing to do off CUDA."""
    if device.type != "cuda" or not sizes:
        return
    thread = _PinAhead(sizes, device)
    _PIN_AHEAD.append(thread)
    thread.start()


def settle_pinned() -> tuple[int, float]:
    """Wait for every `pin_ahead` thread and free its blocks into the host allocator's cache, where
    the step's first offloads find them; returns the bytes pinned and the threads' seconds."""
    pinned, seconds = 0, 0.0
    while _PIN_AHEAD:
        thread = _PIN_AHEAD.pop()
        thread.join()
        pinned += sum(block.numel() for block in thread.blocks)
        seconds += thread.seconds
        if thread.error is not None:
            log.warning("offload: pinning host memory ahead stopped after %.2f GiB (%s); the first step pins the rest",
                        pinned / 2**30, thread.error)
        thread.blocks.clear()
    return pinned, seconds


def _offload(x: torch.Tensor) -> torch.Tensor:
    host = torch.empty(x.shape, dtype=x.dtype, pin_memory=x.device.type == "cuda")
    while _PARKED and _PARKED[0]() is None:
        _PARKED.pop(0)
    _PARKED.append(weakref.ref(host))
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


def _check_host(host: torch.Tensor, op: str) -> None:
    if host.device.type != "cpu":
        raise ValueError(f"{op}: expected a host tensor from offload, got one on {host.device}")


def _start_copy(host: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, torch.cuda.Event | None]:
    """The device copy of `host`, and on CUDA the event that marks its side-stream copy done."""
    if device.type != "cuda":
        return host.to(device, copy=True), None
    out = torch.empty(host.shape, dtype=host.dtype, device=device)
    stream = _copy_stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))  # `out` may reuse memory freed by queued work
    with torch.cuda.stream(stream):
        out.copy_(host, non_blocking=True)
        done = torch.cuda.Event()
        done.record(stream)
    return out, done


def _prefetch(host: torch.Tensor, device: torch.device, ahead: int = 0) -> torch.Tensor:
    _check_host(host, "prefetch")
    device = torch.device(device)
    _start_prefetch(host, device)
    if ahead > 0:
        index = next((i for i in range(len(_PARKED) - 1, -1, -1) if _PARKED[i]() is host), None)
        earlier = _PARKED[index - ahead]() if index is not None and index >= ahead else None
        if earlier is not None:
            _start_prefetch(earlier, device)
    return torch.empty(0, dtype=host.dtype, device=device)


def _start_prefetch(host: torch.Tensor, device: torch.device) -> None:
    """Start the copy back of `host` unless it is already under way."""
    key = id(host)
    entry = _PREFETCHED.get(key)
    if entry is not None and entry[0]() is host:
        return
    out, done = _start_copy(host, device)
    _PREFETCHED[key] = (weakref.ref(host, lambda _: _PREFETCHED.pop(key, None)), out, done)


def _prefetch_fake(host: torch.Tensor, device: torch.device, ahead: int = 0) -> torch.Tensor:
    _check_host(host, "prefetch")
    return torch.empty(0, dtype=host.dtype, device=device)


def _reload(host: torch.Tensor, device: torch.device, ticket: torch.Tensor | None = None) -> torch.Tensor:
    _check_host(host, "reload")
    device = torch.device(device)
    entry = _PREFETCHED.pop(id(host), None) if ticket is not None else None
    if entry is not None and entry[0]() is host:
        _, out, done = entry
    else:
        out, done = _start_copy(host, device)
    if done is not None:
        torch.cuda.current_stream(device).wait_event(done)
    return out


def _reload_fake(host: torch.Tensor, device: torch.device, ticket: torch.Tensor | None = None) -> torch.Tensor:
    _check_host(host, "reload")
    return torch.empty(host.shape, dtype=host.dtype, device=device)


offload = define_op("offload", "(Tensor x) -> Tensor", reference=_offload, fake=_offload_fake)
prefetch = define_op(
    "prefetch", "(Tensor host, Device device, int ahead=0) -> Tensor", reference=_prefetch, fake=_prefetch_fake
)
reload = define_op(
    "reload", "(Tensor host, Device device, Tensor? ticket=None) -> Tensor", reference=_reload, fake=_reload_fake
)
