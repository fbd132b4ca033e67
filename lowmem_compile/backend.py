"""The `lowmem` backend: Dynamo graph -> our pre-autograd passes -> AOTAutograd with our partition
function -> Inductor (or plain FX execution with `inner="eager"`).

Inductor's own AOTAutograd setup, decompositions and caches stay intact: we hand the rewritten
graph to `compile_fx` with our partitioner scoped to this one compile through `config_patches`.
"""

from __future__ import annotations

import hashlib
import logging
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
from torch._dynamo.utils import counters

from .options import Options
from .passes import CompileContext, GraphPass
from .passes.attention import AttentionPass
from .passes.chunk_mlp import ChunkMLPPass
from .passes.fused_loss import FusedLossPass
from .passes.linear_nf4 import LinearNF4Pass
from .passes.remat import RematPartitioner, recorded_stats
from .report import STORE, CudaGraphStats, RematStats

log = logging.getLogger(__name__)

#: The pre-autograd passes, in the order they run on the Dynamo graph.
PRE_AUTOGRAD_PASSES: tuple[GraphPass, ...] = (AttentionPass(), LinearNF4Pass(), FusedLossPass(), ChunkMLPPass())


class Planned(Exception):
    """Raised by the backend in plan-only mode once a graph is partitioned: nothing to generate or run."""


def lowmem_backend(
    gm: torch.fx.GraphModule,
    example_inputs: Sequence[Any],
    options: Mapping[str, Any] | Options | None = None,
    *,
    plan_only: bool = False,
) -> Callable[..., Any]:
    """Compile one Dynamo graph. `options` comes from `torch.compile(..., options={...})`.
    With `plan_only`, run the passes and the partitioner (the report fills in), then raise `Planned`."""
    opts = Options.from_user(options)
    graph_report = STORE.new_graph(nodes=len(gm.graph.nodes))
    ctx = CompileContext(options=opts, example_inputs=example_inputs, report=graph_report)
    start = time.perf_counter()
    log.info("compiling a graph of %d nodes", len(gm.graph.nodes))
    for graph_pass in PRE_AUTOGRAD_PASSES:
        if graph_pass.enabled(opts):
            stats = graph_pass(gm, ctx)
            graph_report.add(graph_pass.section, stats)
            log.info("pass %s: %s", graph_pass.name, stats)
    gm.graph.lint()
    gm.recompile()

    partitioner = RematPartitioner(opts, graph_report)
    if plan_only:
        _compile_eager(gm, example_inputs, partitioner)  # traces and partitions now; the cost model still
        raise Planned  # models `opts.inner`'s fusion, so the prediction is the one a real compile makes
    if opts.inner == "eager":
        compiled = _compile_eager(gm, example_inputs, partitioner)
    else:
        from torch._inductor.compile_fx import compile_fx

        # AOTAutograd's cache (keyed on this graph, Inductor's config and the partitioner's uuid)
        # may serve the whole compile without calling the partitioner: the report then takes the
        # plan the partitioner recorded when it made that entry.
        partitioner.record = _plan_record(gm, example_inputs, partitioner.uuid())
        patches: dict[str, Any] = {"custom_partitioner_fn": partitioner}
        if opts.offload != "off":
            # An offload copy reads its source on a side stream after the forward has moved on; the
            # caching allocator waits for that (record_stream), Inductor would not: neither its
            # in-graph buffer reuse nor its in-place kernels (a pointwise op writing its result
            # over an input read for the last time, e.g. rotary embedding over q) may take the
            # source's memory mid-copy. Both are off in such graphs.
            patches["allow_buffer_reuse"] = False
            patches["inplace_buffers"] = False
        if opts.cudagraphs:
            patches["triton.cudagraphs"] = True
            _make_device_constants(example_inputs)
        hits = counters["aot_autograd"]["autograd_cache_hit"]
        skips = counters["inductor"]["cudagraph_skips"]
        compiled = compile_fx(gm, example_inputs, config_patches=patches)
        if opts.cudagraphs:
            graph_report.add("cudagraphs", _cudagraph_stats(counters["inductor"]["cudagraph_skips"] - skips))
        if "remat" not in graph_report.stats and counters["aot_autograd"]["autograd_cache_hit"] > hits:
            _report_cached_plan(graph_report, partitioner.record)
    log.info("graph compiled in %.1f s", time.perf_counter() - start)
    if opts.report:
        from .report import last_report

        print(last_report(), flush=True)
    return compiled


def _cudagraph_stats(new_skips: int) -> CudaGraphStats:
    """Inductor decides to skip CUDA graphs while compiling (a CPU input, a mutated input, ...), or
    for the backward when it first runs; the report carries what was seen by the end of the compile."""
    skipped = [f"Inductor will not replay {new_skips} graph(s) of this compile as CUDA graphs "
               "(TORCH_LOGS=cudagraphs prints why; a backward refused at its first run is not counted here)"]
    return CudaGraphStats(requested=1, skipped=skipped if new_skips else [])


def _make_device_constants(example_inputs: Sequence[Any]) -> None:
    """Our kernels' lazily made device tensors, made now: made during a CUDA graph tree's warm-up they
    would sit in its private pool and it would refuse to capture."""
    from .codegen import nf4_matmul

    for device in {x.device for x in example_inputs if isinstance(x, torch.Tensor) and x.is_cuda}:
        nf4_matmul.code_table(device)


def _plan_record(gm: torch.fx.GraphModule, example_inputs: Sequence[Any], partitioner_uuid: str) -> Path:
    """Where the partitioner records the plan of this graph: a file in Inductor's cache folder named
    by the graph's code, its inputs' shapes and dtypes and the partitioner's uuid (what AOTAutograd's
    cache key also holds, so an entry served from it finds the record its compile wrote)."""
    from torch._inductor.runtime.cache_dir_utils import cache_dir

    inputs = [(tuple(x.shape), x.dtype, x.device.type) if isinstance(x, torch.Tensor) else repr(x) for x in example_inputs]
    key = hashlib.sha256(f"{gm.code}|{inputs}|{partitioner_uuid}".encode()).hexdigest()
    return Path(cache_dir()) / "lowmem_plans" / f"{key}.json"


def _report_cached_plan(graph_report, record: Path) -> None:
    """The remat entry of a graph AOTAutograd's cache compiled: the plan recorded when the entry was made."""
    stats = recorded_stats(record)
    if stats is None:
        stats = RematStats(notes=["compiled from AOTAutograd's cache; the plan's record is missing"])
    else:
        stats.notes.append("plan as recorded when AOTAutograd's cache entry was made (this compile reused it)")
    graph_report.add("remat", stats)
    log.info("remat: plan served from AOTAutograd's cache")


def _compile_eager(
    gm: torch.fx.GraphModule, example_inputs: Sequence[Any], partitioner: RematPartitioner
) -> Callable[..., Any]:
    """AOTAutograd with Inductor's decompositions and our partitioner, graphs run as FX code."""
    from torch._dynamo.backends.common import aot_autograd
    from torch._dynamo.backends.debugging import boxed_nop
    from torch._inductor.decomposition import select_decomp_table

    return aot_autograd(
        fw_compiler=boxed_nop,
        bw_compiler=boxed_nop,
        partition_fn=partitioner,
        decompositions=select_decomp_table(),
        keep_inference_input_mutations=True,
    )(gm, example_inputs)
