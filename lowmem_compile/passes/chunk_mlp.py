"""Token-chunked MLP pass: a gated MLP, `down(act(gate(x)) * up(x))` with its LoRA adapters, runs as
`n` pieces along the sequence, so that its [tokens, intermediate] values exist one piece at a time.

Why: under recomputation the largest transient of a layer's backward is its MLP's: the gate and up
outputs, their LoRA terms and their gradients, each tokens × intermediate (224 MiB apiece for
Llama-3-8B at 8192 tokens, 3.5 GiB at 128K). Every op of the block acts on each token alone, so
pieces along the sequence compute the same function, and autograd runs the backward of each piece
(with the recomputation of its forward) on its own.

NF4 projections (`lowmem::nf4_linear`) are dequantized once a block, not once a piece: the pass
emits one `lowmem::nf4_dequantize` per weight (in the activation dtype) before the pieces and a
plain `F.linear` in each piece. Why: `nf4_linear` dequantizes inside the op, in its forward, its
recomputation and its backward, so n pieces paid 3n dequantizations of each weight a step (36 a
layer at 4 pieces, ~50 ms of the 820 ms headline step). The dequantize node is tagged
`MUST_RECOMPUTE`, so the partitioner never saves the [N, K] 16-bit weight for the backward (the
planner and offload leave tagged nodes alone): the backward dequantizes it again, once, and every
piece's backward reads that one copy. The cost: the block's dequantized weights are live together
while its pieces run, forward and backward (three weights of a gated MLP: 336 MiB in bf16 at
Llama-3-8B shape), which the cost model sees as graph values. A block left whole keeps `nf4_linear`.

Runs on the Dynamo graph, after the NF4 lowering. What it matches: a product `h = p * q` whose two
factors derive from linear layers (`F.linear` or `lowmem::nf4_linear`; a weight is a graph input, or
one dequantized or cast in the graph, as `nf4_matmul="graph"` makes them) of one input `x`; the block is
the nodes between `x` and `h` plus the nodes after `h` up to the first one that reads a value from
outside the block (the residual add). Every node must be token-wise (a linear on the last dim, or a
pointwise op or cast whose other operands are numbers or tensors of at most one dimension), every
value in it must have `x`'s leading (token) dims, and exactly one value may leave it. A random op
(dropout while training) skips the site: pieces would draw other masks than the whole.

Counts: blocks chunked, pieces per block, sites skipped with their reason.
"""

from __future__ import annotations

import math
import operator
import re

import torch
import torch.nn.functional as F

from ..cost.sizes import size_hint
from ..options import Options
from ..report import MLPStats
from . import LINEAR_FUNCTIONS, CompileContext, GraphPass, calls, example_value, inherit_provenance
from .linear_nf4 import dequantize_once, is_nf4_linear

#: Tokens per piece under `mlp_chunks="auto"`: matmuls of this many rows still run at full speed.
AUTO_TOKENS_PER_CHUNK = 2048
#: At most this many pieces under "auto": each piece is a copy of the block's nodes, and AOTAutograd
#: and the partitioner scale with the graph (at 131072 tokens, 64 pieces x 32 layers did not compile
#: in 530 s on an H200's host). Past 8 the peak rises again under `remat="full"` (cost model, two
#: layers, lean setup: 32768 tokens 7.36 / 6.87 / 7.45 GiB with 4 / 8 / 16 pieces, 131072 tokens
#: 20.94 with 8 against 23.12 with 16): more pieces, more of the pieces' hidden-size buffers live
#: in the backward, and the block's widest values are already small beside them.
AUTO_MAX_PIECES = 8

_POINTWISE_FUNCTIONS = (
    operator.mul, operator.add, operator.sub, operator.truediv, operator.neg,
    torch.mul, torch.add, torch.sub, torch.div, torch.neg, torch.sigmoid, torch.tanh,
    F.silu, F.gelu, F.relu, F.sigmoid, F.tanh, torch._C._nn.gelu, torch._C._nn.silu,
)  # fmt: skip
_POINTWISE_METHODS = ("mul", "add", "sub", "div", "neg", "sigmoid", "tanh", "to", "float", "half", "bfloat16", "type_as")
_DROPOUT = (F.dropout, torch.dropout)


#: A node name's numeric suffix, as torch.fx numbers repeated names (`mul_5`).
_NAME_SUFFIX = re.compile(r"_\d+$")


class _Skip(Exception):
    """A block the pass cannot split exactly; the message is the report's reason."""


def _is_linear(node: torch.fx.Node) -> bool:
    return calls(node, LINEAR_FUNCTIONS) or is_nf4_linear(node)


def _is_pointwise(node: torch.fx.Node) -> bool:
    return calls(node, _POINTWISE_FUNCTIONS, _POINTWISE_METHODS)


def _is_dropout(node: torch.fx.Node) -> bool:
    return calls(node, _DROPOUT)


def _tensor_inputs(node: torch.fx.Node) -> list[torch.fx.Node]:
    return [a for a in node.all_input_nodes if isinstance(example_value(a), torch.Tensor)]


def _token_dims(node: torch.fx.Node) -> tuple[str, ...] | None:
    val = example_value(node)
    return tuple(map(str, val.shape[:-1])) if isinstance(val, torch.Tensor) and val.dim() >= 2 else None


class ChunkMLPPass(GraphPass):
    name = "chunk_mlp"
    section = "mlp"

    def enabled(self, options: Options) -> bool:
        return options.mlp_chunks not in ("off", "budget")  # "budget": decided before the passes (knob.py)

    def __call__(self, gm: torch.fx.GraphModule, ctx: CompileContext) -> MLPStats:
        graph = gm.graph
        order = {n: i for i, n in enumerate(graph.nodes)}
        chunked, pieces, skipped, taken = 0, 0, [], set()
        for h in [n for n in graph.nodes if calls(n, (operator.mul, torch.mul))]:
            if h in taken or not self._gated(h):
                continue
            try:
                x, block, out = self._block(h)
                n = self._pieces(x, ctx.options.mlp_chunks)
            except _Skip as reason:
                skipped.append(f"{h.name}: {reason}")
                continue
            taken |= block
            if n < 2:
                continue
            self._split(graph, x, sorted(block, key=order.__getitem__), out, n)
            chunked, pieces = chunked + 1, max(pieces, n)
        return MLPStats(chunked=chunked, chunks=pieces, skipped=skipped)

    @staticmethod
    def _gated(h: torch.fx.Node) -> bool:
        """Both factors of `h` come from linear layers (through pointwise ops): a GLU's product."""

        def from_linear(node, depth=0) -> bool:
            if not isinstance(node, torch.fx.Node) or depth > 8:
                return False
            if _is_linear(node):
                return True
            return _is_pointwise(node) and any(from_linear(a, depth + 1) for a in _tensor_inputs(node))

        return len(h.args) == 2 and all(from_linear(a) for a in h.args)

    def _block(self, h: torch.fx.Node) -> tuple[torch.fx.Node, set[torch.fx.Node], torch.fx.Node]:
        """(x, the block's nodes, the one value that leaves it)."""
        block: set[torch.fx.Node] = set()
        inputs: set[torch.fx.Node] = set()
        stack = [h]
        while stack:  # up from h: stop at the activation input of each linear
            node = stack.pop()
            if node in block:
                continue
            self._check_op(node)
            block.add(node)
            tensors = _tensor_inputs(node)
            if _is_linear(node):  # a LoRA adapter's B reads its A: go on; any other input is x
                if _is_linear(node.args[0]):
                    stack.append(node.args[0])
                else:
                    inputs.add(node.args[0])
                continue
            stack += [a for a in tensors if not self._is_operand(a)]
        while len(inputs) > 1:  # a cast or dropout between x and a LoRA adapter joins the block
            unary = [a for a in inputs if (_is_dropout(a) or _is_pointwise(a)) and len(_tensor_inputs(a)) == 1]
            if not unary:
                break
            for a in unary:
                self._check_op(a)
                inputs.discard(a)
                inputs.add(_tensor_inputs(a)[0])
                block.add(a)
        if len(inputs) != 1:
            raise _Skip(f"the linear layers before the product read {len(inputs)} different inputs")
        (x,) = inputs
        grew = True
        while grew:  # down from the block: take every user whose inputs are all inside
            grew = False
            for node in list(block):
                for user in node.users:
                    if user in block or user.op == "output":
                        continue
                    if all(a in block or self._is_operand(a) for a in _tensor_inputs(user)):
                        self._check_op(user)
                        block.add(user)
                        grew = True
        leaving = {n for n in block if n.users.keys() - block}
        if len(leaving) != 1:
            raise _Skip(f"{len(leaving)} values leave the block ({sorted(n.name for n in leaving)})")
        dims = _token_dims(x)
        if dims is None or any(_token_dims(n) != dims for n in block if isinstance(example_value(n), torch.Tensor)):
            raise _Skip("a value in the block does not keep the input's token dimensions")
        return x, block, leaving.pop()

    @classmethod
    def _is_operand(cls, node: torch.fx.Node) -> bool:
        """A value every token shares: a graph input or attribute of at most two dims (a weight, a scale),
        or such a weight dequantized or cast in the graph (`nf4_matmul="graph"` emits both)."""
        val = example_value(node)
        if not isinstance(val, torch.Tensor) or val.dim() > 2:
            return False
        if node.op in ("placeholder", "get_attr"):
            return True
        made = calls(node, (torch.ops.lowmem.nf4_dequantize.default,), ("to",))
        return made and all(cls._is_operand(a) for a in node.all_input_nodes)

    def _check_op(self, node: torch.fx.Node) -> None:
        if _is_linear(node):
            if any(self._is_operand(a) is False for a in _tensor_inputs(node)[1:]):
                raise _Skip(f"{node.name}: a linear whose weight is computed in the graph")
            return
        if _is_dropout(node):
            p = node.kwargs.get("p", node.args[1] if len(node.args) > 1 else 0.5)
            training = node.kwargs.get("training", node.args[2] if len(node.args) > 2 else True)
            if training and p != 0:
                raise _Skip(f"{node.name}: dropout while training (pieces would draw other masks)")
            return
        if not _is_pointwise(node):
            raise _Skip(f"{node.name}: {getattr(node.target, '__name__', node.target)} is not known to act on each token alone")
        for a in _tensor_inputs(node):
            if self._is_operand(a) and example_value(a).dim() > 1:
                raise _Skip(f"{node.name}: a pointwise operand of {example_value(a).dim()} dims could mix tokens")

    @staticmethod
    def _pieces(x: torch.fx.Node, setting: int | str) -> int:
        tokens = math.prod(size_hint(s) for s in example_value(x).shape[:-1])
        if setting == "auto":
            return min(math.ceil(tokens / AUTO_TOKENS_PER_CHUNK), AUTO_MAX_PIECES)
        return int(setting)

    @staticmethod
    def _split(graph: torch.fx.Graph, x, block: list[torch.fx.Node], out: torch.fx.Node, n: int) -> None:
        """Copy the block once per piece of `x` along the sequence, join the pieces' outputs; an NF4
        linear becomes `F.linear` of a weight dequantized once before the pieces."""
        dim = example_value(x).dim() - 2
        order = {node: i for i, node in enumerate(graph.nodes)}
        inside = set(block)
        # in the block's order, not a set's (which follows object ids): the graph, hence its cache
        # key, must be the same in every compile
        operands = dict.fromkeys(a for node in block for a in node.all_input_nodes if a not in inside and a is not x)
        for operand in operands:
            if order[operand] > order[block[0]]:  # a weight dequantized in the graph, next to its linear
                _hoist(operand, block[0], order)
        with graph.inserting_before(block[0]):
            dense = dequantize_once(graph, [node for node in block if is_nf4_linear(node)])
            # `torch.split`, not `tensor_split`: the latter's pieces are slices, whose backward scatters
            # each piece's gradient into a zero tensor the size of `x` (n of them, summed); split's
            # joins the pieces' gradients with one `cat`. The sizes are tensor_split's: the first
            # tokens % n pieces one longer (symbolic token counts included).
            tokens = example_value(x).shape[dim]
            sizes = [(tokens + n - 1 - i) // n for i in range(n)]
            split = graph.call_function(torch.split, (x, sizes), {"dim": dim})
            # Fake values on the new nodes: AOTAutograd's cache takes a method call (`piece.to(...)`)
            # only on a node known to be a tensor, and bypasses the cache for the whole graph otherwise.
            split.meta["example_value"] = torch.split(example_value(x), sizes, dim=dim)
            outs = []
            for i in range(n):
                env = {x: graph.call_function(operator.getitem, (split, i))}
                env[x].meta["example_value"] = split.meta["example_value"][i]
                inherit_provenance(block[0], env[x])
                for node in block:
                    env[node] = _copy_node(graph, node, env, dense.get(node))
                outs.append(env[out])
            joined = graph.call_function(torch.cat, (outs,), {"dim": dim})
            joined.meta["example_value"] = example_value(out)
            inherit_provenance(block[0], split, joined)
        out.replace_all_uses_with(joined)
        for node in reversed(block):
            graph.erase_node(node)


def _hoist(node: torch.fx.Node, before: torch.fx.Node, order: dict[torch.fx.Node, int]) -> None:
    """Move `node`, with the values it reads from after `before`, ahead of `before`: the pieces are
    inserted before the block's first node and read the block's weights, some of which
    (`nf4_matmul="graph"`'s dequantized ones) are computed just before their own linear, inside the
    block's span. Only a block operand is moved, and it reads no value of the block."""
    for a in node.all_input_nodes:
        if order[a] > order[before]:
            _hoist(a, before, order)
    before.prepend(node)
    order[node] = -1  # now ahead of `before`: a second reader does not move it again


def _copy_node(
    graph: torch.fx.Graph, node: torch.fx.Node, env: dict[torch.fx.Node, torch.fx.Node], dense: tuple | None = None
) -> torch.fx.Node:
    """`graph.node_copy(node)` with inputs mapped through `env` (an NF4 linear with `dense`, its
    `(weight, bias)`, as `F.linear`), asking for the name's base (`mul` for `mul_5`): given a taken
    numbered name, torch.fx before 2.13 probes `mul_1`, `mul_2`, ... for a free one, quadratic in the
    copies of an op (113 s for 32 layers x 64 pieces). The name chosen is the one node_copy gives on
    later versions."""
    args, kwargs = torch.fx.map_arg((node.args, node.kwargs), lambda a: env.get(a, a))
    op, target, name = node.op, node.target, _NAME_SUFFIX.sub("", node.name)
    if dense is not None:
        x = args[0] if args else kwargs["x"]
        op, target, args, kwargs, name = "call_function", F.linear, (x, *dense), {}, "linear"
    copy = graph.create_node(op, target, args, kwargs, name, node.type)
    copy.meta = dict(node.meta)
    return copy
