"""The `lowmem` backend: Dynamo graph -> our pre-autograd passes -> AOTAutograd with our partition
function -> Inductor (or plain FX execution with `inner="eager"`).

Inductor's own AOTAutograd setup, decompositions and caches stay intact: we hand the rewritten
graph to `compile_fx` with our partitioner scoped to this one compile through `config_patches`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import operator
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import sympy
import torch
from torch._dynamo.utils import counters

from . import layer_frames, warmup
from .cost.layered import LayerContext, LayerExprs
from .cost.sizes import sym_bytes, tensor_bytes
from .layer_frames import GradSink, LayerFrame
from .memory import release_after_first_backward
from .ops import offload as offload_ops
from .options import Options
from .passes import CompileContext, GraphPass
from .passes import user as user_passes
from .passes.attention import AttentionPass
from .passes.attention_masks import MaskForm, mask_forms, with_mask_parts
from .passes.chunk_mlp import ChunkMLPPass
from .passes.fused_loss import FusedLossPass
from .passes.layers import LayerSplit, NotOutlined, Region, placeholders_of, split_layers, why_apart
from .passes.linear_nf4 import LinearNF4Pass
from .passes.remat import RematPartitioner, device_of, held_note, recorded_stats
from .report import STORE, CudaGraphStats, GraphReport, LayerStats, RematStats, WarmupStats, gib

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
    if not plan_only and opts.inner != "eager":
        # Inductor's compile workers take seconds to start: start them now, so they are up by the
        # time the passes and the partitioner hand Inductor its first kernels (Inductor's own
        # backend does the same on entry)
        from torch._inductor.async_compile import maybe_warm_pool

        maybe_warm_pool()
    if opts.left_to_budget():  # options that memory_budget decides: knob.py plans them, then calls back
        from .knob import compile_within_budget

        return compile_within_budget(gm, example_inputs, opts, plan_only=plan_only)
    graph_report = STORE.new_graph(nodes=len(gm.graph.nodes))
    ctx = CompileContext(options=opts, example_inputs=example_inputs, report=graph_report)
    start = time.perf_counter()
    log.info("compiling a graph of %d nodes", len(gm.graph.nodes))
    for graph_pass in PRE_AUTOGRAD_PASSES:
        user_passes.run_scheduled(graph_pass.name, gm, ctx)  # the user passes placed before it
        if graph_pass.enabled(opts):
            stats = graph_pass(gm, ctx)
            graph_report.add(graph_pass.section, stats)
            log.info("pass %s: %s", graph_pass.name, stats)
    user_passes.run_scheduled(None, gm, ctx)  # the user passes placed after every built-in one
    if (custom_ops := user_passes.plan_user_ops(gm)) is not None:
        graph_report.add("custom_ops", custom_ops)
    gm.graph.lint()
    gm.recompile()
    warm = None
    if not plan_only and opts.warmup != "off" and opts.inner == "inductor":
        warm = warmup.start(gm, example_inputs, opts.warmup)  # our kernels compile while Inductor compiles
    try:
        compiled = _compile_split_or_whole(gm, example_inputs, opts, graph_report, plan_only)
    finally:
        waiting = time.perf_counter()
        if warm is not None:  # joined before the step runs: the warm-up never shares the GPU with it
            graph_report.add("warmup", warm.join())
        pinned, pin_seconds = offload_ops.settle_pinned()  # the parked plan's host blocks, pinned meanwhile
        waited = time.perf_counter() - waiting
        if pinned or warm is not None:
            graph_report.add("warmup", WarmupStats(pinned_bytes=pinned, pin_seconds=round(pin_seconds, 2),
                                                   waited_seconds=round(waited, 2)))
            log.info("the compile waited %.1f s for the warm-up and pinning threads", waited)
    log.info("graph compiled in %.1f s", time.perf_counter() - start)
    if any(isinstance(x, torch.Tensor) and x.is_cuda for x in example_inputs):
        # what the compile and the first run cached in the allocator goes back to the driver once the
        # first backward (itself compiled lazily) is done: reserved memory then follows the steps
        compiled = release_after_first_backward(compiled)
    if opts.report:
        from .report import last_report

        print(last_report(), flush=True)
    return compiled


def _compile_split_or_whole(
    gm: torch.fx.GraphModule, example_inputs: Sequence[Any], opts: Options, graph_report: GraphReport, plan_only: bool
) -> Callable[..., Any] | None:
    """Each distinct layer body once (`layers="auto"`, passes/layers.py), else the graph whole.
    With `plan_only`, plan and raise `Planned`."""
    frame = layer_frames.current() if opts.layers == "auto" else None
    if frame is not None:  # a decoder layer's own frame (layer_frames.py)
        compiled = _compile_frame(gm, example_inputs, opts, graph_report, frame, plan_only)
    else:
        split = None
        framed_model = layer_frames.owner(example_inputs)  # a framed model's graph outside its layers
        weights = any(isinstance(x, torch.nn.Parameter) for x in example_inputs)  # no weights, no layers
        if opts.layers == "auto" and framed_model is None and weights:
            try:
                split = split_layers(gm)
            except NotOutlined as reason:
                graph_report.add("layers", LayerStats(skipped=[f"compiled as one graph: {reason}"]))
                log.info("layers: %s; compiling the graph whole", reason)
        # a framed model's graph before its layers: no weights, nothing that needs a gradient (in a
        # training step the layers' outputs do); without grad, the one that builds the layers' masks
        before_layers = (layer_frames.framed() and not weights and not plan_only
                         and not any(isinstance(x, torch.Tensor) and x.requires_grad for x in example_inputs))
        masks = _layer_masks(gm) if before_layers else []
        if split is not None:
            compiled = _compile_layers(split, example_inputs, opts, graph_report, plan_only)
        elif before_layers and (torch.is_grad_enabled() or masks):
            compiled = _run_before_layers(gm, graph_report, masks)
        else:
            device = device_of(example_inputs)
            outside = 0 if framed_model is None else layer_frames.held_outside(framed_model, example_inputs, device, gm.code)
            partitioner = RematPartitioner(opts, graph_report, outside=outside)
            compiled = _compile_graph(gm, example_inputs, opts, graph_report, partitioner, plan_only)
            if framed_model is not None and partitioner.plans and not plan_only:
                activations = [x for x in example_inputs if isinstance(x, torch.Tensor) and not isinstance(x, torch.nn.Parameter)
                               and x.is_floating_point()]
                layer_frames.note_after(framed_model, gm.code, partitioner.plans[-1].memory.saved
                                        + _device_bytes(activations, device.type != "cpu"))
    if plan_only:
        raise Planned  # the cost model still models `opts.inner`'s fusion: the prediction is a real compile's
    return compiled


def _compile_graph(
    gm: torch.fx.GraphModule,
    example_inputs: Sequence[Any],
    opts: Options,
    graph_report: GraphReport,
    partitioner: RematPartitioner,
    plan_only: bool,
) -> Callable[..., Any] | None:
    """AOTAutograd with our partitioner, then Inductor (or FX code with `inner="eager"`). With
    `plan_only`, trace and partition only (returns None)."""
    partitioner.pin_ahead = not plan_only and opts.warmup != "off"
    if plan_only or opts.inner == "eager":
        compiled = _compile_eager(gm, example_inputs, partitioner)  # plan-only: traces and partitions now
        return None if plan_only else compiled
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
    return compiled


def _compile_frame(
    gm: torch.fx.GraphModule,
    example_inputs: Sequence[Any],
    opts: Options,
    graph_report: GraphReport,
    frame: LayerFrame,
    plan_only: bool,
) -> Callable[..., Any] | None:
    """One decoder layer's frame (`layer_frames.py`): compiled as a body that every layer like it
    calls, planned for the step around it. Its inputs are the layer's weights (the model's, all
    resident), the values the layers share (rotary tables, a mask: resident once) and the hidden
    state (`frame.hidden`, one call's). The model's tail compiles after the layers, as a graph of its
    own: this plan counts it by estimate (`layer_frames.tail_estimate`: a budget, and the knob's
    choice of parking against dropping the logits, cover the step), and what this plan keeps is in
    the tail's own plan (`layer_frames.note_kept`)."""
    device = device_of(example_inputs)
    on_device = device.type != "cpu"
    model = frame.model()
    weights = layer_frames.weights_of(model) if model is not None else {}
    carried = [i for i, x in enumerate(example_inputs) if x is frame.hidden]
    shared = [x for i, x in enumerate(example_inputs) if id(x) not in weights and i not in carried]
    own = [x for i, x in enumerate(example_inputs) if i not in carried]
    context = LayerContext(
        calls=frame.calls,
        resident=frame.device_bytes(device) + _device_bytes(shared, on_device),
        body_inputs=_device_bytes(own, on_device),
        carried=_device_bytes([frame.hidden], on_device),
        grads=sum(tensor_bytes(x) for x in own if isinstance(x, torch.Tensor) and x.requires_grad),
        tail=0 if model is None else layer_frames.tail_estimate(model, frame.hidden, opts.logits != "drop",
                                                                   opts.fused_loss == "on"),
    )
    partitioner = RematPartitioner(opts, graph_report, context=context, carried=carried, whole_step=False)
    log.info("layers: compiling a decoder layer's frame for %d calls", frame.calls)
    compiled = _compile_graph(gm, example_inputs, opts, graph_report, partitioner, plan_only)
    if partitioner.plans and not plan_only:  # (none when AOTAutograd's cache served the compile; a knob's trial plan is not the step's)
        plan = partitioner.plans[-1]
        # the tail's estimate chose the plan; the tail's own plan reports its peak
        peak = dataclasses.replace(context, tail=0).step_peak(plan.memory, not plan.carried_offloaded, plan.offloaded_bytes)
        remat = graph_report.stats["remat"]
        graph_report.stats["remat"] = dataclasses.replace(
            remat, predicted_peak_bytes=peak, predicted_peak_outputs_freed_bytes=peak,
            notes=[*remat.notes, f"layer frame: the step peak above counts the graphs after the layers by estimate "
                                 f"({gib(context.tail)}); without them {gib(peak)}, their own plans report theirs"])
        layer_frames.note_kept(frame, frame.calls * context.kept(plan.memory, not plan.carried_offloaded)
                               + _device_bytes(shared, on_device))
    # the passes' counts are of one layer's sites: the report counts every layer the body serves
    alike = frame.alike()
    for section in ("attention", "nf4", "mlp"):
        if section in graph_report.stats:
            stats = graph_report.stats[section]
            graph_report.stats[section] = dataclasses.replace(stats, **{
                f.name: getattr(stats, f.name) * alike for f in dataclasses.fields(stats)
                if f.metadata.get("merge") == "sum" and type(getattr(stats, f.name)) is int})
    graph_report.add("layers", LayerStats(bodies=1, calls=alike))
    return compiled


def _compile_layers(
    split: LayerSplit, example_inputs: Sequence[Any], opts: Options, graph_report: GraphReport, plan_only: bool
) -> Callable[..., Any] | None:
    """Compile each region of `split` (passes/layers.py) and each distinct layer body once; the outer
    graph then calls the compiled regions in order. Each region compiles in a tracing context of its
    own (Dynamo's fake mode, so the shape guards it adds reach Dynamo), as its backward compiles
    lazily from that context's metadata. The regions' plans merge into this graph's report, the
    bodies' already counted for every call and scored by the step's peak (cost/layered.py)."""
    from torch._guards import TracingContext, tracing

    fake_mode = torch._guards.detect_fake_mode(example_inputs)
    outer_inputs = {p.name: x for p, x in zip(placeholders_of(split.outer), example_inputs)}
    on_device = any(isinstance(x, torch.Tensor) and x.device.type != "cpu" for x in example_inputs)
    bodies = split.bodies()
    apart = why_apart(split)  # before the regions are replaced by their compiled code
    calls = sum(len(group) for group in bodies.values())
    returned = _returned_values(split)

    def inputs_of(region: Region) -> tuple[list[torch.fx.Node], list[Any]]:
        """A region's input nodes and their example values, in the order its code takes them."""
        placeholders = placeholders_of(split.submodule(region))
        return placeholders, [_example_value(p, outer_inputs) for p in placeholders]

    def compile_region(region: Region, context: LayerContext | None = None) -> tuple[Callable[..., Any] | None, RematPartitioner]:
        sub = split.submodule(region)
        single = _outputs_as_tuple(sub)
        _, inputs = inputs_of(region)
        region_report = GraphReport(index=graph_report.index, nodes=len(sub.graph.nodes))
        # outside the layers nothing is parked: the tail's backward runs first, the prefix's last
        region_opts = opts if region.kind == "layer" else dataclasses.replace(opts, offload="off")
        partitioner = RematPartitioner(region_opts, region_report, context=context, carried=region.carried, whole_step=False)
        with tracing(TracingContext(fake_mode)):
            compiled = _compile_graph(sub, inputs, region_opts, region_report, partitioner, plan_only)
        where = "layer body" if region.kind == "layer" else region.kind
        for section, stats in region_report.stats.items():
            if section == "remat":
                stats = dataclasses.replace(stats, notes=[f"{where}: {note}" for note in stats.notes])
            graph_report.add(section, stats)
        if compiled is not None:
            requires_grad = [i for i in region.activations if getattr(inputs[i], "requires_grad", False)]
            no_grad = [i for i, x in enumerate(inputs) if isinstance(x, torch.Tensor) and not x.requires_grad]
            split.outer.register_module(region.name, _CompiledRegion(compiled, single, requires_grad, no_grad))
        return compiled, partitioner

    outer_values = [_example_value(p, outer_inputs) for p in placeholders_of(split.outer)]
    resident = _device_bytes(outer_values, on_device)
    resident_expr = _device_bytes(outer_values, on_device, symbolic=True)  # Dynamo's fake values carry the symbols
    tail_extra, tail_exprs = 0, ()
    for region in split.regions:
        if region.kind != "layer":
            placeholders, inputs = inputs_of(region)
            from_layers = [x for p, x in zip(placeholders, inputs) if p.name not in outer_inputs]
            _, partitioner = compile_region(region)
            stats = partitioner.report.stats.get("remat", RematStats())
            if region.kind == "tail" and stats.predicted_peak_bytes is not None:
                # the tail's peak above what the step holds anyway: its own inputs from outside the layers
                tail_extra = stats.predicted_peak_bytes - _device_bytes(inputs, on_device) + _device_bytes(from_layers, on_device)
                if partitioner.symbolic_memory is not None:
                    own = _device_bytes(inputs, on_device, symbolic=True) - _device_bytes(from_layers, on_device, symbolic=True)
                    tail_exprs = tuple(e - own for e in partitioner.symbolic_memory.peak_exprs)
    first_body = True
    for group in bodies.values():
        # a body compiles for the layer whose activation inputs require grad the most (the first
        # layer's input, from a frozen embedding, requires none)
        representative = max(group, key=lambda r: sum(bool(getattr(inputs_of(r)[1][i], "requires_grad", False))
                                                        for i in r.activations))
        placeholders, inputs = inputs_of(representative)
        carried = [x for i, x in enumerate(inputs) if i in representative.carried]
        own = [x for i, x in enumerate(inputs) if i not in representative.carried]
        shared = [x for i, (p, x) in enumerate(zip(placeholders, inputs))
                  if p.name not in outer_inputs and i not in representative.carried]
        if first_body:
            resident += _device_bytes(shared, on_device)
            resident_expr += _device_bytes(shared, on_device, symbolic=True)
            first_body = False
        exprs = None
        if any(isinstance(d, torch.SymInt) for x in inputs if isinstance(x, torch.Tensor) for d in x.shape):
            exprs = LayerExprs(
                resident=resident_expr,
                body_inputs=_device_bytes(own, on_device, symbolic=True),
                carried=_device_bytes(carried, on_device, symbolic=True),
                held=_device_bytes(returned.get(representative.name, []), on_device, symbolic=True),
                tail=tail_exprs,
            )
        context = LayerContext(
            calls=calls,
            resident=resident,
            body_inputs=_device_bytes(own, on_device),
            carried=_device_bytes(carried, on_device),
            grads=sum(tensor_bytes(x) for x in own if isinstance(x, torch.Tensor) and x.requires_grad),
            tail=tail_extra,
            held=_device_bytes(returned.get(representative.name, []), on_device),
            exprs=exprs,
        )
        log.info("layers: compiling the body of %s for %d calls", representative.layer, len(group))
        compiled, _ = compile_region(representative, context)
        for region in group:
            if region is not representative and compiled is not None:
                split.outer.register_module(region.name, getattr(split.outer, representative.name))
    graph_report.add("layers", LayerStats(bodies=len(bodies), calls=calls, apart=apart))
    held = [x for values in returned.values() for x in values]
    peak = graph_report.stats["remat"].predicted_peak_bytes if "remat" in graph_report.stats else None
    note = held_note(len(held), _device_bytes(held, on_device), peak or 0) if peak else None
    if note:
        graph_report.add("remat", RematStats(policy=opts.remat, notes=[note]))
    if plan_only:
        return None
    split.outer.recompile()
    return split.outer


class _CompiledRegion(torch.nn.Module):
    """A compiled region as the outer graph calls it: returns what the region's graph returned,
    and gives a carried input the `requires_grad` the body was compiled for (see `layers.body_key`)."""

    def __init__(
        self, compiled: Callable[..., Any], single_output: bool, requires_grad: list[int], no_grad: list[int]
    ) -> None:
        super().__init__()
        self.compiled = compiled
        self.single_output = single_output
        self.requires_grad = requires_grad
        self.no_grad = no_grad
        """Inputs the body was compiled not to differentiate: one that requires grad at a call would
        lose its gradient, so that call raises instead."""

    def forward(self, *args: Any) -> Any:
        if torch.is_grad_enabled():
            args = list(args)
            for i in self.requires_grad:
                if not args[i].requires_grad:
                    args[i] = GradSink.needing_grad(args[i])
            for i in self.no_grad:
                if args[i].requires_grad:
                    raise RuntimeError(f"lowmem: input {i} of a compiled layer body requires grad here but not "
                                       "where the body was compiled; compile with options={'layers': 'off'}")
        out = self.compiled(*args)
        return out[0] if self.single_output else out


def _layer_masks(gm: torch.fx.GraphModule) -> list[MaskForm]:
    """The masks transformers' masking_utils built among `gm`'s outputs that the pass proves
    (`mask_forms`): another function's output keeps its values."""
    (outputs,) = gm.graph.find_nodes(op="output")[0].args
    outputs = outputs if isinstance(outputs, (tuple, list)) else (outputs,)
    return [f for f in mask_forms(gm) if "masking_utils" in (outputs[f.output].meta.get("stack_trace") or "")]


def _run_before_layers(gm: torch.fx.GraphModule, graph_report: GraphReport, forms: list[MaskForm]) -> Callable[..., Any]:
    """A graph a framed model runs before its layers (no weights, no input that needs a gradient:
    the embedding rows, rotary tables, the mask), run as its FX code. Compiled, each such graph cost
    Inductor 1-4 s of the first step on an H100 (bench/results/layers/2026-12-08T00/) for kernels
    that are a negligible part of a step. Its bool masks proven causal (`forms`) are told to the layers
    (`layer_frames.mark_mask`); where every framed layer is SDPA they are not built at all: a plain
    causal one becomes an empty stand-in the layers drop, any other its parts (positions, keys kept),
    from which each layer's frame builds it where the attention pass sees how (`with_mask_parts`).
    Position ids are checked on the values (one device sync a step): where every row steps by one,
    the documents term is left out (one document a row), so a causal mask over them is plain."""
    positions = sorted({f.positions for f in forms if f.positions is not None})
    checked = sorted({f.positions for f in forms if f.plain and f.positions is not None})
    plain = {f.output for f in forms if f.plain}
    rewritten: dict[bool, tuple[torch.fx.GraphModule, set[int]]] = {}
    if forms and layer_frames.masks_rewritable():
        for consecutive in {True, not checked}:  # every checked row steps by one, or some does not
            unbuilt = plain if consecutive else {f.output for f in forms if f.plain and f.positions is None}
            graph = with_mask_parts(gm, forms, unbuilt)
            if graph is not None:
                rewritten[consecutive] = (graph, unbuilt)
    if len(rewritten) < (1 if not checked else 2):
        rewritten.clear()  # symbolic sizes: built as they are
    graph_report.add("layers", LayerStats(run_as_fx=1, masks_unbuilt=len(forms) if rewritten else 0))
    log.info("layers: a graph before the layers runs as FX code (%d causal masks proven, %s)", len(forms),
             "not built" if rewritten else "built")
    if not forms:
        return gm

    def call(*args: Any) -> Any:
        steps = {j: bool((args[j].diff(dim=-1) == 1).all()) for j in positions}  # one document a row
        # built for another model's layers (one not framed, run beside a framed one): as they are
        mine = rewritten if layer_frames.in_framed_step() else {}
        graph, unbuilt = mine.get(all(steps[j] for j in checked), (gm, None))
        out = graph(*args)
        for f in forms:
            documents = f.positions is not None and not steps[f.positions]
            if unbuilt is None:  # built: only the plain causal ones are of use to the layers
                if f.plain and not documents:
                    layer_frames.mark_mask(out[f.output])
            else:
                layer_frames.mark_mask(out[f.output], None if f.output in unbuilt else
                                       (f.window, documents, f.padding is not None))
        return out

    return call


def _returned_values(split: LayerSplit) -> dict[str, list[torch.Tensor]]:
    """For each region, the example values of its outputs that the step returns (besides a scalar
    loss): the model's logits from the tail, a K/V cache from every layer. The caller holds them."""
    output = split.outer.graph.find_nodes(op="output")[0]
    returned: dict[str, list[torch.Tensor]] = {}
    for node in _flat_nodes(output.args[0]):
        index, call = (node.args[1], node.args[0]) if node.target is operator.getitem else (0, node)
        if not (isinstance(call, torch.fx.Node) and call.op == "call_module"):
            continue
        values = getattr(split.outer, call.target).graph.find_nodes(op="output")[0].args[0]
        value = values[index] if isinstance(values, (tuple, list)) else values
        example = value.meta.get("example_value") if isinstance(value, torch.fx.Node) else None
        if isinstance(example, torch.Tensor) and example.numel() > 1:
            returned.setdefault(call.target, []).append(example)
    return returned


def _flat_nodes(args: Any) -> list[torch.fx.Node]:
    nodes: list[torch.fx.Node] = []
    torch.fx.node.map_arg(args, nodes.append)
    return nodes


def _outputs_as_tuple(gm: torch.fx.GraphModule) -> bool:
    """Make `gm` return a tuple (AOTAutograd's convention); True if it returned a single value."""
    output = gm.graph.find_nodes(op="output")[0]
    if isinstance(output.args[0], (tuple, list)):
        return False
    output.args = ((output.args[0],),)
    gm.recompile()
    return True


def _example_value(placeholder: torch.fx.Node, outer_inputs: Mapping[str, Any]) -> Any:
    """A region input's example: Dynamo's fake value of the node it stands for (its symbols are the
    ones Dynamo guards on), or the real input the backend was given."""
    value = placeholder.meta.get("example_value")
    return value if value is not None else outer_inputs.get(placeholder.name)


def _device_bytes(values: Any, on_device: bool, symbolic: bool = False) -> Any:
    """Bytes of the tensors in `values` that a step on a device holds there (the cost model leaves
    host-memory inputs, such as an embedding table in host memory, out); with `symbolic`, as an
    expression in the shape symbols."""
    held = [x for x in values if isinstance(x, torch.Tensor) and not (on_device and x.device.type == "cpu")]
    if symbolic:
        return sum((sym_bytes(x) for x in held), sympy.Integer(0))
    return sum(tensor_bytes(x) for x in held)


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
