"""Proofs, read off the Dynamo graph, that an attention mask is one the kernels compute without it.

Hugging Face's masking_utils builds every mask as an `&` of terms over index grids (`batch_idx`
[B, 1, 1, 1], `q_idx` [1, 1, Sq, 1], `kv_idx` [1, 1, 1, Sk]), with positions either the indices
themselves or read through position ids (`pos[batch_idx, q_idx]`) when it trains without a cache
or detects packed documents. `lower_mask` recognizes these terms, whatever the model:

- causal `kv <= q` (or `q >= kv`);
- sliding window `kv > q - W` (HF's `sliding_window_overlay`: W keys with the query's own);
- packed documents `seq[b, q] == seq[b, kv]`, `seq = (diff(P, prepend=P[:, :1] - 1) != 1).cumsum(-1)`
  over position ids P (a new document wherever positions do not step by one): always true over the
  model's own `arange` positions, otherwise the document ids the kernel takes as `segments`;
- a key-padding term `pad[b, kv]` ([B, Sk] bool), and a constant True.

Positions read through the caller's P are the indices' order only within a document (there P steps
by one), so causal and window terms over P are accepted only beside the document term over that P;
then `kv <= q` and `kv > q - W` over P equal the same tests over indices for every pair the
document term keeps. Anything else (another term, offsets, Sq != Sk, two windows, two paddings) is
not proven, and the site keeps its mask (the general path).
"""

from __future__ import annotations

import dataclasses
import operator

import torch
import torch.fx

from ..ops.attention import _HUGE
from . import calls, copy_graph_module, example_value


@dataclasses.dataclass
class Lowered:
    """What a proven mask becomes: causal, with these bounds and the key-padding term (or none)."""

    padding: torch.fx.Node | None
    window: int
    segments: torch.fx.Node | None
    nodes: list[torch.fx.Node]
    positions: torch.fx.Node | None = None
    """The position ids the documents are read from (with `segments`)."""


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


def _source(node, dim: int, b: int, n: int):
    """What `node` reads as the positions along `dim` (2 queries, 3 keys): None for 0..n-1 (the index
    itself, or HF's own position ids gathered), the caller's position ids P for `P[batch_idx, idx]`
    (P maybe `.expand(b, -1)`), False for anything else."""
    if _positions(node, dim, n):
        return None
    if _gathered_dim(node, b, n) != dim:
        return False
    pos = node.args[0]
    if _arange_rows(pos, n):
        return None
    if calls(pos, methods=("expand",)):
        pos = pos.args[0]
    value = example_value(pos)
    ok = value is not None and value.dim() == 2 and not value.dtype.is_floating_point and value.dtype != torch.bool
    return pos if ok else False


def _order(term, b: int, sq: int, sk: int):
    """The causal term `kv <= q` (or `q >= kv`): (its position sources, its nodes) or None."""
    if calls(term, {operator.le}):
        kv, q = term.args
    elif calls(term, {operator.ge}):
        q, kv = term.args
    else:
        return None
    sources = (_source(kv, 3, b, sk), _source(q, 2, b, sq))
    return None if False in sources else (set(sources), [term, kv, q])


def _window(term, b: int, sq: int, sk: int):
    """The sliding-window term `kv > q - W` (or `q - W < kv`), W a positive int: (W, sources, nodes) or None."""
    if calls(term, {operator.gt}):
        kv, low = term.args
    elif calls(term, {operator.lt}):
        low, kv = term.args
    else:
        return None
    if not (calls(low, {operator.sub}) and type(low.args[1]) is int and low.args[1] > 0):
        return None
    sources = (_source(kv, 3, b, sk), _source(low.args[0], 2, b, sq))
    return None if False in sources else (low.args[1], set(sources), [term, kv, low, low.args[0]])


def _documents(term, b: int, n: int):
    """HF's packed-sequence term `seq[b, q] == seq[b, kv]` with `seq` the cumulated position breaks
    of position ids P: (seq, P, its nodes) or None."""
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
    if not (len(diff.args) == 1 and diff.kwargs.get("dim") in (-1, 1)):
        return None
    first = diff.kwargs.get("prepend")  # P[:, :1] - 1: the first position's diff is 1 too
    if not (calls(first, {operator.sub}) and first.args[1] == 1 and calls(first.args[0], {operator.getitem})):
        return None
    head = first.args[0]
    if head.args[0] is not diff.args[0] or head.args[1] != (slice(None), slice(None, 1)):
        return None
    positions = diff.args[0]  # as `_source` names it: P itself, not its `.expand(b, -1)`
    if calls(positions, methods=("expand",)):
        positions = positions.args[0]
    return seq, positions, [term, left, right, seq, ne, diff, first, head]


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


def _pad_term(node, b: int, sk: int) -> bool:
    """`node` is `pad[batch_idx, kv_idx]` (maybe `.to(device)`) with pad a [B, Sk] bool tensor."""
    if _gathered_dim(_unmoved(node), b, sk) != 3:
        return False
    pad = example_value(_padding_keys(node))
    return pad is not None and pad.dtype == torch.bool and tuple(pad.shape) == (b, sk)


def _unmoved(node):
    """`node` without a `.to(...)` on top (a device move: the same values)."""
    return node.args[0] if calls(node, methods=("to",)) else node


def _padding_keys(term) -> torch.fx.Node:
    """The [B, Sk] tensor of keys kept that a key-padding term (`_pad_term`) reads."""
    return _unmoved(term).args[0]


def _prove(mask, q, k) -> Lowered | None:
    """`mask` as causal + window + documents + key padding (module docstring), or None."""
    b, sq, sk = q.shape[0], q.shape[2], k.shape[2]
    if sq != sk:
        return None
    seen: list[torch.fx.Node] = []
    causal, window, padding, segments, doc_pos, sources = 0, 0, [], None, None, set()
    for term in _bool_terms(mask, seen):
        if term is None:
            return None
        if calls(term, methods=("new_ones",)) and term.kwargs.get("dtype") == torch.bool:
            seen.append(term)  # a constant True
        elif (found := _order(term, b, sq, sk)) is not None:
            causal += 1
            sources |= found[0]
            seen += found[1]
        elif (found := _window(term, b, sq, sk)) is not None and not window:
            window = found[0]
            sources |= found[1]
            seen += found[2]
        elif (found := _documents(term, b, sq)) is not None and segments is None:
            seen += found[2]
            if not _arange_rows(found[1], sq):  # over the model's own positions: always true
                segments, doc_pos = found[0], found[1]
        elif _pad_term(term, b, sk):
            padding.append(term)
        else:
            return None
    sources.discard(None)
    if causal == 0 or len(padding) > 1 or (sources and sources != {doc_pos}):
        return None
    return Lowered(padding[0] if padding else None, window, segments, seen, doc_pos)


def _zero(x) -> bool:
    """`x` is 0: a number, `torch.zeros(...)`, or `torch.tensor(0.0)` (transformers 5.17's eager mask)."""
    if type(x) in (int, float):
        return x == 0
    if not (calls(x, {torch.zeros, torch.tensor}) and set(x.kwargs) <= {"device", "dtype"}):
        return False
    return x.target is torch.zeros or (len(x.args) == 1 and type(x.args[0]) in (int, float) and x.args[0] == 0)


def lower_mask(mask, q, k, additive: bool) -> Lowered | None:
    """What bool or additive `mask` becomes when it is provably HF's causal mask with a window,
    documents and key padding (each optional): None when it is not. `q`, `k`: example values.
    `additive`: the eager form, `where(bool_mask, 0, finfo.min)`; there only a mask without padding
    is lowered, since a fully padded query row averages every key there (causal would average the
    keys up to it)."""
    if mask is None or q is None or k is None or q.dim() != 4 or k.dim() != 4:
        return None
    nodes = [mask]
    if additive:
        if not (calls(mask, {torch.where}) and len(mask.args) == 3 and not mask.kwargs):
            return None
        cond, zero, low = mask.args
        if not (_zero(zero) and type(low) in (int, float) and low <= _HUGE):
            return None
        nodes += [zero] if isinstance(zero, torch.fx.Node) else []
        mask = cond
    found = _prove(mask, q, k)
    if found is None or (additive and found.padding is not None):
        return None
    found.nodes += nodes
    return found


@dataclasses.dataclass(frozen=True)
class MaskForm:
    """A bool [B, 1, S, S] mask among a graph's outputs, proven to be `mask_from_parts`'s mask: causal,
    within a left window of `window` keys (0: none), within the documents of the position ids the
    graph takes as input `positions` (None: the model's own positions, one document a row), and over
    the keys `padding` (a [B, S] bool node of the graph) keeps."""

    output: int
    window: int = 0
    positions: int | None = None
    padding: torch.fx.Node | None = None

    @property
    def plain(self) -> bool:
        """Causal with no window or padding: plain causal exactly when no row's positions break."""
        return not self.window and self.padding is None


def mask_forms(gm: torch.fx.GraphModule) -> list[MaskForm]:
    """HF's bool [B, 1, S, S] masks among `gm`'s outputs proven causal, with what else they keep
    apart. A model whose layers compile as frames of their own (layer_frames.py) builds its mask in
    a graph before them, from position ids computed outside it; this is what that graph can tell
    the layers."""
    (outputs,) = gm.graph.find_nodes(op="output")[0].args
    inputs = {node: i for i, node in enumerate(gm.graph.find_nodes(op="placeholder"))}
    found = []
    for i, node in enumerate(outputs if isinstance(outputs, (tuple, list)) else (outputs,)):
        value = example_value(node)
        if value is None or value.dtype != torch.bool or value.dim() != 4:
            continue
        b, _, sq, sk = value.shape
        q, k = torch.empty(b, 1, sq, 1, device="meta"), torch.empty(b, 1, sk, 1, device="meta")
        lowered = _prove(node, q, k)
        if lowered is None or (lowered.segments is not None and lowered.positions not in inputs):
            continue
        padding = None if lowered.padding is None else _padding_keys(lowered.padding)
        positions = inputs[lowered.positions] if lowered.segments is not None else None
        found.append(MaskForm(i, lowered.window, positions, padding))
    return found


def with_mask_parts(gm: torch.fx.GraphModule, forms: list[MaskForm], unbuilt: set[int]) -> torch.fx.GraphModule | None:
    """A copy of `gm` that builds none of the masks of `forms`, the work that built them removed: each
    output in `unbuilt` (plain causal ones) becomes an empty [B, 1, S, 0] stand-in, each other its
    parts, an int64 [2, B, S] tensor of the positions (zeros for one document a row) and the keys
    kept (ones without padding), from which `mask_from_parts` rebuilds it. None where a mask's
    sizes are symbolic. At 131072 tokens such a mask is 16 GiB of bools."""
    copy = copy_graph_module(gm)
    nodes = {n.name: n for n in copy.graph.nodes}
    placeholders = copy.graph.find_nodes(op="placeholder")
    output = copy.graph.find_nodes(op="output")[0]
    values = list(output.args[0]) if isinstance(output.args[0], (tuple, list)) else [output.args[0]]
    graph = copy.graph
    for form in forms:
        mask = example_value(values[form.output])
        if mask is None or not all(type(d) is int for d in mask.shape):
            return None
        b, _, s, _ = mask.shape
        like = {"dtype": torch.int64, "device": mask.device}
        with graph.inserting_before(output):
            if form.output in unbuilt:
                values[form.output] = graph.call_function(torch.empty, ((b, 1, s, 0),), {"dtype": torch.bool, "device": mask.device})
                continue
            if form.positions is None:
                positions = graph.call_function(torch.zeros, ((b, s),), like)
            else:
                positions = graph.call_method("expand", (placeholders[form.positions], b, s))
                positions = graph.call_method("to", (positions, torch.int64))
            if form.padding is None:
                kept = graph.call_function(torch.ones, ((b, s),), like)
            else:
                kept = graph.call_method("to", (nodes[form.padding.name], torch.int64))
            values[form.output] = graph.call_function(torch.stack, ([positions, kept],))
    output.args = (tuple(values) if isinstance(output.args[0], (tuple, list)) else values[0],)
    graph.eliminate_dead_code()
    copy.recompile()
    return copy


def mask_from_parts(parts: torch.Tensor, window: int, documents: bool, padding: bool) -> torch.Tensor:
    """The bool [B, 1, S, S] mask `with_mask_parts` left unbuilt, from its parts, in the terms
    `lower_mask` proves (a graph tracing this shows the attention pass a causal mask with its window,
    documents and key padding, and the kernel computes it without the mask). Over indices rather
    than positions: equal wherever the documents term holds, where positions step by one."""
    positions, kept = parts[0], parts[1]
    b, s = positions.shape
    batch = torch.arange(b, device=parts.device)[:, None, None, None]
    q = torch.arange(s, device=parts.device)[None, None, :, None]
    kv = torch.arange(s, device=parts.device)[None, None, None, :]
    mask = kv <= q
    if window:
        mask = mask & (kv > q - window)
    if documents:
        seq = (torch.diff(positions, prepend=positions[:, :1] - 1, dim=-1) != 1).cumsum(-1)
        mask = mask & (seq[batch, q] == seq[batch, kv])
    if padding:
        mask = mask & kept.bool()[batch, kv]
    return mask.expand(b, 1, s, s)
