"""Our Triton kernels compiled on a thread while Inductor compiles the step.

A Triton kernel compiles on its first launch, in the thread that launches it. Left alone, ours (the
attention forward and backward, NF4 dequantization and matmuls, the fused loss) compile one after
another inside the first step, once Inductor has finished, while Inductor itself spends seconds of
its compile waiting on its worker processes. `start` runs each distinct site of those ops once,
forward and backward, on a thread begun as soon as the passes have placed them: their compiles (and
the attention's tuning) overlap Inductor's, and the first step finds the kernels in Triton's
in-process cache. A compiled kernel depends on the launch's constants and dtypes and on the
divisibility of its sizes and pointers, not on the data, so random values of the site's shapes
serve; graph inputs (the NF4 weights, the labels) are used as they are, detached.

Nothing here can change a result. A site with symbolic sizes, one too large for the free device
memory, or one that fails is left to compile on first use as before (logged). The thread draws its
random values from a generator of its own (the step's random streams are untouched), and
`Warmup.join` waits for it and hands its cached blocks back before the compiled step is returned,
so the warm-up never shares the GPU, or its memory, with a step.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
import torch.fx
from torch.utils import _pytree as pytree

from .ops.library import NAMESPACE
from .passes import example_value
from .passes.layers import placeholders_of
from .report import WarmupStats

log = logging.getLogger(__name__)

#: The ops whose kernels are warmed: those with Triton kernels of their own and no host memory.
WARMED_OPS = ("attention", "nf4_dequantize", "nf4_linear", "linear_cross_entropy")
_WARMED = frozenset(f"{NAMESPACE}::{name}" for name in WARMED_OPS)
#: The most of the device's free memory one site's random tensors may take (with their gradients).
FREE_SHARE = 0.25


@dataclass
class Warmup:
    """The warm-up thread and what it did: `warmed` sites run, `skipped` with why."""

    sites: int
    warmed: int = 0
    seconds: float = 0.0
    skipped: list[str] = field(default_factory=list)
    thread: threading.Thread | None = None

    def join(self) -> WarmupStats:
        """Wait for the thread, return what it cached in the allocator to the device, and say what it did."""
        if self.thread is not None:
            self.thread.join()
            self.thread = None
            torch.cuda.empty_cache()
            log.info("warm-up: %d of %d kernel sites run in %.1f s beside the compile%s", self.warmed, self.sites,
                     self.seconds, f"; left to first use: {'; '.join(self.skipped)}" if self.skipped else "")
        return WarmupStats(sites=self.sites, warmed=self.warmed, seconds=round(self.seconds, 2),
                           skipped=[f"left to compile on first use: {reason}" for reason in self.skipped])


def sites(gm: torch.fx.GraphModule, example_inputs: Sequence[Any]) -> list[tuple[Any, tuple, dict]]:
    """The distinct calls of `WARMED_OPS` in `gm`: (op, args, kwargs) with each node argument
    replaced by its value, the real tensor for a graph input and the fake one otherwise. Calls
    alike in op, constants and tensor metadata (every decoder layer's attention) appear once."""
    real = dict(zip(placeholders_of(gm), example_inputs))
    found: dict[Any, tuple[Any, tuple, dict]] = {}
    for node in gm.graph.nodes:
        target = node.target
        if node.op != "call_function" or op_name(target) not in _WARMED:
            continue
        args, kwargs = torch.fx.node.map_arg((node.args, node.kwargs), lambda n: real[n] if n in real else example_value(n))
        key = (target, tuple(_signature(v) for v in pytree.tree_leaves((args, kwargs))))
        found.setdefault(key, (target, args, kwargs))
    return list(found.values())


def start(gm: torch.fx.GraphModule, example_inputs: Sequence[Any]) -> Warmup | None:
    """Begin warming the kernels of `gm`'s sites on a thread (module docstring); None where there is
    nothing to warm or the graph does not run on CUDA."""
    devices = {x.device for x in example_inputs if isinstance(x, torch.Tensor) and x.is_cuda}
    found = sites(gm, example_inputs)
    if len(devices) != 1 or not found:
        return None
    warmup = Warmup(sites=len(found))
    warmup.thread = threading.Thread(target=_warm, args=(warmup, found, devices.pop()), name="lowmem-warmup", daemon=True)
    warmup.thread.start()
    return warmup


def run_site(op: Any, args: tuple, kwargs: dict, device: torch.device, generator: torch.Generator) -> None:
    """Call `op` once on random values shaped like its fake arguments, then its backward where an
    output requires grad (raises `ValueError` for a site that cannot be materialized)."""

    def materialize(x: Any) -> Any:
        if not isinstance(x, torch.Tensor):
            return x
        if not isinstance(x, torch._subclasses.FakeTensor):
            return x.detach()
        if not all(isinstance(d, int) for d in (*x.shape, *x.stride())):
            raise ValueError("symbolic sizes")
        value = torch.empty_strided(x.shape, x.stride(), dtype=x.dtype, device=device)
        if value.is_floating_point():
            value.normal_(0.0, 0.5, generator=generator)
            return value.requires_grad_(x.requires_grad)
        if value.dtype == torch.uint8:  # packed 4-bit codes: every byte is a valid pair
            return value.random_(0, 256, generator=generator)
        return value.zero_()  # indices and bounds: 0 is in range everywhere

    args, kwargs = pytree.tree_map(materialize, (args, kwargs))
    with torch.enable_grad():
        outputs = [o for o in pytree.tree_leaves(op(*args, **kwargs)) if isinstance(o, torch.Tensor) and o.requires_grad]
        if outputs:
            grads = [torch.empty_like(o).normal_(generator=generator) for o in outputs]
            torch.autograd.backward(outputs, grads)


def _warm(warmup: Warmup, found: list[tuple[Any, tuple, dict]], device: torch.device) -> None:
    start = time.perf_counter()
    try:
        _warm_sites(warmup, found, device)
    except Exception as exc:  # noqa: BLE001  (the thread's failure leaves the rest to first use)
        warmup.skipped.append(f"stopped: {type(exc).__name__}: {exc}"[:200])
    warmup.seconds = time.perf_counter() - start


def _warm_sites(warmup: Warmup, found: list[tuple[Any, tuple, dict]], device: torch.device) -> None:
    generator = torch.Generator(device).manual_seed(0)
    with torch.cuda.device(device):
        for op, args, kwargs in found:
            name = op_name(op)
            need = 3 * sum(x.numel() * x.element_size() for x in pytree.tree_leaves((args, kwargs))
                           if isinstance(x, torch._subclasses.FakeTensor) and all(isinstance(d, int) for d in x.shape))
            if need > FREE_SHARE * torch.cuda.mem_get_info(device)[0]:
                warmup.skipped.append(f"{name}: {need / 2**30:.2f} GiB of example values, over {FREE_SHARE:.0%} of the free memory")
                continue
            try:
                run_site(op, args, kwargs, device, generator)
                warmup.warmed += 1
            except Exception as exc:  # noqa: BLE001  (a site not warmed compiles on first use, as without this)
                warmup.skipped.append(f"{name}: {type(exc).__name__}: {exc}"[:200])
        torch.cuda.synchronize(device)


def op_name(target: Any) -> str | None:
    """The op's qualified name ("lowmem::attention"), whether the graph calls an overload or the
    packet (as some passes insert it); None for anything else."""
    if isinstance(target, torch._ops.OpOverload):
        return target._schema.name
    if isinstance(target, torch._ops.OpOverloadPacket):
        return target._qualified_op_name
    return None


def _signature(value: Any) -> Any:
    """What a compiled kernel can depend on in one argument: a tensor's metadata, else the value."""
    if isinstance(value, torch.Tensor):
        return (tuple(map(str, value.shape)), tuple(map(str, value.stride())), value.dtype, value.device,
                value.requires_grad)
    return value if isinstance(value, (int, float, bool, str, type(None), torch.dtype)) else repr(value)
