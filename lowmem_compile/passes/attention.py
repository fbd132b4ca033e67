"""Attention pass: replaces SDPA and the eager softmax(QKᵀ)V form by `lowmem::attention`.

Runs first among the pre-autograd passes, on the Dynamo graph (torch IR). Two anchors:

- `scaled_dot_product_attention(q, k, v, attn_mask, dropout_p, is_causal, scale, enable_gqa)`;
- the eager form Hugging Face writes: `matmul(q, k.transpose(2, 3))`, times (or divided by) a
  constant scale, plus an optional mask, `softmax(dim=-1, dtype=float32)`, `.to(dtype)`, dropout,
  `matmul(·, v)`. The anchor is the softmax; the site is the final matmul.

On either, K and V are taken from *before* HF's `repeat_kv` (`x[:, :, None].expand(...).reshape(...)`,
or `repeat_interleave(n, dim=1)`), so the op reads and keeps them at the KV-head count. A mask that
HF's masking_utils built as `(kv_idx <= q_idx) & attention_mask[b, kv_idx]` (positions from 0,
Sq == Sk) becomes `causal=True` plus that [B, 1, 1, Sk] key-padding term, so the kernel skips the
blocks above the diagonal and no S x S mask is read; on the eager form this is done only without a
padding term (a fully padded row averages all keys there, which causal cannot express). HF's
training form without an attention mask or a cache is recognized too: positions read through
`position_ids` (`pos[b, kv] <= pos[b, q]`) and a packed-sequence term `seq[b, q] == seq[b, kv]`,
`seq = cumsum(diff(pos) != 1)`, both proven from `position_ids` being the model's own
`arange(S)`: the term is then always true. Position ids the caller passes (packed sequences) keep
their mask. Any other
mask is passed through as given (bool or additive). Invariant: the replaced site computes the same function
(exactly at kv_bits=16; with K/V rounded to kv_bits otherwise). A site it cannot take (dropout > 0,
attention weights used elsewhere, a non-constant scale, a mask that needs a gradient, causal with
Sq != Sk, a head dim or dtype the CUDA kernel lacks) stays as it is and is listed with the reason.
Counts: `replaced`, `causal_masks` (sites whose mask was lowered to causal), `general_masks` (sites
that still read a full [Sq, Sk] mask tile by tile: the slow path, named in the report), `skipped`.
"""

from __future__ import annotations

import dataclasses
import math
import operator

import torch
import torch.fx

from ..ops.attention import _HUGE
from ..options import Options
from ..report import AttentionStats
from . import CompileContext, GraphPass, calls, example_value, inherit_provenance

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
    return _Site(anchor, q, k0, v0, mask, False, scale, pattern)

def _from_zero(node, n: int) -> bool:
    """`node` is `torch.arange(n)`, optionally `+ 0`: the positions 0..n-1 (HF's q_arange/kv_arange)."""
    if calls(node, {operator.add}) and type(node.args[1]) is int and node.args[1] == 0:
        node = node.args[0]
    if not (calls(node, {torch.arange}) and set(node.kwargs) <= {"device", "dtype"}):
        return False
    dtype = node.kwargs.get("dtype")
    ints = all(type(a) is int for a in node.args)
    return ints and node.args in ((n,), (0, n), (0, n, 1)) and (dtype is None or not dtype.is_floating_point)


def _positions(node, dim: int, n: int) -> bool:
    """`node` is 0..n-1 placed along `dim` of a 4-D index, e.g. `kv_arange[None, None, None, :]`."""
    key = tuple(slice(None) if i == dim else None for i in range(4))
    return calls(node, {operator.getitem}) and node.args[1] == key and _from_zero(node.args[0], n)


def _arange_rows(node, n: int) -> bool:
    """`node` is `arange(n).unsqueeze(0)`, maybe `.expand(b, -1)`: HF's own position ids, every row
    0..n-1 (`cache_position.unsqueeze(0)` when the caller passes none)."""
    if calls(node, methods=("expand",)):
        node = node.args[0]
    return calls(node, methods=("unsqueeze",)) and node.args[1:] == (0,) and not node.kwargs and _from_zero(node.args[0], n)


def _gathered_dim(node, b: int, n: int) -> int | None:
    """For `x[batch_idx, idx]` with `idx` 0..n-1 along dim 2 (queries) or 3 (keys): that dim."""
    if not (calls(node, {operator.getitem}) and isinstance(node.args[1], tuple) and len(node.args[1]) == 2):
        return None
    bi, xi = node.args[1]
    if not _positions(bi, 0, b):
        return None
    return next((dim for dim in (2, 3) if _positions(xi, dim, n)), None)


def _gathered_positions(node, dim: int, b: int, n: int) -> bool:
    """`node` is `pos[batch_idx, idx]` with `pos` HF's own position ids and `idx` 0..n-1 along `dim`:
    the same values as the index itself (how HF's masks read positions without a cache)."""
    return _gathered_dim(node, b, n) == dim and _arange_rows(node.args[0], n)


def _index(node, dim: int, b: int, n: int) -> bool:
    return _positions(node, dim, n) or _gathered_positions(node, dim, b, n)


def _single_sequence(term, b: int, n: int) -> list[torch.fx.Node] | None:
    """When `term` is HF's packed-sequence test `seq[b, q] == seq[b, kv]` with
    `seq = (diff(pos, prepend=pos[:, :1] - 1, dim=-1) != 1).cumsum(-1)` over its own position ids
    (every diff is 1, so `seq` is all zeros and the test always true): the nodes it is made of."""
    if not calls(term, {operator.eq}) or not all(isinstance(a, torch.fx.Node) for a in term.args):
        return None
    left, right = term.args
    if {_gathered_dim(left, b, n), _gathered_dim(right, b, n)} != {2, 3} or left.args[0] is not right.args[0]:
        return None
    seq = left.args[0]
    if not (calls(seq, methods=("cumsum",)) and seq.args[1:] in ((-1,), (1,)) and not seq.kwargs):
        return None
    ne = seq.args[0]
    if not (calls(ne, {operator.ne}) and ne.args[1] == 1 and calls(ne.args[0], {torch.diff})):
        return None
    diff = ne.args[0]
    if not (len(diff.args) == 1 and diff.kwargs.get("dim") in (-1, 1) and _arange_rows(diff.args[0], n)):
        return None
    first = diff.kwargs.get("prepend")  # pos[:, :1] - 1: the first position's diff is 1 too
    if not (calls(first, {operator.sub}) and first.args[1] == 1 and calls(first.args[0], {operator.getitem})):
        return None
    head = first.args[0]
    if head.args[0] is not diff.args[0] or head.args[1] != (slice(None), slice(None, 1)):
        return None
    return [term, left, right, seq, ne, diff, first, head]


def _bool_terms(node, seen: list[torch.fx.Node]) -> list[torch.fx.Node]:
    """The operands of an `&` tree of bool tensors, through `.to(device)` and `expand` (same values)."""
    seen.append(node)
    value = example_value(node)
    if value is None or value.dtype != torch.bool:
        return [None]
    if calls(node, methods=("to", "expand")) and example_value(node.args[0]) is not None and example_value(node.args[0]).dtype == torch.bool:
        return _bool_terms(node.args[0], seen)
    if calls(node, {operator.and_}) and all(isinstance(a, torch.fx.Node) for a in node.args):
        return _bool_terms(node.args[0], seen) + _bool_terms(node.args[1], seen)
    return [node]


def _causal_padding(mask, q, k):
    """When bool `mask` is `(kv <= q) & pad[b, kv]` (or the causal term alone, and maybe HF's
    packed-sequence term over its own positions) over positions from 0:
    (the pad term or None, the mask's nodes); else None. Every other operand makes it None."""
    b, sq, sk = q.shape[0], q.shape[2], k.shape[2]
    seen = []
    causal, padding = 0, []
    for term in _bool_terms(mask, seen):
        if term is None:
            return None
        if calls(term, methods=("new_ones",)) and term.kwargs.get("dtype") == torch.bool:
            seen.append(term)  # a constant True
        elif calls(term, {operator.le}) and _index(term.args[0], 3, b, sk) and _index(term.args[1], 2, b, sq):
            causal += 1
            seen += [term, *term.args]
        elif calls(term, {operator.ge}) and _index(term.args[1], 3, b, sk) and _index(term.args[0], 2, b, sq):
            causal += 1
            seen += [term, *term.args]
        elif (same := _single_sequence(term, b, sq)) is not None and sq == sk:
            seen += same  # always true
        elif _pad_term(term, b, sk):
            padding.append(term)
        else:
            return None
    if causal == 0 or sq != sk or len(padding) > 1:
        return None
    return (padding[0] if padding else None), seen


def _pad_term(node, b: int, sk: int) -> bool:
    """`node` is `pad[batch_idx, kv_idx]` (maybe `.to(device)`) with pad a [B, Sk] bool tensor."""
    if calls(node, methods=("to",)):
        node = node.args[0]
    if _gathered_dim(node, b, sk) != 3:
        return False
    pad = example_value(node.args[0])
    return pad is not None and pad.dtype == torch.bool and tuple(pad.shape) == (b, sk)


def _zero(x) -> bool:
    """`x` is 0: a number, `torch.zeros(...)`, or `torch.tensor(0.0)` (transformers 5.17's eager mask)."""
    if type(x) in (int, float):
        return x == 0
    if not (calls(x, {torch.zeros, torch.tensor}) and set(x.kwargs) <= {"device", "dtype"}):
        return False
    return x.target is torch.zeros or (len(x.args) == 1 and type(x.args[0]) in (int, float) and x.args[0] == 0)


def _lower_causal(site: _Site, additive: bool) -> None:
    """Make `site` causal with the key-padding term as its mask when its mask is provably HF's
    causal ∧ key-padding mask; leave it as it is otherwise. `additive`: the eager form, whose mask
    is `where(bool_mask, 0, finfo.min)`; there only a mask without padding is lowered, since a
    fully padded query row averages every key there (causal would average the keys up to it)."""
    mask, q, k = site.mask, example_value(site.q), example_value(site.k)
    if mask is None or q is None or k is None or q.dim() != 4 or k.dim() != 4:
        return
    pattern = [mask]
    if additive:
        if not (calls(mask, {torch.where}) and len(mask.args) == 3 and not mask.kwargs):
            return
        cond, zero, low = mask.args
        if not (_zero(zero) and type(low) in (int, float) and low <= _HUGE):
            return
        pattern += [zero] if isinstance(zero, torch.fx.Node) else []
        mask = cond
    found = _causal_padding(mask, q, k)
    if found is None or (additive and found[0] is not None):
        return
    site.mask, site.causal, site.causal_mask = found[0], True, True
    site.pattern += pattern + found[1]


def _check(site: _Site) -> None:
    """Shapes and dtypes the op accepts, read from Dynamo's example values."""
    q, k, v, mask = (example_value(n) for n in (site.q, site.k, site.v, site.mask))
    if q is None or k is None or v is None or (site.mask is not None and mask is None):
        raise _Skip("no example values for q, k, v or the mask")
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
    kwargs = {"causal": site.causal, "scale": site.scale, "kv_bits": kv_bits}
    with graph.inserting_before(site.anchor):
        op = graph.call_function(torch.ops.lowmem.attention.default, (site.q, site.k, site.v, site.mask), kwargs)
        out = graph.call_function(operator.getitem, (op, 0))
    inherit_provenance(site.anchor, op, out)
    q = example_value(site.q)
    fake_mode = getattr(q, "fake_mode", None)
    if fake_mode is not None:
        with fake_mode:
            value = torch.ops.lowmem.attention.default(q, example_value(site.k), example_value(site.v), example_value(site.mask), **kwargs)
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
        replaced, causal_masks, general_masks, skipped, erased = 0, 0, 0, [], set()
        for node in list(gm.graph.nodes):
            if node in erased:
                continue
            try:
                if calls(node, _SDPA):
                    site = _match_sdpa(node)
                    _lower_causal(site, additive=False)
                elif calls(node, _SOFTMAX, ("softmax",)):
                    site = _match_eager(node)
                    _lower_causal(site, additive=True)
                else:
                    continue
                _check(site)
            except _Skip as reason:
                skipped.append(f"{node.name}: {reason}")
                continue
            erased |= _replace(gm, site, ctx.options.kv_bits)
            replaced += 1
            causal_masks += site.causal_mask
            general_masks += _reads_mask_tiles(site.mask)
        return AttentionStats(replaced=replaced, causal_masks=causal_masks, general_masks=general_masks, skipped=skipped)


def _reads_mask_tiles(mask) -> bool:
    """The mask differs across query rows (not a [.., 1, Sk] key-padding row): the kernel's general path."""
    value = example_value(mask)
    return value is not None and value.dim() >= 2 and value.shape[-2] != 1
