"""Liveness simulation of one training step: the partitioned forward, then the backward.

Memory is counted per storage (a view shares its base's bytes) and per node step: a node's result is
allocated when it runs and freed after the last node that reads it, or of any view of it. On top of
the **resident** bytes (every forward input: weights, frozen or not, and the batch) the step holds:

* forward: transient activations, then the user outputs and the values saved for the backward;
* backward: the saved values (each freed after its last use, as AOTAutograd clears them), the user
  outputs (the caller still holds them), the incoming gradients, transient values and recomputed
  forward values, and the gradients of trainable parameters (kept to the end).

Our ops' own buffers (a dequantized NF4 weight, attention's 16-bit K/V, a logits chunk), which the
graph cannot show, count at the op's step as the op declares them (`ops.library.workspace_of`).

With `fused=True` (Inductor) a pointwise op whose every reader is pointwise too is not materialized:
its inputs instead live until its readers run. Inlining is bounded as Inductor bounds it
(`_virtual_nodes`), so a chain of residual adds is stored about once a layer rather than holding
every layer's matmul outputs to the end of the forward. Such inlined nodes, the stored pointwise
results that read them and the pointwise readers of those stored results run as one kernel, one
step of the walk (`_fused_steps`): every input of the group and every output it writes are live
together. Sizes are ints at the example shapes, or, with
`symbolic=True`, sympy expressions too, so `peak(seq)` can be solved for a budget.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field

import sympy
import torch
import torch.fx

from ..ops.library import declares_workspace, workspace_of
from .sizes import (
    is_getitem,
    is_host_copy,
    is_view,
    prefetch_of,
    size_hint,
    storage_root,
    sym_bytes,
    tensor_bytes,
    tensor_val,
)
from .timing import is_fusible


@dataclass
class StepMemory:
    """Predicted memory of one forward + backward step, in bytes."""

    resident: int
    saved: int
    """Bytes of the storages the forward keeps for the backward (not counting resident inputs)."""
    forward_peak: int
    backward_peak: int
    peak_exprs: list[sympy.Expr] = field(default_factory=list)
    """Resident plus live bytes at every step, as expressions (only with `symbolic=True`)."""
    saved_expr: sympy.Expr | None = None
    peak_values: list[tuple[str, int]] = field(default_factory=list)
    """The storages live (above resident) at the peak step, largest first: what to shrink."""
    held: int = 0
    """Bytes of the user outputs (logits, ...) counted as held by the caller through the backward."""
    held_expr: sympy.Expr = sympy.Integer(0)
    forward_steps: int = 0
    """How many of `peak_exprs` are the forward's (the rest are the backward's, with `held_expr` in them)."""

    def peak_exprs_outputs_freed(self) -> list[sympy.Expr]:
        """`peak_exprs` with the outputs freed before the backward (see `peak_outputs_freed`)."""
        fw, bw = self.peak_exprs[: self.forward_steps], self.peak_exprs[self.forward_steps :]
        return fw + [e - self.held_expr for e in bw]

    @property
    def peak(self) -> int:
        """The peak when the caller holds the outputs through the backward (`out.loss.backward()`
        with `out` alive): the safe assumption, which budgets are fitted against."""
        return self.resident + max(self.forward_peak, self.backward_peak)

    @property
    def peak_outputs_freed(self) -> int:
        """The peak when the caller frees every output but the loss before the backward
        (`model(**batch).loss.backward()`, the usual training loop)."""
        return self.resident + max(self.forward_peak, self.backward_peak - self.held)


class _Sizes:
    """Bytes of a tensor as an int, and as a sympy expression when asked."""

    def __init__(self, symbolic: bool) -> None:
        self.symbolic = symbolic

    def of(self, val: torch.Tensor | None) -> tuple[int, sympy.Expr]:
        if val is None:
            return 0, sympy.Integer(0)
        return tensor_bytes(val), sym_bytes(val) if self.symbolic else sympy.Integer(0)


#: Inductor's limits on inlining a pointwise value (`torch._inductor.config`): a value with several
#: readers is stored once its expression reads more than `realize_reads_threshold` buffers or holds
#: more than `realize_opcount_threshold` ops; any value once it reads more than
#: `realize_acc_reads_threshold`.
SHARED_MAX_READS = 4
SHARED_MAX_OPS = 30
MAX_READS = 8
#: Inductor fuses no two nodes more than this many scheduler nodes apart (`are_long_distant_nodes`).
FUSION_DISTANCE = 64


def _virtual_nodes(graph: torch.fx.Graph, outputs: set[torch.fx.Node], fused: bool) -> set[torch.fx.Node]:
    """The nodes Inductor would fuse into their readers instead of writing to memory."""
    virtual: set[torch.fx.Node] = set()
    if not fused:
        return virtual
    reads: dict[torch.fx.Node, frozenset[torch.fx.Node]] = {}  # stored buffers an inlined use reads
    ops: dict[torch.fx.Node, int] = {}  # ops in a virtual node's inlined expression
    for node in graph.nodes:
        args = [a for a in node.all_input_nodes if a in reads or tensor_val(a) is not None]
        inlined = frozenset().union(*(reads.get(a, frozenset((a,))) for a in args))
        if is_view(node):
            reads[node], ops[node] = inlined, sum(ops.get(a, 0) for a in args)
            continue
        if node.op != "call_function" or node in outputs or is_getitem(node) or not node.users:
            continue
        if not is_fusible(node) or len(inlined) > MAX_READS:
            continue
        count = 1 + sum(ops.get(a, 0) for a in args)
        if len(node.users) > 1 and (len(inlined) > SHARED_MAX_READS or count > SHARED_MAX_OPS):
            continue
        if all(u.op == "call_function" and is_fusible(u) for u in _readers(node)):
            virtual.add(node)
            reads[node], ops[node] = inlined, count
    return virtual


def _readers(node: torch.fx.Node) -> list[torch.fx.Node]:
    """The nodes that read `node`'s value, looking through views (a matmul reading a reshape of a
    pointwise result needs that result in memory)."""
    out, stack = [], list(node.users)
    while stack:
        user = stack.pop()
        if is_view(user):
            stack.extend(user.users) if user.users else out.append(user)
        else:
            out.append(user)
    return out


def _kernels(
    nodes: list[torch.fx.Node], virtual: set[torch.fx.Node], fused: bool
) -> dict[torch.fx.Node, torch.fx.Node]:
    """The fused kernel of each node, as Inductor's scheduler fuses its loop nodes: an inlined node
    and the nodes that read it run as one; so does a stored loop node and a loop node reading it
    whole at its loop size (`_feeds`: the SiLU backward's gradient of up and the adapter's scaling of
    it, both written by one kernel), except where a member would depend on another through a node outside the
    kernel (a residual add reading the matmul fed by the norm that read the previous add): that
    fusion would be a cycle, so the reader runs apart; nor more than `FUSION_DISTANCE` stored nodes
    apart (a recomputed norm and its backward). The value names the kernel (itself if alone)."""
    order = {n: i for i, n in enumerate(nodes)}
    stored = 0  # stored (not inlined) nodes so far: Inductor's scheduler nodes
    parent: dict[torch.fx.Node, torch.fx.Node] = {}

    def find(k: torch.fx.Node) -> torch.fx.Node:
        while parent[k] is not k:
            parent[k] = k = parent[parent[k]]
        return k

    home: dict[torch.fx.Node, torch.fx.Node] = {}  # a member, or a view of one -> its kernel
    horizon: dict[torch.fx.Node, int] = {}  # a kernel's last possible joiner: the last reader of a member
    through: dict[torch.fx.Node, set[torch.fx.Node]] = {}  # kernels a kernel reads through outside nodes
    taint: dict[torch.fx.Node, set[torch.fx.Node]] = {}  # kernels, still open, that a node depends on
    opened: dict[torch.fx.Node, int] = {}  # the `stored` count at a kernel's first stored member
    for i, n in enumerate(nodes):
        inputs = n.all_input_nodes
        if is_view(n) and inputs:
            if inputs[0] in home:
                home[n] = home[inputs[0]]
            taint[n] = taint[inputs[0]]
            continue
        stored += n not in virtual
        inherited = {k for a in inputs for t in taint[a] if horizon[k := find(t)] >= i}
        joined: list[torch.fx.Node] = []
        loop = n in virtual or fused and _is_loop(n)
        sources = {
            find(home[a]) for a in inputs if a in home and (storage_root(a) in virtual or loop and _feeds(a, n))
        }
        for k in sorted(sources, key=order.get):
            near = stored - opened.get(k, stored) <= FUSION_DISTANCE
            before = {find(t) for t in through[k]}
            acyclic = k not in inherited and all(j not in before and k not in {find(t) for t in through[j]} for j in joined)
            if near and acyclic:
                joined.append(k)
        if joined or loop:
            kernel = parent[n] = joined[0] if joined else n
            through.setdefault(kernel, set()).update(inherited, *(through[j] for j in joined[1:]))
            readers = [order[r] for r in (_readers(n) if n in virtual else n.users)]
            horizon[kernel] = max([horizon.get(kernel, i)] + [horizon[j] for j in joined[1:]] + readers)
            for j in joined[1:]:
                parent[j] = kernel
            firsts = [opened[j] for j in joined if j in opened] + ([] if n in virtual else [stored])
            if firsts:
                opened[kernel] = min(firsts)
            home[n] = kernel
        own = find(home[n]) if n in home else None
        taint[n] = inherited | {k for a in inputs if a in home and (k := find(home[a])) is not own}
    return {n: find(home[n]) if n in home else n for n in nodes}


def _is_loop(node: torch.fx.Node) -> bool:
    """A node Inductor computes in a loop kernel it may fuse (pointwise, reduction, fill), not an
    extern call (a matmul, our ops) nor a view."""
    if node.op != "call_function" or is_view(node) or is_getitem(node):
        return False
    return is_fusible(node) and tensor_val(node) is not None


def _loop_size(node: torch.fx.Node) -> int:
    """Elements a loop node's kernel iterates over: its output's, or a reduction's input's."""
    vals = [v for a in [node, *node.all_input_nodes] if (v := tensor_val(a)) is not None]
    return max(size_hint(v.numel()) for v in vals)


def _feeds(producer: torch.fx.Node, consumer: torch.fx.Node) -> bool:
    """Inductor fuses a consumer into the loop node whose buffer it reads (and still writes that buffer
    for its other readers) when the two iterate alike: the consumer's loop covers the producer's whole
    output, which is no reduction's (a reduction ends its kernel on the CPU, `can_fuse_vertical`)."""
    if producer is not storage_root(producer) or not _is_loop(producer):
        return False
    elements = size_hint(tensor_val(producer).numel())
    return elements == _loop_size(producer) == _loop_size(consumer)


def _fused_steps(nodes: list[torch.fx.Node], virtual: set[torch.fx.Node], fused: bool) -> dict[torch.fx.Node, int]:
    """The step each node runs at, a fused kernel's members all at one (`_kernels`): where its last
    stored member stands, when all its inputs exist (Inductor runs the matmuls that the graph interleaves
    with the kernel ahead of it). A node that reads an earlier member waits for the kernel."""
    kernel = _kernels(nodes, virtual, fused)
    last: dict[torch.fx.Node, int] = {}  # where a kernel's last stored member stands
    for i, n in enumerate(nodes):
        if kernel[n] not in last or not (is_view(n) or n in virtual):
            last[kernel[n]] = i
    waits = {k: 0 for k in last}
    readers: dict[torch.fx.Node, set[torch.fx.Node]] = {k: set() for k in last}
    for n in nodes:
        for a in n.all_input_nodes:
            if kernel[a] is not kernel[n] and kernel[n] not in readers[kernel[a]]:
                readers[kernel[a]].add(kernel[n])
                waits[kernel[n]] += 1
    ready = [(last[k], k) for k in last if not waits[k]]  # positions are distinct: never compares nodes
    heapq.heapify(ready)
    step: dict[torch.fx.Node, int] = {}
    while ready:
        _, k = heapq.heappop(ready)
        step[k] = len(step)
        for r in readers[k]:
            waits[r] -= 1
            if not waits[r]:
                heapq.heappush(ready, (last[r], r))
    return {n: step[kernel[n]] for n in nodes}


def _last_need(
    graph: torch.fx.Graph, order: dict[torch.fx.Node, int], outputs: set[torch.fx.Node], virtual: set[torch.fx.Node]
):
    """For every node, the step after which nothing needs its storage any more."""
    end = len(order)
    need: dict[torch.fx.Node, int] = {}
    for node in reversed(graph.nodes):
        if node.op == "output":
            continue
        last = end if node in outputs else order[node]
        for user in node.users:
            if user.op == "output":
                continue
            passthrough = is_view(user) or user in virtual
            last = max(last, need[user] if passthrough else order[user])
        need[node] = last
    return need


def _run(
    graph: torch.fx.Graph,
    sizes: _Sizes,
    *,
    fused: bool,
    preallocated: dict[torch.fx.Node, tuple[int, sympy.Expr]],
    keep: set[torch.fx.Node],
    exprs: list[sympy.Expr] | None,
    base_expr: sympy.Expr,
    siblings: dict[torch.fx.Node, list[torch.fx.Node]] | None = None,
) -> tuple[int, list[tuple[str, int]]]:
    """Walk `graph` once; return its peak live bytes (above resident) and the storages live at that
    peak (name, bytes) with the step's node name first. `preallocated` placeholders are
    live at the start; `keep` roots are never freed here (they outlive the graph); `siblings` maps a
    placeholder to other placeholders that view the same storage (it lives until they are all dead)."""
    nodes = list(graph.nodes)
    output = graph.find_nodes(op="output")[0]
    outputs = {a for a in torch.fx.node.map_aggregate(output.args[0], lambda x: x) if isinstance(a, torch.fx.Node)}
    outputs = {a for o in outputs for a in (o, storage_root(o))}
    virtual = _virtual_nodes(graph, outputs, fused)
    order = _fused_steps(nodes, virtual, fused)
    need = _last_need(graph, order, outputs, virtual)
    steps: dict[int, list[torch.fx.Node]] = {}
    for node in nodes:
        if node.op != "output":
            steps.setdefault(order[node], []).append(node)
    frees: dict[int, list[torch.fx.Node]] = {}
    freed_at: dict[torch.fx.Node, int] = {}
    live_int, live_expr, peak, peak_step, peak_scratch = 0, sympy.Integer(0), 0, None, 0
    owned: dict[torch.fx.Node, tuple[int, sympy.Expr]] = {}
    # a prefetched reload's device copy exists from its prefetch on
    early = {p: n for n in nodes if (p := prefetch_of(n)) is not None}
    prefetched = set(early.values())
    for step in sorted(steps):
        scratch = _NO_BYTES
        for node in steps[step]:
            owner = early.get(node, node)
            if node.op == "placeholder":
                alloc = preallocated.get(node)
            elif is_view(node) or node in virtual or node in prefetched:
                alloc = None
            else:
                alloc = _alloc(owner, sizes)
            if alloc is not None:
                owned[owner] = alloc
                live_int += alloc[0]
                if sizes.symbolic:
                    live_expr += alloc[1]
                extra = (siblings or {}).get(owner, [])
                root_need = max(need[a] for a in [owner] + _aliases(owner) + extra)
                if owner not in keep:
                    freed_at[owner] = max(root_need, step)
                    frees.setdefault(freed_at[owner], []).append(owner)
            if declares_workspace(node.target):
                work = _workspace(node, sizes)
                scratch = (scratch[0] + work[0], scratch[1] + work[1])
        if live_int + scratch[0] > peak:
            peak, peak_step, peak_scratch = live_int + scratch[0], step, scratch[0]
        if exprs is not None:
            exprs.append(base_expr + live_expr + scratch[1])
        for dead in frees.pop(step, []):
            live_int -= owned[dead][0]
            if sizes.symbolic:
                live_expr -= owned[dead][1]
    if peak_step is None:
        return peak, []
    # listed once here rather than copied at each new peak: the peak rises at thousands of steps of a
    # long backward, each copy as long as the live set
    live_at_peak = [(n.name, b) for n, (b, _) in owned.items() if order[n] <= peak_step <= freed_at.get(n, peak_step)]
    if peak_scratch:
        live_at_peak.append((f"{steps[peak_step][-1].name} (workspace)", peak_scratch))
    return peak, [(f"@{steps[peak_step][-1].name}", 0)] + live_at_peak


def _aliases(node: torch.fx.Node) -> list[torch.fx.Node]:
    """Views of `node`, transitively (their readers keep its storage alive)."""
    out, stack = [], [u for u in node.users if is_view(u)]
    while stack:
        v = stack.pop()
        out.append(v)
        stack.extend(u for u in v.users if is_view(u))
    return out


_NO_BYTES = (0, sympy.Integer(0))


def _workspace(node: torch.fx.Node, sizes: _Sizes) -> tuple[int, sympy.Expr]:
    """Bytes the op allocates for itself while it runs (its declared workspace, `ops/library.py`):
    live at the op's step only, beside its outputs. Asked only of ops that declare one: the
    simulation runs over every node of many candidate plans."""
    args, kwargs = torch.fx.map_arg((node.args, node.kwargs), lambda a: a.meta.get("val"))
    parts = [sizes.of(t) for t in workspace_of(node.target, args, kwargs)]
    return sum(p[0] for p in parts), sum((p[1] for p in parts), sympy.Integer(0))


def _alloc(node: torch.fx.Node, sizes: _Sizes) -> tuple[int, sympy.Expr] | None:
    """Bytes a call produces. A multi-output op's elements are counted at their getitems, except the
    ones nobody reads, which are transient at the op itself."""
    if is_host_copy(node):
        return None
    val = node.meta.get("val")
    if isinstance(val, (tuple, list)):
        read = {u.args[1] for u in node.users if is_getitem(u)}
        parts = [sizes.of(v) for i, v in enumerate(val) if isinstance(v, torch.Tensor) and i not in read]
        return (sum(p[0] for p in parts), sum((p[1] for p in parts), sympy.Integer(0))) if parts else None
    return sizes.of(tensor_val(node)) if isinstance(val, torch.Tensor) else None


def simulate_step(
    fw: torch.fx.GraphModule,
    bw: torch.fx.GraphModule,
    num_fwd_outputs: int,
    *,
    fused: bool,
    symbolic: bool = False,
) -> StepMemory:
    """Predict the memory of forward `fw` then backward `bw` as partitioned by AOTAutograd."""
    sizes = _Sizes(symbolic)
    fw_inputs = fw.graph.find_nodes(op="placeholder")
    vals = [tensor_val(p) for p in fw_inputs]
    on_device = any(isinstance(v, torch.Tensor) and v.device.type != "cpu" for v in vals)
    # a step on an accelerator does not hold its host-memory inputs (e.g. an embedding table kept there)
    resident = [sizes.of(v) for v in vals if not (on_device and isinstance(v, torch.Tensor) and v.device.type == "cpu")]
    resident_int = sum(r[0] for r in resident)
    resident_expr = sum((r[1] for r in resident), sympy.Integer(0))
    fw_out = fw.graph.find_nodes(op="output")[0].args[0]
    fw_by_name = {n.name: n for n in fw.graph.nodes}
    user_roots = {storage_root(o) for o in fw_out[:num_fwd_outputs] if isinstance(o, torch.fx.Node)}
    saved_roots = {storage_root(o) for o in fw_out[num_fwd_outputs:] if isinstance(o, torch.fx.Node)}
    user_roots = {r for r in user_roots if r.op != "placeholder" and tensor_val(r) is not None}
    saved_roots = {r for r in saved_roots if r.op != "placeholder" and tensor_val(r) is not None}
    exprs: list[sympy.Expr] | None = [] if symbolic else None

    fw_peak, fw_live = _run(
        fw.graph, sizes, fused=fused, preallocated={}, keep=user_roots | saved_roots, exprs=exprs, base_expr=resident_expr
    )
    forward_steps = len(exprs or [])

    # Backward: saved values arrive as placeholders named like their forward nodes.
    held = {r: sizes.of(tensor_val(r)) for r in user_roots}
    held_int = sum(h[0] for h in held.values())
    held_expr = sum((h[1] for h in held.values()), sympy.Integer(0))
    pre: dict[torch.fx.Node, tuple[int, sympy.Expr]] = {}
    first_view: dict[torch.fx.Node, torch.fx.Node] = {}
    siblings: dict[torch.fx.Node, list[torch.fx.Node]] = {}
    for p in bw.graph.find_nodes(op="placeholder"):
        if tensor_val(p) is None:
            continue
        fw_node = fw_by_name.get(p.name)
        if fw_node is None:  # an incoming gradient (tangent)
            pre[p] = sizes.of(tensor_val(p))
            continue
        root = storage_root(fw_node)
        if root.op == "placeholder" or root in user_roots or is_host_copy(root):
            continue  # resident, held by the caller anyway, or in host memory until its reload
        if root in first_view:  # another view of a storage already counted: extend its lifetime
            siblings[first_view[root]].append(p)
            continue
        first_view[root] = p
        siblings[p] = []
        pre[p] = sizes.of(tensor_val(root))
    bw_peak, bw_live = _run(
        bw.graph,
        sizes,
        fused=fused,
        preallocated=pre,
        keep=set(),
        exprs=exprs,
        base_expr=resident_expr + held_expr,
        siblings=siblings,
    )
    saved = [sizes.of(tensor_val(r)) for r in saved_roots - user_roots if not is_host_copy(r)]
    if fw_peak >= held_int + bw_peak:
        peak_values = fw_live
    else:
        peak_values = bw_live + [(f"(held) {r.name}", b[0]) for r, b in held.items()]
    peak_values = peak_values[:1] + sorted(peak_values[1:], key=lambda v: -v[1])
    return StepMemory(
        resident=resident_int,
        saved=sum(s[0] for s in saved),
        forward_peak=fw_peak,
        backward_peak=held_int + bw_peak,
        peak_exprs=exprs or [],
        saved_expr=sum((s[1] for s in saved), sympy.Integer(0)) if symbolic else None,
        peak_values=peak_values,
        held=held_int,
        held_expr=held_expr,
        forward_steps=forward_steps,
    )


#: Upper end of the search for the longest sequence (2**24 tokens is far past any device).
_MAX_LENGTH = 2**24


def shape_hints(fw: torch.fx.GraphModule) -> dict[sympy.Symbol, int]:
    """The example value of every shape symbol of the graph (empty when all shapes are static)."""
    for p in fw.graph.find_nodes(op="placeholder"):
        env = getattr(getattr(tensor_val(p), "fake_mode", None), "shape_env", None)
        if env is not None:
            values = env.backed_var_to_val if hasattr(env, "backed_var_to_val") else env.var_to_val  # renamed after 2.11
            return {s: int(v) for s, v in values.items()}
    return {}


def peak_at(exprs: list[sympy.Expr], values: dict[sympy.Symbol, int]) -> int:
    """The predicted peak with every shape symbol set: the largest step total."""
    return max(int(e.subs(values)) for e in exprs)


def longest_fitting(
    exprs: list[sympy.Expr], budget: int, hints: dict[sympy.Symbol, int]
) -> tuple[sympy.Symbol, int] | None:
    """Solve max_i exprs_i(s) <= budget for the largest integer s, where s is the sequence symbol
    (the only shape symbol, or the one with the largest example value in `hints`; the others keep
    their example values). None when the sizes are static or not even s = 1 fits."""
    distinct = list({sympy.expand(e) for e in exprs})
    symbols = set().union(*(e.free_symbols for e in distinct)) if distinct else set()
    if not symbols:
        return None
    missing = symbols - set(hints)
    if missing:
        raise ValueError(f"no example value for the shape symbols {sorted(map(str, missing))}")
    seq = max(symbols, key=lambda s: (hints[s], str(s)))
    fixed = {s: hints[s] for s in symbols if s is not seq}
    polys = [sympy.Poly(e.subs(fixed), seq) for e in distinct]
    # each step total is a sum of tensor sizes, polynomials in s with non-negative coefficients,
    # hence non-decreasing: bisect on the integers.
    def fits(n: int) -> bool:
        return max(p.eval(n) for p in polys) <= budget

    if not fits(1):
        return None
    lo, hi = 1, _MAX_LENGTH
    if fits(hi):
        return seq, hi
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return seq, lo
