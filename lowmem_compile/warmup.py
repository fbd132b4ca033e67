"""Our Triton kernels compiled while Inductor compiles the step: on a thread, or in worker processes.

A Triton kernel compiles on its first launch, in the thread that launches it. Left alone, ours (the
attention forward and backward, NF4 dequantization and matmuls, the fused loss) compile one after
another inside the first step, once Inductor has finished, while Inductor itself spends seconds of
its compile waiting on its worker processes. `start` runs each distinct site of those ops once,
forward and backward, as soon as the passes have placed them, so their compiles (and the
attention's tuning) overlap Inductor's. A compiled kernel depends on the launch's constants and
dtypes and on the divisibility of its sizes and pointers, not on the data, so random values of the
site's shapes serve.

Two ways (option `warmup`):

- "thread": one thread of the training process runs the sites one after another; graph inputs (the
  NF4 weights, the labels) are used as they are, detached, and the first step finds the kernels in
  Triton's in-process cache. A Triton compile holds the GIL for most of its time (the Python
  frontend, the MLIR passes through pybind; only ptxas is a subprocess), so the thread's compiles
  run one at a time and slow Inductor's compile on the main thread: on an H100 (Llama-3-8B, one
  layer body) the warm-up, 9 compiles and tuning, ended with the compile it was meant to hide.
- "processes": up to `MAX_WORKERS` worker processes each run a share of the sites, in parallel and
  off the training process's GIL. A worker is a fresh interpreter (`subprocess`, never `fork`: the
  parent has initialised CUDA; nor `multiprocessing`'s spawn, which re-runs the training script's
  top level in each child). It gets its sites as metadata (`describe`: op name, each tensor's
  shape, stride, dtype, requires_grad), graph inputs included (random values of the same metadata
  compile the same kernels), and the parent's `sys.path`, environment and device index. Its
  kernels reach the training process through Triton's on-disk cache (`TRITON_CACHE_DIR`, keyed by
  source, signature, specialization and options) and the attention's tunings through the
  autotuners' `cache_results` files beside them: the first step loads them instead of compiling.
  The price: a CUDA context per worker (~0.5 GiB of device memory, `CONTEXT_BYTES`) while they
  run, and each worker's start-up (interpreter, imports, context: ~2-4 s) before its first compile.
  Not yet measured on a GPU, so "thread" stays the default.

Nothing here can change a result or fail the compile. A site with symbolic sizes, one too large for
the free memory (`FREE_SHARE`), one that fails, or one whose worker does not start, crashes or
outlives `WORKER_TIMEOUT_S` is left to compile on first use as before (in the report's `skipped`).
Where the workers' contexts and values do not fit, the thread runs instead. The random values come
from generators of the warm-up's own (the step's random streams are untouched), and `Warmup.join`
waits for the thread (handing its cached blocks back) or for the workers to exit before the compiled
step is returned, so the warm-up never shares the GPU, or its memory, with a step.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import pickle
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

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
#: The devices whose graphs are warmed: where our kernels compile (tests add "cpu", where Triton's
#: interpreter runs them, to drive the mechanism).
DEVICE_TYPES = ("cuda",)
#: The most of the device's free memory the warm-up's random tensors (with their gradients) may take:
#: one site's on the thread; the workers' contexts and their largest sites together.
FREE_SHARE = 0.25
#: At most this many worker processes: each holds a CUDA context and takes a core from Inductor's.
MAX_WORKERS = 4
#: Device memory one worker's CUDA context takes.
CONTEXT_BYTES = 2**29
#: Workers still running this long after the warm-up began are killed, their sites left to first use.
WORKER_TIMEOUT_S = 300.0
#: A worker's program: the parent's import path first, then `_serve`.
_BOOT = ("import pickle, sys\n"
         "with open(sys.argv[1] + '.in', 'rb') as f:\n"
         "    sys.path[:] = pickle.load(f)\n"
         "from lowmem_compile.warmup import _serve\n"
         "_serve(sys.argv[1])\n")


@dataclass(frozen=True)
class TensorSpec:
    """A tensor argument as a worker receives it: what `run_site` rebuilds random values from (a
    dataclass, not a named tuple, which pytree would take apart)."""

    shape: tuple[int, ...]
    stride: tuple[int, ...]
    dtype: torch.dtype
    requires_grad: bool


@dataclass
class _Worker:
    """A worker process, the names of its sites (in the order it runs them), and the common path of
    its files: `.in` what it runs, `.out` what it did, `.log` what it printed."""

    process: subprocess.Popen
    names: list[str]
    path: str

    def end(self, deadline: float) -> str | None:
        """Wait for the process until `deadline` (`time.time()`), killing it then; why it ended
        badly, or None."""
        try:
            code = self.process.wait(timeout=max(0.0, deadline - time.time()))
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            return f"worker timed out, {WORKER_TIMEOUT_S:g} s after the warm-up began"
        if code == 0:
            return None
        lines = []
        with contextlib.suppress(OSError), open(self.path + ".log", errors="replace") as f:
            lines = [line.strip() for line in f if line.strip()]
        return f"worker exited with code {code}" + (f": {lines[-1]}" if lines else "")

    def messages(self) -> list[tuple]:
        """What the worker wrote, up to a record a crash cut short."""
        found: list[tuple] = []
        with contextlib.suppress(FileNotFoundError), open(self.path + ".out", "rb") as f:
            while True:
                try:
                    found.append(pickle.load(f))
                except Exception:  # noqa: BLE001  (the end, or a record cut short)
                    break
        return found


@dataclass
class Warmup:
    """The warm-up under way and what it did: `warmed` sites run, `skipped` with why."""

    sites: int
    warmed: int = 0
    seconds: float = 0.0
    skipped: list[str] = field(default_factory=list)
    mode: str = "thread"
    thread: threading.Thread | None = None
    workers: list[_Worker] = field(default_factory=list)
    started: float = 0.0  # time.time() when the workers were started
    startup_seconds: float = 0.0  # from then until the slowest worker was ready to run its first site
    directory: str | None = None  # the workers' files

    def join(self) -> WarmupStats:
        """Wait for the thread (and return what it cached in the allocator to the device) or for
        the workers, and say what was done."""
        if self.thread is not None:
            self.thread.join()
            self.thread = None
            torch.cuda.empty_cache()
            self._log("beside the compile")
        if self.directory is not None:
            for worker in self.workers:
                self._reap(worker)
            shutil.rmtree(self.directory, ignore_errors=True)
            self.directory = None
            self._log(f"in {len(self.workers)} worker processes (the last ready after {self.startup_seconds:.1f} s)")
        return WarmupStats(sites=self.sites, warmed=self.warmed, seconds=round(self.seconds, 2),
                           skipped=[f"left to compile on first use: {reason}" for reason in self.skipped],
                           mode=self.mode, workers=len(self.workers), startup_seconds=round(self.startup_seconds, 2))

    def record(self, name: str, error: str | None) -> None:
        """File one site's outcome: None, run; else why not."""
        if error is None:
            self.warmed += 1
        else:
            self.skipped.append(f"{name}: {error}")

    def _reap(self, worker: _Worker) -> None:
        """Wait for `worker`, then file what it did: each site's outcome, or why it was not run."""
        why = worker.end(self.started + WORKER_TIMEOUT_S)
        outcomes: dict[int, str | None] = {}
        ended = time.time() - self.started
        for key, value in worker.messages():
            if key == "ready":
                self.startup_seconds = max(self.startup_seconds, value)
            elif key == "done":
                ended = value
            else:
                outcomes[key] = value
        self.seconds = max(self.seconds, ended)
        for i, name in enumerate(worker.names):
            self.record(name, outcomes[i] if i in outcomes else f"not run: {why or 'the worker stopped'}"[:300])

    def _log(self, where: str) -> None:
        log.info("warm-up: %d of %d kernel sites run in %.1f s %s%s", self.warmed, self.sites, self.seconds, where,
                 f"; left to first use: {'; '.join(self.skipped)}" if self.skipped else "")


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


def start(gm: torch.fx.GraphModule, example_inputs: Sequence[Any], mode: str = "thread") -> Warmup | None:
    """Begin warming the kernels of `gm`'s sites: in worker processes where `mode` is "processes"
    and they fit, else on a thread (module docstring); None where there is nothing to warm or the
    graph runs on no device of `DEVICE_TYPES`."""
    devices = {x.device for x in example_inputs if isinstance(x, torch.Tensor) and x.device.type in DEVICE_TYPES}
    found = sites(gm, example_inputs)
    if len(devices) != 1 or not found:
        return None
    device = devices.pop()
    free = _free_bytes(device)
    if mode == "processes":
        try:
            warmup = _start_workers(found, device, free)
        except Exception as exc:  # noqa: BLE001  (before any worker starts: the thread runs instead)
            log.warning("warm-up: no worker processes (%s: %s); on a thread instead", type(exc).__name__, exc)
            warmup = None
        if warmup is not None:
            return warmup
    kept, skipped = _sized(found, free, describe_them=False)
    warmup = Warmup(sites=len(found), skipped=skipped)
    warmup.thread = threading.Thread(target=_warm, args=(warmup, [site for _, site in kept], device),
                                     name="lowmem-warmup", daemon=True)
    warmup.thread.start()
    return warmup


def describe(args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """`args` and `kwargs` for a worker process: every tensor, fake or real, replaced by its
    `TensorSpec`. A worker's values are all its own, so a real one requiring grad keeps it (the
    thread runs real tensors detached, to leave the model's gradients alone)."""
    return pytree.tree_map(lambda x: _spec(x, x.requires_grad) if isinstance(x, torch.Tensor) else x, (args, kwargs))


def run_site(op: Any, args: tuple, kwargs: dict, device: torch.device, generator: torch.Generator) -> None:
    """Call `op` once on random values shaped like its fake arguments or `TensorSpec`s (real
    tensors as they are, detached), then its backward where an output requires grad (raises
    `ValueError` for a site that cannot be materialized)."""

    def materialize(x: Any) -> Any:
        if isinstance(x, torch.Tensor) and not _is_fake(x):
            return x.detach()
        if isinstance(x, torch.Tensor):
            x = _spec(x, x.requires_grad)
        if not isinstance(x, TensorSpec):
            return x
        value = torch.empty_strided(x.shape, x.stride, dtype=x.dtype, device=device)
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


def _run_sites(found: list[tuple[Any, tuple, dict]], device: torch.device) -> Iterator[str | None]:
    """Run each site in turn, yielding None for one run, else why it failed. Each draws from a
    generator of its own, seeded alike: its values do not depend on where, or after what, it runs."""
    with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
        for op, args, kwargs in found:
            try:
                run_site(op, args, kwargs, device, torch.Generator(device).manual_seed(0))
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
            except Exception as exc:  # noqa: BLE001  (a site not warmed compiles on first use, as without this)
                yield f"{type(exc).__name__}: {exc}"[:200]
            else:
                yield None


def _warm(warmup: Warmup, found: list[tuple[Any, tuple, dict]], device: torch.device) -> None:
    """The thread's body."""
    start = time.perf_counter()
    try:
        for (op, _, _), error in zip(found, _run_sites(found, device)):
            warmup.record(op_name(op), error)
    except Exception as exc:  # noqa: BLE001  (the thread's failure leaves the rest to first use)
        warmup.skipped.append(f"stopped: {type(exc).__name__}: {exc}"[:200])
    warmup.seconds = time.perf_counter() - start


def _start_workers(found: list[tuple[Any, tuple, dict]], device: torch.device, free: int) -> Warmup | None:
    """Start worker processes on shares of `found`'s sites; None where their contexts and largest
    sites together take more than `FREE_SHARE` of the `free` bytes (the thread runs instead)."""
    kept, skipped = _sized(found, free, describe_them=True)
    count = min(len(kept), MAX_WORKERS, _cores())
    shares = [kept[k::count] for k in range(count)]
    need = count * CONTEXT_BYTES + sum(max(size for size, _ in share) for share in shares)
    if need > FREE_SHARE * free:
        log.info("warm-up: %d worker processes would take %.2f GiB, over %.0f%% of the free memory; "
                 "on a thread instead", count, need / 2**30, 100 * FREE_SHARE)
        return None
    _share_triton_cache(device)
    warmup = Warmup(sites=len(found), skipped=skipped, mode="processes", started=time.time(),
                    directory=tempfile.mkdtemp(prefix="lowmem-warmup-"))
    for k, share in enumerate(shares):
        path = os.path.join(warmup.directory, str(k))
        names = [op_name(op) for _, (op, _, _) in share]
        try:
            with open(path + ".in", "wb") as f:
                pickle.dump(sys.path, f)
                pickle.dump((str(device), warmup.started, [(_qualname(op), a, kw) for _, (op, a, kw) in share]), f)
            with open(path + ".log", "wb") as printed:  # the child inherits the environment as it is now
                process = subprocess.Popen([sys.executable, "-c", _BOOT, path], stdin=subprocess.DEVNULL,
                                           stdout=printed, stderr=subprocess.STDOUT)
        except Exception as exc:  # noqa: BLE001  (its sites compile on first use)
            warmup.skipped += [f"{name}: worker did not start: {type(exc).__name__}: {exc}"[:300] for name in names]
            continue
        warmup.workers.append(_Worker(process, names, path))
    return warmup


def _serve(path: str) -> None:
    """A worker's body (`_BOOT` calls it): run the sites of `path`.in, appending to `path`.out when
    it is ready, each site's outcome as it ends, and when it is done (seconds since the warm-up began)."""
    from torch._library.utils import lookup_op

    with open(path + ".in", "rb") as f:
        pickle.load(f)  # the import path, set by _BOOT
        device, started, described = pickle.load(f)
    found = [(lookup_op(name), args, kwargs) for name, args, kwargs in described]
    with open(path + ".out", "ab", buffering=0) as out:
        pickle.dump(("ready", time.time() - started), out)
        for i, error in enumerate(_run_sites(found, torch.device(device))):
            pickle.dump((i, error), out)
        pickle.dump(("done", time.time() - started), out)


def _sized(found: list[tuple[Any, tuple, dict]], free: int, describe_them: bool) -> tuple[list, list[str]]:
    """The sites whose random values (3x: with their gradients and outputs) fit `FREE_SHARE` of
    `free` bytes, as (bytes, site), described for a worker where asked; and why the others were left."""
    kept, skipped = [], []
    for op, args, kwargs in found:
        try:
            if describe_them:
                args, kwargs = describe(args, kwargs)
            leaves = pytree.tree_leaves((args, kwargs))
            size = 3 * sum(_nbytes(x) for x in leaves if isinstance(x, TensorSpec) or _is_fake(x))
        except ValueError as exc:
            skipped.append(f"{op_name(op)}: {exc}")
            continue
        if size > FREE_SHARE * free:
            skipped.append(f"{op_name(op)}: {size / 2**30:.2f} GiB of example values, "
                           f"over {FREE_SHARE:.0%} of the free memory")
            continue
        kept.append((size, (op, args, kwargs)))
    return kept, skipped


def _spec(x: torch.Tensor, requires_grad: bool) -> TensorSpec:
    if not all(isinstance(d, int) for d in (*x.shape, *x.stride())):
        raise ValueError("symbolic sizes")
    return TensorSpec(tuple(x.shape), tuple(x.stride()), x.dtype, requires_grad)


def _nbytes(x: TensorSpec | torch.Tensor) -> int:
    spec = x if isinstance(x, TensorSpec) else _spec(x, False)
    return math.prod(spec.shape) * spec.dtype.itemsize


def _is_fake(x: Any) -> bool:
    return isinstance(x, torch._subclasses.FakeTensor)


def _free_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _share_triton_cache(device: torch.device) -> None:
    """Set TRITON_CACHE_DIR, where unset, to the directory Inductor sets it to when the training
    process loads its first Triton kernel (`CachingAutotuner.__init__`, torch/_inductor/runtime/
    triton_heuristics.py), which is after the workers start: they then write where our kernels'
    first launches there will look."""
    if device.type == "cuda" and "TRITON_CACHE_DIR" not in os.environ:
        from torch._inductor.runtime.runtime_utils import triton_cache_dir

        os.environ["TRITON_CACHE_DIR"] = triton_cache_dir(device.index)


def op_name(target: Any) -> str | None:
    """The op's qualified name ("lowmem::attention"), whether the graph calls an overload or the
    packet (as some passes insert it); None for anything else."""
    if isinstance(target, torch._ops.OpOverload):
        return target._schema.name
    if isinstance(target, torch._ops.OpOverloadPacket):
        return target._qualified_op_name
    return None


def _qualname(op: Any) -> str:
    """What a worker looks `op` up by (`torch._library.utils.lookup_op`): "lowmem::attention.default"."""
    return f"{op._schema.name}.{op._overloadname}" if isinstance(op, torch._ops.OpOverload) else op._qualified_op_name


def _signature(value: Any) -> Any:
    """What a compiled kernel can depend on in one argument: a tensor's metadata, else the value."""
    if isinstance(value, torch.Tensor):
        return (tuple(map(str, value.shape)), tuple(map(str, value.stride())), value.dtype, value.device,
                value.requires_grad)
    return value if isinstance(value, (int, float, bool, str, type(None), torch.dtype)) else repr(value)
