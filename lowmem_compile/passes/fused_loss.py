"""Fused-loss pass: the LM head projection that feeds cross-entropy becomes one
`lowmem::linear_cross_entropy`, so the [tokens, vocab] logits never exist in fp32 and nothing of
that size is kept for the backward.

Runs on the Dynamo graph (torch IR, before AOTAutograd), last of the pre-autograd passes. It starts
from each `F.cross_entropy` node and walks back to a `linear` through the ops that Hugging Face's
causal-LM loss and plain user code put between them: reshapes that keep the vocabulary as the last
dimension (view/reshape/flatten/contiguous), the fp32 upcast (`.float()`, `.to(float32)`), and
Gemma 2's logit softcapping `cap * tanh(logits / cap)`. The labels (padded and shifted by the model,
if it does) stay in the graph as they are, and so does whatever follows the loss (division by
`num_items_in_batch`).

Invariants: a site is rewritten only when the loss is exactly what the op computes (no class
weights, no label smoothing, reduction "mean" or "sum", fp32 cross-entropy) and the logits have no
user but the loss chain and the graph's output; every other site is left alone and its reason goes
to the report. Logits the graph returns: with `logits="keep"` the op returns them in the model dtype
(not differentiable, never upcast, never saved); with `logits="drop"` that output becomes None.

Counts: sites fused, the chunk size chosen (tokens), sites skipped with their reason.
"""

from __future__ import annotations

import inspect
import operator

import torch
import torch.nn.functional as F
from torch.utils._pytree import tree_map

from ..options import Options
from ..report import LossStats
from . import LINEAR_FUNCTIONS, CompileContext, GraphPass, calls, example_value, inherit_provenance

_RESHAPE_METHODS = ("view", "reshape", "flatten", "contiguous", "float", "to", "type")
_RESHAPE_FUNCTIONS = (torch.reshape, torch.flatten)
_DIV = (operator.truediv, torch.div, torch.true_divide)
_MUL = (operator.mul, torch.mul)
_TANH = (torch.tanh, F.tanh)
_CE_SIGNATURE = inspect.signature(F.cross_entropy)


class _Skip(Exception):
    """A cross-entropy site the op cannot compute exactly; the message is the report's reason."""


def _const_operand(node, functions, method):
    """(tensor operand, number) of a binary op by a constant, else None."""
    if not calls(node, functions, (method,)) or node.kwargs or len(node.args) != 2:
        return None
    a, b = node.args
    if isinstance(b, (int, float)) and isinstance(a, torch.fx.Node):
        return a, float(b)
    if isinstance(a, (int, float)) and isinstance(b, torch.fx.Node) and method == "mul":
        return b, float(a)
    return None


def _softcap(node):
    """(input, cap) when `node` is cap * tanh(input / cap), else None."""
    mul = _const_operand(node, _MUL, "mul")
    if mul is None or not calls(mul[0], _TANH, ("tanh",)) or len(mul[0].users) != 1:
        return None
    div = _const_operand(mul[0].args[0], _DIV, "div")
    if div is None or div[1] != mul[1] or len(mul[0].args[0].users) != 1:
        return None
    return div[0], mul[1], [mul[0], mul[0].args[0]]


class FusedLossPass(GraphPass):
    name = "fused_loss"
    section = "loss"

    def enabled(self, options: Options) -> bool:
        return options.fused_loss == "on"

    def __call__(self, gm: torch.fx.GraphModule, ctx: CompileContext) -> LossStats:
        from ..ops.linear_cross_entropy import choose_chunk_tokens, linear_cross_entropy

        graph = gm.graph
        fused, chunk, skipped = 0, 0, []
        for ce in [n for n in graph.nodes if calls(n, (F.cross_entropy,))]:
            try:
                site = self._match(ce)
            except _Skip as reason:
                skipped.append(f"{ce.name}: {reason}")
                continue
            head, linear, hidden, weight, bias, cap, dead = site
            w_val, h_val, head_val = example_value(weight), example_value(hidden), example_value(linear)
            vocab = w_val.shape[0]
            site_chunk = choose_chunk_tokens(vocab, w_val.element_size())
            need = bool(head_val.requires_grad)
            out_node = graph.find_nodes(op="output")[0]
            returned = head in out_node.all_input_nodes
            keep = returned and ctx.options.logits != "drop"  # "budget": decided before the passes (knob.py)
            args = _CE_SIGNATURE.bind(*ce.args, **ce.kwargs).arguments
            with graph.inserting_before(ce):
                op = graph.call_function(
                    linear_cross_entropy.default,
                    (
                        hidden, weight, bias, args["target"], args.get("ignore_index", -100),
                        args.get("reduction", "mean"), cap, site_chunk,
                        need and bool(h_val.requires_grad), need and bool(w_val.requires_grad),
                        need and bias is not None and bool(example_value(bias).requires_grad), keep,
                    ),
                )  # fmt: skip
                loss = graph.call_function(operator.getitem, (op, 0))
                logits = graph.call_function(operator.getitem, (op, 1)) if keep else None
            inherit_provenance(ce, op, loss, logits)
            ce.replace_all_uses_with(loss)
            if returned:
                out_node.args = tree_map(lambda a: logits if a is head else a, out_node.args)
            for node in [ce, *dead]:
                graph.erase_node(node)
            fused, chunk = fused + 1, max(chunk, site_chunk)
        if fused:
            graph.eliminate_dead_code()
        return LossStats(fused=fused, chunk_tokens=chunk, skipped=skipped)

    def _match(self, ce: torch.fx.Node):
        """(head output, linear, hidden, weight, bias, softcap, nodes to erase from the loss back)."""
        try:
            args = _CE_SIGNATURE.bind(*ce.args, **ce.kwargs).arguments
        except TypeError as e:
            raise _Skip(f"unexpected cross_entropy arguments ({e})") from None
        for key, default in (("weight", None), ("size_average", None), ("reduce", None), ("label_smoothing", 0.0)):
            if args.get(key, default) != default:
                raise _Skip(f"cross_entropy with {key}={args[key]!r} is not fused")
        if args.get("reduction", "mean") not in ("mean", "sum"):
            raise _Skip(f"cross_entropy with reduction={args['reduction']!r} is not fused")
        if not isinstance(args.get("ignore_index", -100), int):
            raise _Skip("cross_entropy with a traced ignore_index is not fused")
        ce_in, target = example_value(args["input"]), example_value(args["target"])
        if ce_in is None or ce_in.dim() != 2 or ce_in.dtype != torch.float32:
            raise _Skip("cross_entropy input is not 2-D fp32 logits")
        if target is None or target.dim() != 1 or target.dtype != torch.int64:
            raise _Skip("cross_entropy target is not 1-D int64 class indices")
        vocab = ce_in.shape[-1]

        dead, node = [], args["input"]
        while calls(node, _RESHAPE_FUNCTIONS, _RESHAPE_METHODS):
            val = example_value(node)
            if len(node.users) != 1 or val is None or val.dim() < 1 or val.shape[-1] != vocab:
                raise _Skip(f"{node.name} between the head and the loss has other users or moves the vocabulary dimension")
            dead.append(node)
            node = node.args[0]
        head, cap = node, None
        capped = _softcap(node)
        if capped is not None:
            node, cap, tanh_div = capped
            dead += [head, *tanh_div]
        if not calls(node, LINEAR_FUNCTIONS):
            raise _Skip(f"cross_entropy input comes from {getattr(node, 'target', node)}, not from a linear projection")
        if cap is not None and len(node.users) != 1:
            raise _Skip("the logits before softcapping have other users")
        dead.append(node)
        others = [u for u in head.users if u.op != "output" and u not in dead]
        if others:
            raise _Skip(f"the logits are also used by {[u.name for u in others]}")
        hidden, weight, *rest = [*node.args, *node.kwargs.values()]
        bias = rest[0] if rest else None
        h_val, w_val, b_val = example_value(hidden), example_value(weight), example_value(bias)
        if h_val is None or w_val is None or w_val.dim() != 2 or w_val.shape[0] != vocab:
            raise _Skip("the head's weight is not a [vocab, hidden] tensor")
        if h_val.dtype != w_val.dtype or (bias is not None and (b_val is None or b_val.dtype != w_val.dtype)):
            raise _Skip("the head's hidden states, weight and bias differ in dtype")
        if h_val.dtype not in (torch.float16, torch.bfloat16, torch.float32):
            raise _Skip(f"the head runs in {h_val.dtype}")
        return head, node, hidden, weight, bias, cap, dead
