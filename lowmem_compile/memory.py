"""`release_compile_memory()`: give back the device memory a compile left in PyTorch's caching allocator.

The first step of a compiled model compiles its graphs and runs them once: Inductor's and Triton's
autotuning run kernels on scratch copies of their arguments, and the first run allocates blocks of
sizes the later steps never ask for again. The caching allocator keeps every block it ever got from
the driver (measured on an H100, Llama-3-8B at 8192 tokens: 17.2 GiB reserved after the first step,
against an allocated peak of 6.58 GiB), so `nvidia-smi` shows the high-water mark of the compile
and another process on the card cannot use the rest.

Calling `release_compile_memory()` once after the first (compiling) step returns every cached block
no tensor uses to the driver (`torch.cuda.empty_cache()`, after a garbage collection that frees
tensors kept only by reference cycles of compile-time objects) and, by default, resets the peak
statistics so `torch.cuda.max_memory_reserved()` then measures the steps alone. It frees nothing a
tensor holds, so it is always safe; its cost is that the next step asks the driver again for the
blocks it needs (a few milliseconds, once). It cannot release a CUDA graph pool (`cudagraphs=True`)
or blocks that are partly in use (fragmentation: `PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True`
set before the process's first CUDA allocation lets the allocator grow and shrink segments instead).

The backend does this by itself: every graph it compiles for CUDA is wrapped by
`release_after_first_backward`, which calls it once, when the first backward through the graph's
outputs has finished (the backward graph is compiled lazily, at that first backward), or right
after the first call where nothing needs a gradient. `lowmem_compile.trainer.LowmemCallback` calls
it again after a `transformers.Trainer`'s first optimizer step and first evaluation.

What it leaves: on an H100 (Llama-3-8B at 8192, lean options, bench/results/layers/2026-12-07T16/,
call 3) the timed steps still reserved 9.38 GiB for an allocated peak of 7.00. Expandable segments
from the process's start changed that to 9.14 (same call), so fixed-size segments are not what
holds the rest; the backend therefore leaves the allocator's settings to the user.
"""

from __future__ import annotations

import gc
from typing import Any, Callable

import torch
import torch.utils._pytree as pytree

__all__ = ["release_compile_memory", "release_after_first_backward"]


def release_compile_memory(device: torch.device | str | int | None = None, *, reset_peak: bool = True) -> dict:
    """Return the caching allocator's unused blocks on `device` (default: the current CUDA device) to
    the driver; returns {"reserved_before", "reserved_after", "allocated", "released"} in bytes (all
    zero without CUDA). Call it after the first compiled step (or evaluation), not inside one."""
    out = {"reserved_before": 0, "reserved_after": 0, "allocated": 0, "released": 0}
    if not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return out
    device = torch.device("cuda", torch.cuda.current_device()) if device is None else torch.device(device)
    if device.type != "cuda":
        return out
    gc.collect()
    torch.cuda.synchronize(device)
    out["reserved_before"] = torch.cuda.memory_reserved(device)
    with torch.cuda.device(device):
        torch.cuda.empty_cache()
    out["reserved_after"] = torch.cuda.memory_reserved(device)
    out["allocated"] = torch.cuda.memory_allocated(device)
    out["released"] = out["reserved_before"] - out["reserved_after"]
    if reset_peak:
        torch.cuda.reset_peak_memory_stats(device)
    return out


def release_after_first_backward(fn: Callable[..., Any], release: Callable[[], Any] | None = None) -> Callable[..., Any]:
    """`fn` (a compiled graph's callable), which calls `release` (default: `release_compile_memory`
    without resetting the peak statistics, on CUDA only) once: at the end of the first backward pass
    that reaches the outputs of its first call, or right after that call when no output needs a
    gradient (an evaluation). Later calls go straight to `fn`. Keeps Dynamo's `_boxed_call` marker."""
    if release is None:
        if not torch.cuda.is_available():
            return fn

        def release() -> None:
            release_compile_memory(reset_peak=False)

    armed = [True]

    def wrapped(*args: Any, **kwargs: Any) -> Any:
        out = fn(*args, **kwargs)
        if not armed[0]:
            return out
        armed[0] = False
        grads = [t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor) and t.requires_grad]
        if not grads:
            release()
            return out
        queued = [False]

        def hook(grad: torch.Tensor) -> None:
            if not queued[0]:
                queued[0] = True  # runs when the whole backward pass (every graph in it) is done
                torch.autograd.Variable._execution_engine.queue_callback(release)

        for t in grads:
            t.register_hook(hook)
        return out

    if getattr(fn, "_boxed_call", False):
        wrapped._boxed_call = True  # type: ignore[attr-defined]
    return wrapped
