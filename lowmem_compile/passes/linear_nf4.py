"""NF4 pass: lowers linear layers whose frozen weight is stored in NF4 to `lowmem::nf4_linear`.

Runs on the Dynamo graph, before AOTAutograd. What it matches: a bitsandbytes `Linear4bit` reaches
Dynamo as one `autograd_function_apply` higher-order op whose forward body calls
`bitsandbytes::gemm_4bit(A, B, shapeB, absmax, blocksize, quant_type, bias, absmax_8bit, absmax_code,
absmax_offset)` and whose backward body dequantizes W and multiplies. The pass reads the operands of
that call (packed weight, absmax or nested absmax + code + offset, bias) back to the op's inputs and
replaces the whole op by one `nf4_linear` node, whose autograd saves only the resident packed weight.
A bare `gemm_4bit` (bitsandbytes skips autograd when nothing needs a gradient, e.g. the first layer's
projections under frozen embeddings) is replaced the same way. Layers made by `quantize_` already
call `nf4_linear`; they are counted, not rewritten.

With `nf4_matmul="graph"`, every `nf4_linear` whose token count (known at compile time) would not
take the op's GEMV kernels (more than 16 tokens, `codegen.nf4_matmul.use_gemv`) then becomes `F.linear` of a weight from one `nf4_dequantize` node: Inductor runs the matmul
from its own code instead of one Python op call doing both, and under recomputation the backward
dequantizes once for the recomputed forward and the gradient (the op does it twice). The node is
tagged MUST_RECOMPUTE, so no plan saves the 16-bit weight (`dequantize_once`, which the chunked MLP
uses too). Fewer tokens keep the op: its GEMV kernels read the 4-bit weight once.

Invariants: the graph computes the same function (the dequantized W is bit-identical to bitsandbytes');
a site it cannot take (FP4, an unexpected body, a non-float activation) keeps its bitsandbytes op and
is listed in `NF4Stats.skipped` with the reason. Counts: layers lowered (including `quantize_` ones),
bytes of the weight in 16 bits (`bytes_before`) and in NF4 as stored (`bytes_after`).
"""

from __future__ import annotations

import math
import operator

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import CheckpointPolicy

from ..options import Options
from ..report import NF4Stats
from . import CompileContext, GraphPass, calls, example_value, inherit_provenance

_GEMM_4BIT = "bitsandbytes::gemm_4bit"
_NF4_LINEAR = torch.ops.lowmem.nf4_linear.default._schema
_BODY_OK = {"view", "reshape", torch._C._set_grad_enabled}


def _is_op(node: torch.fx.Node, qualname: str) -> bool:
    schema = getattr(node.target, "_schema", None)
    return node.op == "call_function" and schema is not None and schema.name == qualname


def _nbytes(node) -> int:
    value = node.meta.get("example_value", node.meta.get("val")) if isinstance(node, torch.fx.Node) else None
    return value.numel() * value.element_size() if isinstance(value, torch.Tensor) else 0


def is_nf4_linear(node: torch.fx.Node) -> bool:
    """`node` calls `lowmem::nf4_linear`, as its overload packet or its default overload (a graph may
    hold either)."""
    nf4 = torch.ops.lowmem.nf4_linear
    return calls(node, (nf4, nf4.default))


def _named_args(node: torch.fx.Node, schema: torch._C.FunctionSchema) -> dict:
    """A call's arguments by the names `schema` gives them."""
    return {**dict(zip((a.name for a in schema.arguments), node.args)), **node.kwargs}


def _gemm_args(gemm: torch.fx.Node) -> dict:
    return _named_args(gemm, gemm.target._schema)


def _nf4_args(gemm: torch.fx.Node, resolve) -> tuple:
    """`nf4_linear`'s arguments from a `gemm_4bit` call, each value passed through `resolve`."""
    arg = _gemm_args(gemm)
    nested = arg.get("absmax_8bit") is not None
    absmax, absmax2, code2, offset = (
        (arg["absmax_8bit"], arg["absmax"], arg["absmax_code"], arg["absmax_offset"]) if nested
        else (arg["absmax"], None, None, None)
    )
    shape = [int(s) for s in arg["shapeB"]]
    return (resolve(arg["A"]), resolve(arg["B"]), resolve(absmax), shape, int(arg["blocksize"]),
            resolve(arg.get("bias")), resolve(absmax2), resolve(code2), resolve(offset))


class LinearNF4Pass(GraphPass):
    name = "linear_nf4"
    section = "nf4"

    def enabled(self, options: Options) -> bool:
        return options.nf4 != "off"

    def __call__(self, gm: torch.fx.GraphModule, ctx: CompileContext) -> NF4Stats:
        if ctx.options.nf4 == "quantize":
            raise ValueError(
                "lowmem option nf4='quantize' is not supported: a compiler backend receives the 16-bit weights "
                "as graph inputs owned by the model, so it can neither free them nor change them without "
                "breaking Dynamo's guards. Call lowmem_compile.quantize_(model) before torch.compile, "
                "then compile with nf4='auto'."
            )
        self.lowered, self.skipped, self.before, self.after = 0, [], 0, 0
        self._seen: set[torch.fx.Node] = set()
        for node in list(gm.graph.nodes):
            if node.op != "call_function":
                continue
            if node.target is torch.ops.higher_order.autograd_function_apply:
                self._lower_bnb(gm, node)
            elif _is_op(node, _GEMM_4BIT):  # bnb calls gemm_4bit directly when nothing needs a gradient
                self._lower_gemm(gm, node)
            elif is_nf4_linear(node):
                self._count(node.args[1], node.args[2:3] + tuple(node.args[6:]), node.args[3])
        if ctx.options.nf4_matmul == "graph":
            _to_graph_matmuls(gm.graph)
        return NF4Stats(lowered=self.lowered, bytes_before=self.before, bytes_after=self.after, skipped=self.skipped)

    def _count(self, packed, others, shape) -> None:
        self.lowered += 1
        if packed in self._seen:  # one weight used at several sites is stored once
            return
        self._seen.add(packed)
        self.before += 2 * math.prod(int(s) for s in shape)
        self.after += _nbytes(packed) + sum(_nbytes(t) for t in others)

    def _lower_bnb(self, gm: torch.fx.GraphModule, hop: torch.fx.Node) -> None:
        fwd_body = getattr(gm, hop.args[0].target)
        gemms = [n for n in fwd_body.graph.nodes if _is_op(n, _GEMM_4BIT)]
        if not gemms:
            return  # some other autograd.Function
        site = f"{hop.name} ({hop.meta.get('stack_trace', '').strip().splitlines()[-1:] or ['?']})"
        reason = self._why_not(fwd_body, gemms, hop)
        if reason:
            self.skipped.append(f"{site}: {reason}; kept the bitsandbytes op")
            return
        gemm = gemms[0]
        placeholders = [n for n in fwd_body.graph.nodes if n.op == "placeholder"]
        outer = dict(zip(placeholders, hop.args[2:]))

        def resolve(value):
            while isinstance(value, torch.fx.Node) and value.op == "call_method":
                value = value.args[0]  # a view of a placeholder: the op takes the packed bytes in any shape
            return outer[value] if isinstance(value, torch.fx.Node) else value

        args = _nf4_args(gemm, resolve)
        getitems = list(hop.users)
        with gm.graph.inserting_before(hop):
            new = gm.graph.call_function(torch.ops.lowmem.nf4_linear.default, args)
        new.meta = dict(getitems[0].meta)
        for g in getitems:
            g.replace_all_uses_with(new)
            gm.graph.erase_node(g)
        bodies = hop.args[:2]
        gm.graph.erase_node(hop)
        for body in bodies:
            if not body.users:
                gm.graph.erase_node(body)
                gm.delete_submodule(body.target)
        self._count(args[1], [a for a in (args[2], *args[6:]) if a is not None], args[3])

    def _lower_gemm(self, gm: torch.fx.GraphModule, gemm: torch.fx.Node) -> None:
        """A bare `gemm_4bit` in the graph (no autograd around it): same replacement, in place."""
        arg = _gemm_args(gemm)
        if arg.get("quant_type") != "nf4":
            self.skipped.append(f"{gemm.name}: quant_type {arg.get('quant_type')!r} (only nf4 is lowered)")
            return
        args = _nf4_args(gemm, lambda v: v)
        with gm.graph.inserting_before(gemm):
            new = gm.graph.call_function(torch.ops.lowmem.nf4_linear.default, args)
        new.meta = dict(gemm.meta)
        gemm.replace_all_uses_with(new)
        gm.graph.erase_node(gemm)
        self._count(args[1], [a for a in (args[2], *args[6:]) if a is not None], args[3])

    @staticmethod
    def _why_not(fwd_body: torch.fx.GraphModule, gemms: list[torch.fx.Node], hop: torch.fx.Node) -> str | None:
        if len(gemms) != 1:
            return f"{len(gemms)} gemm_4bit calls in one autograd function"
        gemm = gemms[0]
        arg = _gemm_args(gemm)
        if arg.get("quant_type") != "nf4":
            return f"quant_type {arg.get('quant_type')!r} (only nf4 is lowered)"
        others = [n for n in fwd_body.graph.nodes if n.op in ("call_function", "call_method") and n is not gemm]
        if any(n.target not in _BODY_OK for n in others):
            return "the autograd function does more than gemm_4bit: " + ", ".join(str(n.target) for n in others)
        out = next(n for n in fwd_body.graph.nodes if n.op == "output").args[0]
        # torch 2.11 may list more forward outputs after the result (bnb's weight); only output 0 is used
        if not (isinstance(out, tuple) and out and isinstance(out[0], tuple) and out[0] and out[0][0] is gemm):
            return "its output is not the gemm_4bit result"
        if len(arg.get("shapeB", ())) != 2 or any(not isinstance(s, int) for s in arg["shapeB"]):
            return f"weight shape {arg.get('shapeB')!r} is not a constant [N, K]"
        if any(u.target is not operator.getitem or u.args[1] != 0 for u in hop.users):
            return "its result is used other than as output 0"
        x = example_value(arg["A"])
        if x is None or x.dtype not in (torch.bfloat16, torch.float16, torch.float32):
            return f"activation dtype {getattr(x, 'dtype', None)} (bf16, fp16, fp32 only)"
        if not hop.users:
            return "its result is unused"
        return None


def _tokens(x: torch.fx.Node, features: int) -> int | None:
    """Rows of the matmul (tokens), or None where the count is not known at compile time."""
    numel = example_value(x).numel()
    return numel // features if isinstance(numel, int) else None


def _to_graph_matmuls(graph: torch.fx.Graph) -> None:
    """`nf4_matmul="graph"`: each `nf4_linear` that would not run the op's GEMV kernels becomes
    `F.linear` of its weight dequantized by a node of its own."""
    from ..codegen.nf4_matmul import use_gemv

    for node in list(graph.nodes):
        if not is_nf4_linear(node):
            continue
        arg = _named_args(node, _NF4_LINEAR)
        features = int(arg["shape"][1])
        tokens = _tokens(arg["x"], features)
        if tokens is None or use_gemv(tokens, features, None):
            continue
        with graph.inserting_before(node):
            weight, bias = dequantize_once(graph, [node])[node]
            dense = graph.call_function(F.linear, (arg["x"], weight, bias))
        dense.meta = dict(node.meta)
        node.replace_all_uses_with(dense)
        graph.erase_node(node)


def dequantize_once(graph: torch.fx.Graph, linears: list[torch.fx.Node]) -> dict[torch.fx.Node, tuple]:
    """For each NF4 linear, `(weight, bias)` for `F.linear`: the weight one `nf4_dequantize` node per
    distinct NF4 weight and activation dtype, tagged MUST_RECOMPUTE (never saved for the backward);
    the bias cast to the activation dtype where it differs, as `nf4_linear` casts it. Inserted at the
    graph's insertion point."""
    made: dict[tuple, torch.fx.Node] = {}
    dense = {}
    for node in linears:
        arg = _named_args(node, _NF4_LINEAR)
        dtype = example_value(arg["x"]).dtype
        key = (arg["packed"], arg["absmax"], tuple(arg["shape"]), arg["blocksize"], dtype,
               *(arg.get(k) for k in ("absmax2", "code2", "offset")))
        if key not in made:
            weight = graph.call_function(torch.ops.lowmem.nf4_dequantize.default, key)
            weight.meta["example_value"] = example_value(arg["packed"]).new_empty(key[2], dtype=dtype)
            weight.meta["recompute"] = CheckpointPolicy.MUST_RECOMPUTE
            inherit_provenance(node, weight)
            made[key] = weight
        bias = arg.get("bias")
        if bias is not None and example_value(bias).dtype != dtype:
            cast = graph.call_method("to", (bias, dtype))
            cast.meta["example_value"] = example_value(bias).to(dtype)
            inherit_provenance(node, cast)
            bias = cast
        dense[node] = (made[key], bias)
    return dense
