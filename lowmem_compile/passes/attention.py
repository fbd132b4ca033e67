"""Attention pass: replaces SDPA and the eager softmax(QKᵀ)V form by `lowmem::attention`.

Runs first among the pre-autograd passes, on the Dynamo graph (torch IR). Two anchors:

- `scaled_dot_product_attention(q, k, v, attn_mask, dropout_p, is_causal, scale, enable_gqa)`;
- the eager form Hugging Face writes: `matmul(q, k.transpose(2, 3))`, times (or divided by) a
  constant scale, plus an optional mask, `softmax(dim=-1, dtype=float32)`, `.to(dtype)`, dropout,
  `matmul(·, v)`. The anchor is the softmax; the site is the final matmul.

On either, K and V are taken from *before* HF's `repeat_kv` (`x[:, :, None].expand(...).reshape(...)`,
or `repeat_interleave(n, dim=1)`), so the op reads and keeps them at the KV-head count. The eager
form's Gemma 2 logit softcap (`tanh(x / c) * c` between the scale and the mask) becomes the op's
`softcap`. A mask that HF's masking_utils built from a causal term, optionally a sliding window, a
packed-documents term and a key-padding term (attention_masks.py proves each from the graph, with
no per-model code) becomes `causal=True` with the op's `window`, `segments` (the document ids the
graph computes from position ids) and that [B, 1, 1, Sk] key-padding term as its mask: the kernel
skips the tiles above the diagonal, outside the window and across documents, and no S x S mask is
read. On the eager form this is done only without a padding term (a fully padded row averages all
keys there, which causal cannot express). Any other mask is passed through as given (bool or
additive). Invariant: the replaced site computes the same function (exactly at kv_bits=16; with
K/V rounded to kv_bits otherwise). A site it cannot take (dropout > 0, attention weights used
elsewhere, a non-constant scale, a mask that needs a gradient, causal with Sq != Sk, a head dim or
dtype the CUDA kernel lacks) stays as it is and is listed with the reason. Counts: `replaced`,
`causal_masks` (sites whose mask was lowered to causal), of those `window_masks` (with a sliding
window) and `packed_masks` (with documents), `general_masks` (sites that still read a full
[Sq, Sk] mask tile by tile: the slow path, named in the report), `skipped`.
"""

from __future__ import annotations

import dataclasses
import math
import operator

import torch
import torch.fx

from ..options import Options
from ..report import AttentionStats
from . import CompileContext, GraphPass, calls, example_value, inherit_provenance
from .attention_masks import lower_mask

_SDPA = {torch._C._nn.scaled_dot_product_attention, torch.nn.functional.scaled_dot_product_attention}
_SOFTMAX = {torch.nn.functional.softmax, torch.softmax, torch.Tensor.softmax}
_MATMUL = {torch.matmul, operator.matmul, torch.Tensor.matmul}
_DROPOUT = {torch.nn.functional.dropout}


@dataclasses.dataclass
class _Site:
    """One attention site: the node whose value it replaces, the op's inputs, the nodes it frees."""

    anchor: torch.fx.Node
    q: torch.fx.Node
    k: torch.fx.Node
    v: torch.fx.Node
    mask: torch.fx.Node | None
    causal: bool
    scale: float
    pattern: list[torch.fx.Node]
    causal_mask: bool = False
    window: int = 0
    segments: torch.fx.Node | None = None
    softcap: float = 0.0


class _Skip(Exception):
    """A site that stays as it is; the message is the report's reason."""


def _arg(node, index: int, name: str, default=None):
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def _strip_repeat_kv(node, pattern):
    """The tensor before HF's repeat_kv, or `node` itself when it is no repeat."""
    if calls(node, {torch.repeat_interleave}, ("repeat_interleave",)) and _arg(node, 2, "dim") == 1:
        pattern.append(node)
        return node.args[0]
    if not (calls(node, methods=("reshape",)) and len(node.users) == 1):
        return node
    expand = node.args[0]
    if not (calls(expand, methods=("expand",)) and len(expand.users) == 1):
        return node
    index = expand.args[0]
    if not (calls(index, {operator.getitem}) and len(index.users) == 1):
        return node
    key = index.args[1]
    if not (isinstance(key, tuple) and len(key) == 5 and key[2] is None):
        return node
    pattern += [node, expand, index]
    return index.args[0]


def _single_user(node) -> torch.fx.Node:
    if len(node.users) != 1:
        raise _Skip(f"{node.name} has {len(node.users)} users (attention weights used elsewhere)")
    return next(iter(node.users))


def _constant(x, what: str) -> float:
    if isinstance(x, (int, float)) and not isinstance(x, bool):
        return float(x)
    raise _Skip(f"{what} is not a constant ({x})")


def _match_sdpa(node) -> _Site:
    q, k, v = node.args[:3]
    mask = _arg(node, 3, "attn_mask")
    if _constant(_arg(node, 4, "dropout_p", 0.0), "dropout_p") != 0.0:
        raise _Skip(f"dropout_p={_arg(node, 4, 'dropout_p')} > 0")
    causal = bool(_arg(node, 5, "is_causal", False))
    if causal and mask is not None:
        raise _Skip("both is_causal and attn_mask")
    scale = _arg(node, 6, "scale")
    pattern = [node]
    k0, v0 = _strip_repeat_kv(k, pattern), _strip_repeat_kv(v, pattern)
    qv, kv = example_value(q), example_value(k)
    if k0 is k and not _arg(node, 7, "enable_gqa", False) and qv is not None and kv is not None and qv.shape[1] != kv.shape[1]:
        raise _Skip("query and key head counts differ without enable_gqa")
    d = example_value(q).shape[-1] if example_value(q) is not None else None
    scale = 1.0 / math.sqrt(d) if scale is None and d is not None else scale
    return _Site(node, q, k0, v0, mask, causal, _constant(scale, "scale"), pattern)


def _match_eager(softmax) -> _Site:
    """softmax -> [to] -> [dropout] -> matmul(., v) forward; scores <- [mask add] <- [scale] <- q @ kᵀ back."""
    if _arg(softmax, 1, "dim") not in (-1, 3):
        raise _Skip(f"softmax over dim {_arg(softmax, 1, 'dim')}")
    pattern, node = [softmax], _single_user(softmax)
    while calls(node, _DROPOUT, ("to", "type_as")):
        if calls(node, _DROPOUT) and _arg(node, 2, "training", True) and _constant(_arg(node, 1, "p", 0.5), "dropout p") != 0.0:
            raise _Skip(f"dropout p={_arg(node, 1, 'p')} in training")
        pattern.append(node)
        node = _single_user(node)
    if not (calls(node, _MATMUL, ("matmul",)) and node.args[0] is pattern[-1]):
        raise _Skip(f"softmax output feeds {node.name}, not a matmul with V")
    anchor, v = node, node.args[1]
    scores, mask = softmax.args[0], None
    if calls(scores, {operator.add, torch.add}, ("add",)) and len(scores.args) == 2:
        pattern.append(scores)
        scores, mask = scores.args
        if not isinstance(mask, torch.fx.Node):
            raise _Skip("mask is not a tensor")
    softcap, scores = _softcap(scores, pattern)
    scale = 1.0
    if calls(scores, {operator.mul, torch.mul}, ("mul",)) and not isinstance(scores.args[1], torch.fx.Node):
        pattern.append(scores)
        scale, scores = _constant(scores.args[1], "scale"), scores.args[0]
    elif calls(scores, {operator.truediv, torch.div}, ("div",)) and not isinstance(scores.args[1], torch.fx.Node):
        pattern.append(scores)
        scale, scores = 1.0 / _constant(scores.args[1], "scale divisor"), scores.args[0]
    if not calls(scores, _MATMUL, ("matmul",)):
        raise _Skip(f"softmax input is not a scaled q @ kᵀ ({scores.name})")
    q, kt = scores.args
    if not (calls(kt, {torch.transpose}, ("transpose",)) and set(kt.args[1:]) in ({2, 3}, {-1, -2})):
        raise _Skip("scores are not q @ k.transpose(2, 3)")
    for n in (scores, kt):
        _single_user(n)
    pattern += [scores, kt, anchor]
    k0, v0 = _strip_repeat_kv(kt.args[0], pattern), _strip_repeat_kv(v, pattern)
    return _Site(anchor, q, k0, v0, mask, False, scale, pattern, softcap=softcap)


def _softcap(scores, pattern) -> tuple[float, torch.fx.Node]:
    """Gemma 2's logit softcap `tanh(x / c) * c` on `scores`: (c, x); (0, scores) when there is none."""
    if not (calls(scores, {operator.mul, torch.mul}, ("mul",)) and calls(scores.args[0], {torch.tanh}, ("tanh",))):
        return 0.0, scores
    tanh = scores.args[0]
    div = tanh.args[0]
    cap = scores.args[1]
    if not (calls(div, {operator.truediv, torch.div}, ("div",)) and type(cap) in (int, float) and div.args[1] == cap > 0):
        return 0.0, scores
    for n in (tanh, div):
        _single_user(n)
    pattern += [scores, tanh, div]
    return float(cap), div.args[0]

def _lower_mask(site: _Site, additive: bool) -> None:
    """Make `site` causal, with its window, documents and key-padding term, when its mask is
    provably HF's (attention_masks.py); leave it as it is otherwise."""
    found = lower_mask(site.mask, example_value(site.q), example_value(site.k), additive)
    if found is None:
        return
    site.mask, site.causal, site.causal_mask = found.padding, True, True
    site.window, site.segments = found.window, found.segments
    site.pattern += found.nodes


def _check(site: _Site) -> None:
    """Shapes and dtypes the op accepts, read from Dynamo's example values."""
    q, k, v, mask = (example_value(n) for n in (site.q, site.k, site.v, site.mask))
    if q is None or k is None or v is None or (site.mask is not None and mask is None):
        raise _Skip("no example values for q, k, v or the mask")
    if site.segments is not None and example_value(site.segments) is None:
        raise _Skip("no example value for the document ids")
    if q.dim() != 4 or k.dim() != 4 or v.shape != k.shape:
        raise _Skip(f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} are not [B, H, S, D] with k ~ v")
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise _Skip(f"dtypes {q.dtype}, {k.dtype}, {v.dtype}")
    if q.shape[1] % k.shape[1] or q.shape[-1] != k.shape[-1] or q.shape[-1] % 2:
        raise _Skip(f"heads {q.shape[1]}/{k.shape[1]} or head dims {q.shape[-1]}/{k.shape[-1]} unsupported")
    if site.causal and q.shape[2] != k.shape[2]:
        raise _Skip("causal with Sq != Sk")
    if mask is not None:
        if mask.dtype != torch.bool and not mask.is_floating_point():
            raise _Skip(f"mask dtype {mask.dtype}")
        if mask.requires_grad:
            raise _Skip("mask requires grad")
        try:
            torch.broadcast_shapes(mask.shape, (q.shape[0], q.shape[1], q.shape[2], k.shape[2]))
        except RuntimeError:
            raise _Skip(f"mask {tuple(mask.shape)} does not broadcast to the scores") from None
    if q.device.type == "cuda":
        from ..codegen.attention_kv4 import supports

        if not supports(q.shape[-1], q.dtype):
            raise _Skip(f"head dim {q.shape[-1]} / {q.dtype} has no CUDA kernel")


def _replace(gm: torch.fx.GraphModule, site: _Site, kv_bits: int) -> set[torch.fx.Node]:
    """Insert the op before the site's node, reroute its users, erase what the pattern left dead."""
    graph = gm.graph
    kwargs = {"causal": site.causal, "scale": site.scale, "kv_bits": kv_bits, "window": site.window, "softcap": site.softcap}
    args = (site.q, site.k, site.v, site.mask, site.segments)
    with graph.inserting_before(site.anchor):
        op = graph.call_function(torch.ops.lowmem.attention.default, args, kwargs)
        out = graph.call_function(operator.getitem, (op, 0))
    inherit_provenance(site.anchor, op, out)
    q = example_value(site.q)
    fake_mode = getattr(q, "fake_mode", None)
    if fake_mode is not None:
        with fake_mode:
            value = torch.ops.lowmem.attention.default(*(example_value(n) for n in args), **kwargs)
        op.meta["example_value"], out.meta["example_value"] = value, value[0]
    site.anchor.replace_all_uses_with(out)
    erased = set()
    for node in sorted(set(site.pattern), key=lambda n: -_position(graph, n)):
        if not node.users:
            graph.erase_node(node)
            erased.add(node)
    return erased


def _position(graph, node) -> int:
    for i, n in enumerate(graph.nodes):
        if n is node:
            return i
    raise KeyError(node)


class AttentionPass(GraphPass):
    name = "attention"
    section = "attention"

    def enabled(self, options: Options) -> bool:
        return options.attention != "off"

    def __call__(self, gm: torch.fx.GraphModule, ctx: CompileContext) -> AttentionStats:
        counts, skipped, erased = dict.fromkeys(("replaced", "causal_masks", "general_masks", "window_masks", "packed_masks"), 0), [], set()
        for node in list(gm.graph.nodes):
            if node in erased:
                continue
            try:
                if calls(node, _SDPA):
                    site = _match_sdpa(node)
                    _lower_mask(site, additive=False)
                elif calls(node, _SOFTMAX, ("softmax",)):
                    site = _match_eager(node)
                    _lower_mask(site, additive=True)
                else:
                    continue
                _check(site)
            except _Skip as reason:
                skipped.append(f"{node.name}: {reason}")
                continue
            erased |= _replace(gm, site, ctx.options.kv_bits)
            counts["replaced"] += 1
            counts["causal_masks"] += site.causal_mask
            counts["general_masks"] += _reads_mask_tiles(site.mask)
            counts["window_masks"] += site.window > 0
            counts["packed_masks"] += site.segments is not None
        return AttentionStats(**counts, skipped=skipped)


def _reads_mask_tiles(mask) -> bool:
    """The mask differs across query rows (not a [.., 1, Sk] key-padding row): the kernel's general path."""
    value = example_value(mask)
    # a symbolic length (packed rows of varying size) must not turn the report's count symbolic
    return value is not None and value.dim() >= 2 and bool(value.shape[-2] != 1)
