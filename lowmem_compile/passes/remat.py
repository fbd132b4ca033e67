"""The partition function: splits AOTAutograd's joint graph into forward and backward graphs and
decides, from the memory cost model, which forward values are saved and which are recomputed.

Runs inside AOTAutograd (Inductor calls it through `config.custom_partitioner_fn`; the eager inner
compiler passes it as `partition_fn`). The splitting itself is torch's min-cut partitioner; this pass
steers it with the checkpoint tags that partitioner honours (`MUST_SAVE`, `MUST_RECOMPUTE`, the same
tags `torch.utils.checkpoint` policies set), then predicts the step's peak with
`cost.liveness.simulate_step` and picks a plan:

* `none`: the stock plan, unchanged (it already recomputes cheap pointwise chains);
* `full`: inside each repeated layer (a `ModuleList` element) everything is recomputed and only the
  layer's inputs are saved, like per-layer gradient checkpointing;
* `auto`: when the stock plan's predicted peak exceeds the budget, two families of candidates: the
  stock plan with the first saved values forced to recompute, in order of recompute seconds per
  byte freed (a greedy knapsack: cheap, small savings), and `full` on the first k layers only (the
  earliest layers, whose recompute runs last in the backward, when the least is live: savings in
  steps of one layer's activations, up to `full`). Of the plans whose predicted peak fits it takes
  the one with the least added time; when none fits, the lowest peak, with a warning. The layer
  count k is searched, not enumerated: the smallest k that fits, by interpolating the peak between
  the bracketing plans (a few partitions, where the 33 plans of a 32-layer model would each cost
  a partition). Peaks fall and added times grow with k, so the search picks what enumerating all
  k would, and a lower budget never yields a higher predicted peak. With `offload="parked"` a third
  candidate, `full+parked`: `full` that also saves, and parks in host memory, the outputs dearest
  to recompute per byte (attention's first), as many as the host link hides behind each layer's
  forward; its prefetched copies make it nearly as small as `full` and faster.

User `torch.utils.checkpoint` regions keep their own tags, as do the NF4 weights dequantized in
the graph (`MUST_RECOMPUTE`, passes/linear_nf4.dequantize_once: never saved, parked or
offloaded); random, mutating and effectful ops are never forced to recompute. Invariant: whatever the tags, the
partition is torch's, so gradients are exact; only memory and time change.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import sys
import time
import types
import warnings
import weakref
from collections import OrderedDict
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.fx
from torch._functorch.partitioners import min_cut_rematerialization_partition
from torch._inductor.custom_graph_pass import CustomPartitionerFn
from torch.utils import _pytree as pytree
from torch.utils.checkpoint import CheckpointPolicy

from .. import ops as lowmem_ops
from ..cost import layered, liveness, sizes, timing
from ..cost.layered import LayerContext
from ..cost.liveness import StepMemory, longest_fitting, shape_hints, simulate_step
from ..cost.sizes import is_getitem, is_host_copy, is_view, storage_root, tensor_bytes, tensor_outputs, tensor_val
from ..cost.timing import DeviceRates, is_fusible, node_flops, node_time, rates_for, recompute_time
from ..options import Options
from ..report import GraphReport, RematStats
from ..sources import source_hash
from . import copy_graph_module, offload

#: Modules whose ops' autograd formulas and fake impls AOTAutograd traces into the joint graph:
#: every module of the ops package (each registers its ops on import).
_OP_MODULES = tuple(m for m in vars(lowmem_ops).values() if isinstance(m, types.ModuleType))

log = logging.getLogger(__name__)

#: Share of free device memory left unplanned when no budget is given (allocator slack, workspaces).
FREE_MEMORY_MARGIN = 0.10
#: Fractions of the candidates' saved bytes forced to recompute in `auto`'s greedy family (past
#: half, measured plans only rose in peak: recomputing more values made the min-cut save their inputs).
AUTO_STEPS = (0.25, 0.5)
#: Share of the host link's bytes over a layer's modelled forward time that the `full+parked` plan
#: fills with saved outputs (the layer's input travels too).
PARK_LINK_SHARE = 0.8
#: How many min-cut partitions this process keeps for reuse (`_min_cut`).
PARTITIONS_KEPT = 32
_PARTITIONS: OrderedDict[str, tuple[Any, torch.fx.GraphModule, torch.fx.GraphModule]] = OrderedDict()
"""key -> (a weak reference to the fake mode the split's values belong to, forward, backward)."""
_LAYER_RE = re.compile(r"[.\[]\d+\]?(?=$|[.\[])")


@dataclass
class Plan:
    """One partition of the joint graph and what the cost model predicts for it."""

    name: str
    num_fwd_outputs: int
    fw: torch.fx.GraphModule
    bw: torch.fx.GraphModule
    memory: StepMemory
    saved_names: list[str]
    recomputed: list[str]
    added_flops: int
    added_seconds: float
    offloaded_bytes: int = 0
    carried_offloaded: bool = False
    """For a layer body: whether its carried input is parked in host memory between the passes."""
    step_peak: int | None = None
    """For a layer body compiled once for many layers: the whole step's peak (`cost/layered.py`)."""
    host_note: str | None = None
    """Set when not all the values this plan would park fit the host's share (`offload.within_host`)."""
    parked_sizes: tuple[int, ...] = ()
    """The bytes of each value one call parks in host memory, where all sizes are static."""

    @property
    def peak(self) -> int:
        return self.memory.peak if self.step_peak is None else self.step_peak


def saved_values(fw_module: torch.fx.GraphModule, num_fwd_outputs: int) -> list[torch.fx.Node]:
    """The tensors the forward graph returns for the backward (after the user-visible outputs)."""
    output = fw_module.graph.find_nodes(op="output")[0]
    saved = output.args[0][num_fwd_outputs:]
    return [n for n in saved if isinstance(n, torch.fx.Node) and isinstance(n.meta.get("val"), torch.Tensor)]


def _forward_nodes(graph: torch.fx.Graph, num_fwd_outputs: int) -> set[torch.fx.Node]:
    """The forward computation of a joint graph: what its forward outputs are computed from, and the
    other results of those multi-output ops (an attention's statistics). Not "everything that does
    not read a tangent": the backward also has such nodes (a norm's statistics recomputed for its
    gradient), and counted as forward they sat after the last layer, as if in the model's tail."""
    output = graph.find_nodes(op="output")[0]
    stack = [o for o in output.args[0][:num_fwd_outputs] if isinstance(o, torch.fx.Node)]
    seen: set[torch.fx.Node] = set()
    while stack:
        node = stack.pop()
        if node not in seen:
            seen.add(node)
            stack.extend(node.all_input_nodes)
    seen |= {u for n in seen for u in n.users if is_getitem(u)}
    return {n for n in seen if n.op == "call_function"}


def _can_force_recompute(node: torch.fx.Node) -> bool:
    """Ops we may tag MUST_RECOMPUTE: functional, deterministic, untagged by the user, tensor-valued."""
    if "recompute" in node.meta or is_getitem(node):
        return False
    target = node.target
    if not isinstance(target, torch._ops.OpOverload) or target._schema.is_mutable:
        return False
    if torch.Tag.nondeterministic_seeded in target.tags:
        return False
    val = node.meta.get("val")
    vals = val if isinstance(val, (tuple, list)) else [val]
    return all(isinstance(v, torch.Tensor) or v is None for v in vals) and any(isinstance(v, torch.Tensor) for v in vals)


def _recompute_unit(node: torch.fx.Node) -> list[torch.fx.Node]:
    """The nodes to tag to recompute `node`: a multi-output op goes with its getitems."""
    return [node] + [u for u in node.users if is_getitem(u)]


def layer_of(node: torch.fx.Node) -> str | None:
    """The repeated layer (outermost indexed module, e.g. `model.layers.3`) a forward node runs in."""
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return None
    # innermost first; an entry may name a function instead of a module (transformers records
    # `apply_rotary_pos_emb` as one), whose path lacks the layer's index
    for path, _ in reversed(list(stack.values())):
        match = _LAYER_RE.search(str(path))
        if match:
            return str(path)[: match.end()]
    return None


class _Planner:
    """Partitions one joint graph under tag sets and scores each result with the cost model."""

    def __init__(
        self,
        gm,
        joint_inputs,
        kwargs,
        *,
        fused: bool,
        rates: DeviceRates,
        offload_to: torch.device | None = None,
        offload_above: int | None = None,
        context: LayerContext | None = None,
        carried: frozenset[str] = frozenset(),
        outside: int = 0,
    ) -> None:
        gm.graph.eliminate_dead_code()
        gm.recompile()
        self.gm, self.joint_inputs, self.kwargs = gm, joint_inputs, kwargs
        self.fused, self.rates = fused, rates
        self.offload_to = offload_to
        """With a device, plans park their earlier layers' saved values in host memory: every plan,
        or with `offload_above` only those whose peak would otherwise exceed it (offloading costs
        time, so `auto` uses it where recomputing alone does not fit)."""
        self.offload_above = offload_above
        self.context = context
        """Set when the graph is one layer body that the step calls `context.calls` times: the
        whole graph is that layer, every call parks what it saves (the last one too: it is the same
        code), and plans are scored by the step's peak."""
        self.carried = carried
        """Names of the body's primal inputs that belong to one call (its hidden state input)."""
        self.outside = outside
        """Device bytes the step holds outside this graph while it runs (`RematPartitioner.outside`)."""
        self.forward = _forward_nodes(gm.graph, kwargs["num_fwd_outputs"])
        self.forward_names = {n.name for n in self.forward}
        self.by_name = {n.name: n for n in gm.graph.nodes}
        self.layers = list(dict.fromkeys(layer for n in gm.graph.nodes if n in self.forward and (layer := self.layer_of(n))))
        """The repeated layers in forward order."""
        self.tail = self._tail()
        """The forward nodes after the last layer (final norm, head, loss)."""

    def partition(self, name: str, tags: dict[str, CheckpointPolicy]) -> Plan:
        start = time.perf_counter()
        fw, bw = _min_cut(self.gm, self.joint_inputs, tags, self.kwargs)
        num_out = self.kwargs["num_fwd_outputs"]
        memory = simulate_step(fw, bw, num_out, fused=self.fused)
        moved, link_seconds, carried_moved, host_note, parked_sizes = 0, 0.0, False, None, ()
        peak = memory.peak + self.outside if self.context is None else self.context.step_peak(memory)
        if self.offload_to is not None and self.layers and (self.offload_above is None or peak > self.offload_above):
            if self.context is not None:
                values = offload.choose(fw, num_out, None, inputs=self.carried)
            else:  # the forward's first node of the last layer (none if the partition dropped the layer tags)
                last_layer = next((n for n in fw.graph.nodes if self.layer_of(n) == self.layers[-1]), None)
                values = offload.choose(fw, num_out, last_layer) if last_layer is not None else []
            calls, allowed = 1 if self.context is None else self.context.calls, offload.host_bytes_for_parking()
            values, left = offload.within_host(values, calls, allowed)
            if left:
                parked = sum(tensor_bytes(tensor_val(v)) for v in values)
                host_note = (
                    f"host memory: parking all would take {(parked + left) * calls / 2**30:.1f} GiB of the "
                    f"{allowed / 2**30:.1f} GiB allowed ({offload.HOST_SHARE:.0%} of the host's); "
                    f"{left * calls / 2**30:.1f} GiB stay on the device")
            carried_moved = any(v.op == "placeholder" for v in values)
            vals = [tensor_val(v) for v in values]
            if all(isinstance(d, int) for val in vals for d in val.shape):
                parked_sizes = tuple(tensor_bytes(val) for val in vals)
            moved = offload.apply(fw, bw, values, self.offload_to, self.rates, ahead=self.context is not None) if values else 0
            if moved:
                memory = simulate_step(fw, bw, num_out, fused=self.fused)
                link_seconds = offload.exposed_seconds(fw, bw, self.rates, ahead=self.context is not None)
        recomputed = [
            n for n in bw.graph.nodes if n.op == "call_function" and n.name in self.forward_names and not is_view(n)
        ]
        recomputed = [n for n in recomputed if not is_getitem(n)]
        log.info("remat plan %s: predicted peak %.2f GiB, %d values recomputed, %.0f MiB offloaded (%.1f s)",
                 name, memory.peak / 2**30, len(recomputed), moved / 2**20, time.perf_counter() - start)
        return Plan(
            name=name,
            num_fwd_outputs=num_out,
            fw=fw,
            bw=bw,
            memory=memory,
            saved_names=[n.name for n in saved_values(fw, num_out)],
            recomputed=[n.name for n in recomputed],
            added_flops=sum(node_flops(n) for n in recomputed),
            added_seconds=recompute_time(recomputed, self.rates) + link_seconds,
            offloaded_bytes=moved,
            carried_offloaded=carried_moved,
            step_peak=(self.context.step_peak(memory, not carried_moved, moved) if self.context is not None
                       else memory.peak + self.outside if self.outside else None),
            host_note=host_note,
            parked_sizes=parked_sizes if moved else (),
        )

    def layer_of(self, node: torch.fx.Node) -> str | None:
        """The layer a node runs in; in a layer body, every forward op is in the one layer."""
        if self.context is not None:
            return "body" if node.op == "call_function" else None
        return layer_of(node)

    def full_tags(self, layers: int) -> dict[str, CheckpointPolicy]:
        """Recompute everything inside each of the first `layers` layers; save what flows into those
        layers, and out of them into the model's tail."""
        chosen = set(self.layers[:layers])
        tags: dict[str, CheckpointPolicy] = {}
        for node in self.forward:
            if self.layer_of(node) in chosen and _can_force_recompute(node):
                for n in _recompute_unit(node):
                    tags[n.name] = CheckpointPolicy.MUST_RECOMPUTE
        for node in self.forward:
            layer = self.layer_of(node)
            for user in node.users:
                into = self.layer_of(user)
                # saved: what flows into a recomputed layer (it bounds the recomputation) and what
                # flows out of one into the model's tail (the last layer's output into the final
                # norm), so that the backward recomputes that layer as it needs it, not all at once
                if (
                    user in self.forward and into != layer and "recompute" not in node.meta  # a user's tag stays
                    and (into in chosen or (layer in chosen and user in self.tail))
                ):
                    tags[node.name] = CheckpointPolicy.MUST_SAVE
        return tags

    def _tail(self) -> set[torch.fx.Node]:
        nodes = [n for n in self.gm.graph.nodes if n in self.forward]
        last = max((i for i, n in enumerate(nodes) if self.layer_of(n) is not None), default=len(nodes))
        return set(nodes[last + 1 :])

    def layer_plan(self, k: int) -> Plan:
        """`full` on the first k layers, the stock plan elsewhere."""
        name = "full" if k == len(self.layers) else f"full[{k}/{len(self.layers)} layers]"
        return self.partition(name, self.full_tags(k))

    def parked_plan(self) -> Plan:
        """`full`, except that in every layer but the last the outputs dearest to recompute per byte
        (attention first, then the projections) are saved, to be parked in host memory with the
        layer's input: as many bytes as the host link carries while the layer's forward runs, so
        the copies hide behind compute both ways and the device holds no more than under `full`
        (plus the copies in flight). The backward then recomputes only what is cheap per byte."""
        tags = self.full_tags(len(self.layers))
        for layer in self.layers if self.context is not None else self.layers[:-1]:
            nodes = [n for n in self.forward if self.layer_of(n) == layer]
            room = PARK_LINK_SHARE * self.rates.host_link * recompute_time(nodes, self.rates)
            dear = []
            for node in nodes:
                nbytes = sum(tensor_bytes(v) for v in tensor_outputs(node))
                if nbytes and node_flops(node) and _can_force_recompute(node) and self._read_by_backward(node):
                    dear.append((node_time(node, self.rates) / nbytes, nbytes, node))
            for _, nbytes, node in sorted(dear, key=lambda d: -d[0]):
                if nbytes <= room:
                    room -= nbytes
                    tags.update({n.name: CheckpointPolicy.MUST_SAVE for n in _recompute_unit(node)})
        return self.partition("full+parked", tags)

    def _read_by_backward(self, node: torch.fx.Node) -> bool:
        """Whether the joint graph's backward reads `node`'s output, directly or through views and
        pointwise ops (which the backward can recompute from it): saving an output that only the
        forward reads (a frozen projection feeding the residual add) spares nothing."""
        stack, seen = list(node.users), set()
        while stack:
            user = stack.pop()
            if user in seen:
                continue
            seen.add(user)
            if user not in self.forward:
                return True
            if is_fusible(user):
                stack.extend(user.users)
        return False

    def layer_search(self, stock: Plan, budget: int) -> list[Plan]:
        """The layer plans evaluated while finding the smallest k whose peak fits `budget` (stock is
        k = 0 and does not fit): `full` first, then interpolation inside the bracket."""
        n = len(self.layers)
        if n == 0:
            return []
        full = self.layer_plan(n)
        plans = [full]
        lo, hi = (0, stock), (n, full)
        if full.peak > budget:
            return plans
        while hi[0] - lo[0] > 1:
            share = (lo[1].peak - budget) / max(lo[1].peak - hi[1].peak, 1)
            k = min(max(lo[0] + math.ceil(share * (hi[0] - lo[0])), lo[0] + 1), hi[0] - 1)
            plan = self.layer_plan(k)
            plans.append(plan)
            if plan.peak <= budget:
                hi = (k, plan)
            else:
                lo = (k, plan)
        return plans

    def candidates(self, stock: Plan) -> list[tuple[float, list[str], int]]:
        """Values the stock plan saves that could be recomputed: (seconds per byte, tag names, bytes),
        cheapest recompute per byte freed first. A value whose storage is also a user output (the
        logits) frees nothing when recomputed, since the caller holds it: not a candidate."""
        out_node = stock.fw.graph.find_nodes(op="output")[0]
        user_outputs = {storage_root(o).name for o in out_node.args[0][: stock.num_fwd_outputs] if isinstance(o, torch.fx.Node)}
        units: dict[torch.fx.Node, int] = {}
        fw_nodes = {n.name: n for n in stock.fw.graph.nodes}
        for name in stock.saved_names:
            if is_host_copy(fw_nodes[name]):  # offloaded: recomputing it is still a choice
                name = fw_nodes[name].args[0].name
            node = self.by_name.get(name)
            if node is None or node not in self.forward:
                continue
            root = storage_root(node)
            if root.name in user_outputs:
                continue
            op = root.args[0] if is_getitem(root) else root
            if not isinstance(op, torch.fx.Node) or op not in self.forward or not _can_force_recompute(op):
                continue
            val = tensor_val(root)
            units[op] = units.get(op, 0) + (tensor_bytes(val) if val is not None else 0)
        out = []
        for op, nbytes in units.items():
            if nbytes > 0:
                out.append((node_time(op, self.rates) / nbytes, [n.name for n in _recompute_unit(op)], nbytes))
        order = {n: i for i, n in enumerate(self.gm.graph.nodes)}
        return sorted(out, key=lambda c: (c[0], order[self.by_name[c[1][0]]]))

    def greedy_family(self, stock: Plan) -> list[Plan]:
        """Stock with growing prefixes of the candidates recomputed."""
        cands = self.candidates(stock)
        total = sum(c[2] for c in cands)
        plans, done, tags, acc, i = [], set(), {}, 0, 0
        for step in AUTO_STEPS:
            while i < len(cands) and acc < step * total:
                tags.update({n: CheckpointPolicy.MUST_RECOMPUTE for n in cands[i][1]})
                acc += cands[i][2]
                i += 1
            if i and i not in done:
                done.add(i)
                plans.append(self.partition(f"auto[{i}/{len(cands)}]", dict(tags)))
        return plans


def _min_cut(
    gm: torch.fx.GraphModule, joint_inputs: Sequence[object], tags: dict[str, CheckpointPolicy], kwargs: dict[str, Any]
) -> tuple[torch.fx.GraphModule, torch.fx.GraphModule]:
    """The min-cut split of the joint graph `gm` with `tags` forced, as copies the caller may
    rewrite. Why kept: the memory knob plans one joint graph under several option sets (parking is
    applied after the split, so it leaves the split alone) and then compiles the one it chose, and
    the planner tries the same tags under each: the same split, about a second each for a layer of
    Llama-3-8B. Kept by everything the split reads (`_partition_key`), at most `PARTITIONS_KEPT`, and
    served only to a compile of the same fake mode (its values, and their symbols, are that mode's)."""
    mode = torch._guards.detect_fake_mode(joint_inputs)
    key = _partition_key(gm, tags, kwargs)
    entry = _PARTITIONS.get(key)
    if entry is None or mode is None or entry[0]() is not mode:
        joint = copy_graph_module(gm)
        for node in joint.graph.nodes:
            if node.name in tags:
                node.meta["recompute"] = tags[node.name]
        fw, bw = min_cut_rematerialization_partition(joint, joint_inputs, **kwargs)
        if mode is None:
            return fw, bw
        entry = _PARTITIONS[key] = (weakref.ref(mode), copy_graph_module(fw), copy_graph_module(bw))
        while len(_PARTITIONS) > PARTITIONS_KEPT:
            _PARTITIONS.popitem(last=False)
        return fw, bw
    _PARTITIONS.move_to_end(key)
    return copy_graph_module(entry[1]), copy_graph_module(entry[2])


def _partition_key(gm: torch.fx.GraphModule, tags: dict[str, CheckpointPolicy], kwargs: dict[str, Any]) -> str:
    """What a min-cut split depends on: the joint graph's code, every node's value metadata (dtype,
    shape, strides, whether it requires grad) and other metadata the partitioner reads, the tags,
    the partitioner's arguments and AOTAutograd's configuration."""
    digest = hashlib.sha256(gm.code.encode())
    for node in gm.graph.nodes:
        meta = {k: node.meta.get(k) for k in ("recompute", "partitioner_tag", "ac_graph_id") if k in node.meta}
        digest.update(f"{node.name}|{_value_key(node.meta.get('val'))}|{meta}\n".encode())
    digest.update(repr(sorted((name, str(policy)) for name, policy in tags.items())).encode())
    digest.update(repr(sorted((name, repr(value)) for name, value in kwargs.items())).encode())
    digest.update(torch._functorch.config.save_config())
    return digest.hexdigest()


def _value_key(value: object) -> str:
    if isinstance(value, torch.Tensor):
        return f"T({value.dtype},{tuple(value.shape)},{value.stride()},{value.requires_grad},{value.device})"
    if isinstance(value, (list, tuple)):
        return "(" + ",".join(_value_key(v) for v in value) + ")"
    return f"{type(value).__name__}:{value}" if isinstance(value, (int, float, bool, torch.SymInt, torch.SymFloat)) else type(value).__name__


def choose(plans: list[Plan], budget: int | None) -> tuple[Plan, str | None]:
    """The plan with the least added time whose peak fits `budget`; the lowest peak if none fits
    (then also a message saying by how much it misses)."""
    if budget is None:
        return plans[0], None
    fitting = [p for p in plans if p.peak <= budget]
    if fitting:
        return min(fitting, key=lambda p: (p.added_seconds, p.peak)), None
    best = min(plans, key=lambda p: (p.peak, p.added_seconds))
    miss = best.peak - budget
    return best, (
        f"memory budget {budget / 2**30:.2f} GiB is infeasible: the lowest predicted peak is "
        f"{best.peak / 2**30:.2f} GiB (plan {best.name}), {miss / 2**30:.2f} GiB over"
    )


def device_of(joint_inputs: object) -> torch.device:
    """The CUDA device of the joint inputs, else the CPU. AOTAutograd passes a training graph's
    inputs as a (primals, tangents) pair of lists, so the pytree is flattened first."""
    for x in pytree.tree_leaves(joint_inputs):
        if isinstance(x, torch.Tensor) and x.device.type == "cuda":
            return x.device
    return torch.device("cpu")


def budget_on(options: Options, device: torch.device) -> int | None:
    """`memory_budget` in bytes on `device` (a fraction is of the device's memory; of the host's
    on the CPU)."""
    if device.type == "cuda":
        return options.budget_bytes(torch.cuda.get_device_properties(device).total_memory)
    return options.budget_bytes(_host_memory())


def _host_memory() -> int:
    import os

    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def _held_note(plan: Plan) -> str | None:
    """What the step returns besides its loss, when it weighs (see :func:`held_note`)."""
    out = plan.fw.graph.find_nodes(op="output")[0].args[0][: plan.num_fwd_outputs]
    big = [o for o in out if isinstance(o, torch.fx.Node) and (v := tensor_val(o)) is not None and v.numel() > 1]
    return held_note(len(big), plan.memory.held, plan.peak)


def held_note(tensors: int, held: int, peak: int) -> str | None:
    """The caller holds what the step returns until it drops the outputs, through the forward's end at
    least. A K/V cache is the costly surprise: the backward keeps K/V in 8 or 4 bits, so a returned
    bf16 cache is memory the step would not need. None when it weighs under 1% of the peak."""
    if held < 0.01 * peak or not tensors:
        return None
    return (f"the step returns {tensors} tensors besides its loss, {held / 2**20:.1f} MiB held until the "
            "caller drops the outputs: logits (`logits=\"drop\"` drops them), a K/V cache (`model.config.use_cache = "
            "False` when training)")


def _peak_note(memory, top: int = 6) -> str:
    """Where the predicted peak is and its largest live values: what a user would shrink next."""
    where, *values = memory.peak_values or [("?", 0)]
    phase = "forward" if memory.forward_peak >= memory.backward_peak else "backward"
    parts = ", ".join(f"{name} {size / 2**20:.0f} MiB" for name, size in values[:top])
    rest = sum(size for _, size in values[top:])
    more = f", {len(values) - top} more {rest / 2**20:.0f} MiB" if len(values) > top else ""
    return f"peak in the {phase} {where[0]}: {parts}{more} above {memory.resident / 2**30:.2f} GiB resident"


class RematPartitioner(CustomPartitionerFn):
    """Forward/backward split for one compiled graph; records its plan in the graph's report.

    With `record` set (by the backend, from the graph and :meth:`uuid`), the plan's stats are also
    written there as JSON: a compile served from AOTAutograd's cache never calls the partitioner,
    and the backend fills the report from that file instead (:func:`recorded_stats`)."""

    def __init__(
        self,
        options: Options,
        report: GraphReport,
        context: LayerContext | None = None,
        carried: Sequence[int] = (),
        whole_step: bool = True,
        outside: int = 0,
    ) -> None:
        self.options = options
        self.report = report
        self.whole_step = whole_step
        """False for a region of a step compiled a layer at a time: what the step returns is noted
        by the backend, which sees the whole step's outputs."""
        self.context = context
        """For a layer body compiled once for many layers: the step around it (`cost/layered.py`)."""
        self.carried = frozenset(f"primals_{i + 1}" for i in carried)
        """The body's inputs that belong to one call, by AOTAutograd's names for its primals."""
        self.outside = outside
        """Device bytes the step holds outside this graph while it runs: for a graph after layers that
        compiled as frames of their own (`layer_frames.py`), what those layers keep for their backward
        and the weights that are not this graph's inputs. Plans are scored with them added."""
        self.record: Path | None = None
        self.plans: list[Plan] = []
        """The chosen plan of every joint graph partitioned, for inspection and tests."""
        self.symbolic_memory: StepMemory | None = None
        """The chosen plan simulated with symbolic sizes, when a budget asked for the longest sequence:
        a layered compile builds the bodies' step expressions from the tail's (`cost/layered.py`)."""
        self.pin_ahead = False
        """Set by the backend for a compile that will run: the chosen plan's host blocks are pinned on
        a thread while the rest of the step compiles (`ops/offload.py`, `pin_ahead`)."""

    def budget(self, device: torch.device) -> tuple[int | None, str]:
        """The peak to fit, in bytes, and where it comes from."""
        budget = budget_on(self.options, device)
        if budget is None and device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(device)
            usable = free + torch.cuda.memory_reserved(device)
            return int(usable * (1 - FREE_MEMORY_MARGIN)), "free device memory less a margin"
        return budget, "memory_budget"

    def __call__(
        self, gm: torch.fx.GraphModule, joint_inputs: Sequence[object], **kwargs: Any
    ) -> tuple[torch.fx.GraphModule, torch.fx.GraphModule]:
        kwargs.setdefault("compiler", "inductor")
        device = device_of(joint_inputs)
        budget, budget_source = self.budget(device)
        policy = self.options.remat
        offload_to = device if self.options.offload in ("layers", "parked") else None
        planner = _Planner(
            gm,
            joint_inputs,
            kwargs,
            fused=self.options.inner == "inductor",
            rates=rates_for(device),
            offload_to=offload_to,
            offload_above=budget if policy == "auto" else None,
            context=self.context,
            carried=self.carried,
            outside=self.outside,
        )
        notes: list[str] = []
        if self.outside:
            notes.append(f"after the layers' frames: {self.outside / 2**30:.2f} GiB they keep and the weights "
                         "outside this graph counted in its peak")
        if policy == "full":
            plans = [planner.layer_plan(len(planner.layers))]
        else:
            plans = [planner.partition("none", {})]
            if policy == "auto" and budget is not None and plans[0].peak > budget:
                plans += planner.greedy_family(plans[0]) + planner.layer_search(plans[0], budget)
                if self.options.offload == "parked" and planner.layers:
                    plans.append(planner.parked_plan())
        plan, miss = choose(plans, budget if policy == "auto" else None)
        log.info("remat: chose plan %s of %d (policy %s, budget %s)", plan.name, len(plans), policy,
                 "none" if budget is None else f"{budget / 2**30:.2f} GiB")
        if miss:
            warnings.warn(f"lowmem remat: {miss}", stacklevel=2)
            notes.append(miss)
        if budget is not None and plan.peak > budget and policy != "auto":
            notes.append(f"remat={policy} plan peaks at {plan.peak / 2**30:.2f} GiB, over the {budget / 2**30:.2f} GiB budget")
        if plan.host_note:
            notes.append(plan.host_note)
        if offload_to is not None and not planner.layers:
            notes.append("offload=layers: no repeated layers found (a ModuleList of blocks); nothing offloaded")
        notes.append(
            f"plan {plan.name} of {len(plans)} evaluated; recompute adds ~{plan.added_seconds * 1e3:.2f} ms "
            f"({plan.added_flops / 1e9:.1f} GFLOP){'; budget from ' + budget_source if budget is not None else ''}"
        )
        notes.append(_peak_note(plan.memory))
        if self.context is not None:
            notes.append(
                f"layer body planned once for {self.context.calls} calls: {plan.memory.peak / 2**30:.2f} GiB "
                f"in one call, {self.context.kept(plan.memory, not plan.carried_offloaded) / 2**20:.0f} MiB kept on the "
                f"device a call for the backward, {plan.offloaded_bytes / 2**20:.0f} MiB in host memory, "
                f"step peak {plan.peak / 2**30:.2f} GiB"
            )
        held = _held_note(plan) if self.whole_step else None
        if held:
            notes.append(held)
        longest = self._longest_sequence(plan, budget, notes)
        self.plans.append(plan)
        calls = 1 if self.context is None else self.context.calls  # a body's figures, for every call
        if self.pin_ahead and plan.parked_sizes:
            lowmem_ops.offload.pin_ahead(plan.parked_sizes * calls, device)
        stats = RematStats(
            policy=policy,
            saved_bytes=plan.memory.saved * calls,
            predicted_peak_bytes=plan.peak,
            predicted_peak_outputs_freed_bytes=plan.memory.peak_outputs_freed if self.context is None else plan.peak,
            recomputed=len(plan.recomputed) * calls,
            offloaded_bytes=plan.offloaded_bytes * calls,
            added_flops=plan.added_flops * calls,
            added_seconds=plan.added_seconds * calls,
            budget_bytes=budget,
            longest_fitting_seq=longest,
            notes=notes,
        )
        self.report.add("remat", stats)
        if self.record is not None:
            _write_record(self.record, stats)
        return plan.fw, plan.bw

    def _longest_sequence(self, plan: Plan, budget: int | None, notes: list[str]) -> int | None:
        """With a symbolic sequence length, the longest one whose predicted peak fits the budget."""
        if budget is None:
            return None
        memory = simulate_step(plan.fw, plan.bw, plan.num_fwd_outputs, fused=self.options.inner == "inductor", symbolic=True)
        self.symbolic_memory = memory
        exprs = memory.peak_exprs
        if self.context is not None and self.context.exprs is not None:
            exprs = self.context.step_exprs(memory, not plan.carried_offloaded, plan.offloaded_bytes)
        answer = longest_fitting(exprs, budget, shape_hints(plan.fw))
        if answer is None:
            return None
        symbol, length = answer
        notes.append(f"longest {symbol} within budget for this plan: {length}")
        return length

    def uuid(self) -> str:
        """What the split depends on besides the joint graph: our partition code, its module-level
        tunables and the autograd formulas of our ops (they shape the joint graph AOTAutograd
        caches), the options, the device's rates and, without a `memory_budget`, the budget that
        free memory gives (GiB)."""
        modules = (sys.modules[__name__], offload, sizes, timing, liveness, layered)
        tunables = sorted(
            (m.__name__, name, value) for m in modules for name, value in vars(m).items()
            if name.isupper() and not name.startswith("_") and isinstance(value, (bool, int, float, str, tuple))
        )
        device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
        extra = f"{self.options.cache_key()}|{tunables}|{rates_for(device)}|{self.context}|{sorted(self.carried)}|{self.outside}"
        if device.type == "cuda" and self.options.memory_budget is None:
            extra += f"|budget={self.budget(device)[0] >> 30}GiB"
        return source_hash(*modules, *_OP_MODULES, extra=extra)


def _write_record(path: Path, stats: RematStats) -> None:
    """Write `stats` to `path` atomically (a concurrent compile reads either nothing or all of it).
    The record only serves later cache hits' reports: a folder that cannot be written warns, the
    compile goes on."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(asdict(stats)))
        os.replace(tmp, path)
    except OSError as exc:
        log.warning("remat: could not record the plan at %s (%s); a later compile served from the cache "
                    "will report it as missing", path, exc)


def recorded_stats(path: Path) -> RematStats | None:
    """The stats a partitioner recorded at `path`, or None (no record, or an unreadable one)."""
    try:
        fields = json.loads(path.read_text())
        return RematStats(**fields)
    except (OSError, ValueError, TypeError):
        return None
