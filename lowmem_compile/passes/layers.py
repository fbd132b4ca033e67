"""Per-layer compilation: split the Dynamo graph at the boundaries of its repeated layers and group
the layers whose graphs are the same but for their weights, so that each distinct body is traced,
planned and compiled once and called for every layer like it.

Why: compiled as one graph, a step costs compile time in proportion to its depth (AOTAutograd
traces, the planner partitions and Inductor generates code for every layer): six minutes to the
first step of Llama-3-8B's 32 layers at 8192 tokens, and a 128K-token step never finished. A
decoder's layers are one graph with different weights; compiled once, the compile stops growing
with depth.

When it runs: after the pre-autograd passes, on the rewritten graph. The attention pass proves a
mask causal from what the model builds before its first layer; on a layer alone that mask would be
an opaque input. So each layer body arrives with its attention, NF4 and MLP rewrites done, and
AOTAutograd, the planner (`passes/remat.py`, told the step around the body: `cost/layered.py`) and
Inductor see one layer.

Regions, in graph order: the nodes of one layer (`remat.layer_of`: the outermost indexed module of
a `ModuleList`) form a region; a node with no layer lying between two nodes of the same layer joins
that layer; the nodes before the first layer are the prefix, after the last the tail, and any
other run of nodes between two layers a glue region. Two layer regions share a body when their
graphs match node for node (op, target, constant arguments, and every input's shape, strides,
dtype, device and `requires_grad`). Placeholders come in the order their region first reads them,
so one compiled body takes each layer's own weights in the same positions.

Invariant: the outer graph calls the regions in the original order with the original values, so
the step computes what the whole graph computes; autograd chains the compiled regions' backwards.
"""

from __future__ import annotations

import dataclasses
import hashlib
import operator
from typing import Any

import torch
import torch.fx
from torch.fx.passes.split_module import split_module

from .remat import layer_of


@dataclasses.dataclass
class Region:
    """One submodule of the outer graph."""

    name: str
    """Its attribute on the outer graph module (`submod_<i>`)."""
    kind: str
    """"prefix", "layer", "glue" or "tail"."""
    layer: str | None = None
    """The layer's module path (layers only)."""
    key: str | None = None
    """The body signature (layers only): regions with equal keys share one compiled body."""
    carried: list[int] = dataclasses.field(default_factory=list)
    """Positions of the inputs that belong to this call alone (:func:`carried_inputs`)."""
    activations: list[int] = dataclasses.field(default_factory=list)
    """Positions of the floating-point inputs that are not parameters (the hidden state, rotary
    tables, masks): whether they require grad depends on where the call sits (the first layer's
    input, rows of a frozen embedding, requires none), not on the layer (:func:`body_parts`)."""


@dataclasses.dataclass
class LayerSplit:
    outer: torch.fx.GraphModule
    regions: list[Region]

    def bodies(self) -> dict[str, list[Region]]:
        """Layer regions grouped by body signature, in order of first appearance."""
        groups: dict[str, list[Region]] = {}
        for region in self.regions:
            if region.kind == "layer":
                groups.setdefault(region.key, []).append(region)
        return groups

    def submodule(self, region: Region) -> torch.fx.GraphModule:
        return getattr(self.outer, region.name)


class NotOutlined(Exception):
    """The graph cannot be split into layers; the message says why (it goes to the report)."""


def split_layers(gm: torch.fx.GraphModule) -> LayerSplit:
    """Split `gm` into prefix, layers (and glue) and tail; raise `NotOutlined` when it has no
    repeated layer bodies or its layers are interleaved."""
    nodes = [n for n in gm.graph.nodes if n.op not in ("placeholder", "output", "get_attr")]
    layers = _assign_layers(nodes)
    seen: list[str] = []
    for layer in layers:
        if layer is not None and (not seen or seen[-1] != layer):
            if layer in seen:
                raise NotOutlined(f"the nodes of {layer} are interleaved with another layer's")
            seen.append(layer)
    if len(seen) < 2:
        raise NotOutlined("no repeated layers (elements of a ModuleList of blocks) in the graph")
    first = layers.index(seen[0])
    last = len(layers) - 1 - layers[::-1].index(seen[-1])
    partition: dict[torch.fx.Node, int] = {}
    kinds: list[tuple[str, str | None]] = []
    for i, (node, layer) in enumerate(zip(nodes, layers)):
        kind = "prefix" if i < first else "tail" if i > last else "layer" if layer else "glue"
        if not kinds or kinds[-1] != (kind, layer):
            kinds.append((kind, layer))
        partition[node] = len(kinds) - 1
    outer = split_module(gm, gm, lambda node: partition[node], keep_original_order=True, keep_original_node_name=True)
    regions = [Region(name=f"submod_{i}", kind=kind, layer=layer) for i, (kind, layer) in enumerate(kinds)]
    regions = [r for r in regions if hasattr(outer, r.name)]  # split_module drops empty partitions
    split = LayerSplit(outer=outer, regions=regions)
    for region in regions:
        if region.kind == "layer":
            placeholders = placeholders_of(getattr(outer, region.name))
            region.carried = carried_inputs(split, region)
            region.activations = [i for i, p in enumerate(placeholders) if _is_activation(p)]
            region.key = body_key(getattr(outer, region.name), region.activations)
    if all(len(group) == 1 for group in split.bodies().values()):
        raise NotOutlined(f"none of the {len(seen)} layers has the same graph as another (nothing to reuse)")
    return split


def _assign_layers(nodes: list[torch.fx.Node]) -> list[str | None]:
    """Each node's layer; a node without one between two nodes of the same layer joins it (a helper
    function's nodes, or a node a pass inserted without provenance)."""
    layers = [layer_of(n) for n in nodes]
    previous: str | None = None
    pending: list[int] = []
    for i, layer in enumerate(layers):
        if layer is None:
            pending.append(i)
            continue
        if layer == previous:
            for j in pending:
                layers[j] = layer
        pending, previous = [], layer
    return layers


def placeholders_of(gm: torch.fx.GraphModule) -> list[torch.fx.Node]:
    """The inputs of `gm` in the order its code takes them. Not `graph.find_nodes(op="placeholder")`:
    that lists them in the order they were created, and `split_module` creates a region's inputs
    in one order and then moves them into the original graph's (seen on CUDA, not on the CPU)."""
    return [n for n in gm.graph.nodes if n.op == "placeholder"]


def _input_value(placeholder: torch.fx.Node) -> Any:
    """A region input's example value (Dynamo's, copied by `split_module`; else the traced `val`)."""
    return placeholder.meta.get("example_value", placeholder.meta.get("val"))


def _is_activation(placeholder: torch.fx.Node) -> bool:
    value = _input_value(placeholder)
    return isinstance(value, torch.Tensor) and value.is_floating_point() and not isinstance(value, torch.nn.Parameter)


def body_key(gm: torch.fx.GraphModule, activations: list[int]) -> str:
    return hashlib.sha256(repr(body_parts(gm, activations)).encode()).hexdigest()[:16]


def body_parts(gm: torch.fx.GraphModule, activations: list[int]) -> list[tuple]:
    """The graph up to node names and module paths, node by node: equal for two layers that differ
    only in which weights they are given. An activation input counts as requiring grad either way:
    the first layer's hidden state (a frozen embedding's rows) does not, the others' do, and the
    body compiled for the others serves the first too (its call makes the input require grad; the
    extra input gradient costs a fraction of one layer's backward, where a body of its own would
    cost a compile). Parameters keep their `requires_grad` (LoRA or frozen) in the key. (On CUDA
    the first layer's hidden state was not always an input another region computed, 2026-12-07:
    hence activations, not computed inputs.)"""
    index: dict[torch.fx.Node, int] = {}
    parts = []
    inputs = 0
    for i, node in enumerate(gm.graph.nodes):
        index[node] = i
        if node.op == "placeholder":
            signature = _value_signature(_input_value(node))
            if inputs in activations:  # a tensor: the requires_grad field made True (counted among the
                # inputs, not the nodes: on CUDA a region's graph may hold other nodes before them)
                signature = signature[:5] + (True,) + signature[6:]
            inputs += 1
            parts.append(("input", signature))
            continue
        args = torch.fx.node.map_arg((node.args, node.kwargs), lambda n: f"%{index[n]}")
        parts.append((node.op, _target_name(node.target), repr(args)))
    return parts


def why_apart(split: LayerSplit) -> list[str]:
    """For each body but the most used one, where its graph first differs from that one's: what
    the report says when layers that look alike compile apart."""
    groups = sorted(split.bodies().values(), key=len, reverse=True)
    if len(groups) < 2:
        return []
    main = groups[0][0]
    main_parts = body_parts(split.submodule(main), main.activations)
    notes = []
    for group in groups[1:]:
        other = group[0]
        parts = body_parts(split.submodule(other), other.activations)
        at = next((i for i, (a, b) in enumerate(zip(main_parts, parts)) if a != b), min(len(parts), len(main_parts)))
        mine = parts[at] if at < len(parts) else "(end)"
        theirs = main_parts[at] if at < len(main_parts) else "(end)"
        notes.append(f"{other.layer} ({len(group)} calls) differs from {main.layer} at node {at}: "
                     f"{str(mine)[:200]} against {str(theirs)[:200]}")
    return notes


def _target_name(target: Any) -> str:
    if isinstance(target, str):
        return target
    module = getattr(target, "__module__", None) or ""
    return f"{module}.{getattr(target, '__qualname__', getattr(target, '__name__', repr(target)))}"


def _value_signature(value: Any) -> tuple:
    if isinstance(value, torch.Tensor):
        return ("tensor", tuple(value.shape), tuple(value.stride()), value.dtype, value.device.type,
                value.requires_grad, isinstance(value, torch.nn.Parameter))
    if isinstance(value, (torch.SymInt, torch.SymFloat, torch.SymBool)):
        return ("sym", str(value.node.expr))
    return (type(value).__name__, repr(value))


def carried_inputs(split: LayerSplit, region: Region) -> list[int]:
    """Positions of the inputs of `region` that belong to this call alone: values another region
    computed and only this one reads (the hidden state a layer takes from the one before). Each
    call's autograd keeps these for its backward, unlike weights (resident anyway) or values
    shared by every layer (the rotary tables, computed once in the prefix)."""
    call = next(n for n in split.outer.graph.nodes if n.op == "call_module" and n.target == region.name)
    positions = []
    for i, arg in enumerate(call.args):
        source = _producer(arg)
        if source is not None and source.op == "call_module" and set(arg.users) == {call}:
            positions.append(i)
    return positions


def _producer(arg: Any) -> torch.fx.Node | None:
    """The submodule call that computed `arg` (through the getitem of a multi-output region)."""
    if not isinstance(arg, torch.fx.Node):
        return None
    if arg.op == "call_function" and arg.target is operator.getitem:
        return arg.args[0]
    return arg
