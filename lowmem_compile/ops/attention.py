"""`lowmem::attention`: softmax(cap(Q Kᵀ · scale) + mask) V whose backward keeps K and V in 4/8 bits.

    attention(q, k, v, mask=None, segments=None, *, causal, scale, kv_bits, window=0, softcap=0.0)
        -> (out, lse, k_q, k_scale, v_q, v_scale)
    attention_backward(grad_out, q, k_q, k_scale, v_q, v_scale, out, lse, mask, segments, *, causal,
                       scale, kv_bits, window=0, softcap=0.0) -> (dq, dk, dv)

q is [B, Hq, Sq, D]; k and v are [B, Hkv, Sk, D] with Hq a multiple of Hkv (GQA): they are read and
kept at Hkv heads (the cuDNN route at head dim 256 repeats them for the call only). `mask` is None,
boolean (True = attend) or additive float, broadcastable to [B, Hq, Sq, Sk]; `causal` requires Sq ==
Sk. A row with no key to attend gives 0 (as SDPA does), with lse = +inf. `softcap` c > 0 caps the
scaled scores to c · tanh(x / c) before the mask is added (Gemma 2). With `causal`, `window` W > 0
lets query q see keys q − W < kv ≤ q (HF's `sliding_window`: W keys with itself), and `segments`
(integer document ids [B or 1, S], nondecreasing along each row: documents packed contiguously) lets
it see only keys of its own document; both only bound which keys are seen, so the kernels skip the
tiles outside.

Why the quantized K/V are *outputs*: the autograd formula saves exactly what the backward reads, and
AOTAutograd's partitioner sees them as the only K/V-sized values the backward needs, so k and v
themselves die after the forward. At kv_bits=16 these four outputs are empty and k, v are saved.

The forward runs on the *dequantized* K/V, the same values the backward recomputes P from, so lse
and P are consistent and the gradients are the exact gradients of the function the forward computed
(docs/attention.md measures the alternative, exact forward + quantized backward, which is worse for
dK). lse is then that of the smoothed keys' scores; it is an internal of the pair of ops. On CUDA
each op expands the codes once into a transient 16-bit K and V (as large as k and v, freed when it
returns) that its kernels read; what is kept between the two stays 4/8-bit. At head dim 256, causal
or unmasked, the kernels are cuDNN's (codegen/attention_cudnn.py: our Triton tiles are too small
there), with K and V repeated to the query heads for the call under GQA; the storage is the same.

The reference below is the specification: fp32 math, chunked over query rows so it never holds more
than a [chunk, Sk] block of scores per head.
"""

from __future__ import annotations

import dataclasses

import torch

from ..formats import kv4
from .library import define_op

#: Bytes of fp32 scores a reference chunk may hold (all heads together).
_CHUNK_BYTES = 2**28
#: An additive mask entry below _HUGE (HF writes finfo.min) sets the score to _MASKED instead of
#: adding: a row so masked everywhere then averages every key, as eager softmax does, while lse
#: stays exact (-3.4e38 + log n would round to -3.4e38); exp(_MASKED - max) is 0 in fp32 otherwise.
_HUGE, _MASKED = -1e29, -1024.0


def _check(q, k, v, mask, causal, kv_bits, segments=None, window=0, softcap=0.0) -> None:
    kv4.check_bits(kv_bits)
    if window < 0 or softcap < 0:
        raise ValueError(f"attention: window {window} and softcap {softcap} must be >= 0")
    if (window or segments is not None) and not causal:
        raise ValueError("attention: a window or segments need causal=True")
    if segments is not None and (segments.dim() != 2 or segments.is_floating_point() or segments.dtype == torch.bool):
        raise ValueError(f"attention: segments must be integer document ids [B, S], got {segments.dtype} {tuple(segments.shape)}")
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"attention: q, k, v must be [B, H, S, D], got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"attention: q, k, v must share one of fp16/bf16/fp32, got {q.dtype}, {k.dtype}, {v.dtype}")
    b, hq, sq, d = q.shape
    torch._check(k.shape == v.shape, lambda: f"attention: k {tuple(k.shape)} and v {tuple(v.shape)} differ")
    torch._check(k.shape[0] == b and k.shape[3] == d, lambda: f"attention: k {tuple(k.shape)} does not fit q {tuple(q.shape)}")
    torch._check(hq % k.shape[1] == 0, lambda: f"attention: {hq} query heads are no multiple of {k.shape[1]} KV heads")
    if kv_bits != 16:
        kv4.group_size(d)
    if causal:
        torch._check(sq == k.shape[2], lambda: f"attention: causal needs Sq == Sk, got {sq} and {k.shape[2]}")
    if mask is not None:
        if mask.dtype != torch.bool and not mask.is_floating_point():
            raise ValueError(f"attention: mask must be bool (True = attend) or floating (additive), got {mask.dtype}")
        if mask.dim() > 4:
            raise ValueError(f"attention: mask has {mask.dim()} dims; it must broadcast to [B, Hq, Sq, Sk]")


def _mask_rows(mask, b, hq, rows, sk, hkv):
    """The mask's rows `rows` expanded to [B, Hkv, G, len(rows), Sk] (a copy of one chunk at most)."""
    full = mask.expand(b, hq, mask.shape[-2] if mask.dim() >= 2 else 1, sk)
    if full.shape[2] != 1:
        full = full[:, :, rows]
    return full.expand(b, hq, rows.stop - rows.start, sk).reshape(b, hkv, hq // hkv, -1, sk)


def _scores(qc, k, mask, rows, hq, form):
    """fp32 scores of a chunk of query rows: [B, Hkv, G, C, Sk], masked entries -inf; and the softcap's
    derivative 1 − tanh²(x / c) of the scaled scores x (None without a cap)."""
    b, hkv, _, sk, _ = k.shape
    s = torch.matmul(qc, k.transpose(-1, -2)) * form.scale
    dcap = None
    if form.softcap:
        t = torch.tanh(s / form.softcap)
        s, dcap = t * form.softcap, 1 - t * t
    if mask is not None:
        m = _mask_rows(mask, b, hq, rows, sk, hkv)
        if m.dtype == torch.bool:
            s = torch.where(m, s, float("-inf"))
        else:
            m = m.float()
            s = torch.where(m < _HUGE, torch.where(torch.isneginf(m), m, _MASKED), s + m)
    if form.causal:
        i = torch.arange(rows.start, rows.stop, device=s.device).unsqueeze(-1)
        kv = torch.arange(sk, device=s.device)
        hide = (kv > i) | (kv <= i - form.window) if form.window else kv > i
        if form.segments is not None:
            seg = form.segments.expand(b, sk)
            hide = hide | (seg[:, rows, None] != seg[:, None, :])[:, None, None]
        s = s.masked_fill(hide, float("-inf"))
    return s, dcap


def _grouped(q, k, v):
    """fp32 views for GQA without a repeated copy: q [B, Hkv, G, S, D], k/v [B, Hkv, 1, S, D]."""
    b, hq, sq, d = q.shape
    hkv = k.shape[1]
    return q.float().reshape(b, hkv, hq // hkv, sq, d), k.float().unsqueeze(2), v.float().unsqueeze(2)


def _chunk(q, sk):
    b, hq = q.shape[:2]
    return max(1, min(q.shape[2], _CHUNK_BYTES // (4 * b * hq * max(sk, 1))))


@dataclasses.dataclass(frozen=True)
class Form:
    """Which scores a query row sees, and how they are shaped (the op's arguments besides q, k, v, mask)."""

    causal: bool
    scale: float
    window: int = 0
    softcap: float = 0.0
    segments: torch.Tensor | None = None


def attend(q, k, v, mask, form: Form):
    """Exact attention in fp32 (any K/V values): (out in q's dtype, lse fp32 [B, Hq, Sq])."""
    b, hq, sq, d = q.shape
    qg, kg, vg = _grouped(q, k, v)
    # contiguous outputs, as the fake impl declares (empty_like would copy q's transposed strides)
    out, lse = q.new_empty(q.shape), q.new_empty(b, hq, sq, dtype=torch.float32)
    step = _chunk(q, k.shape[2])
    for start in range(0, sq, step):
        rows = slice(start, min(start + step, sq))
        s, _ = _scores(qg[:, :, :, rows], kg, mask, rows, hq, form)
        l = torch.logsumexp(s, dim=-1, keepdim=True)
        l = torch.where(torch.isneginf(l), float("inf"), l)
        o = torch.matmul(torch.exp(s - l), vg)
        out[:, :, rows] = o.reshape(b, hq, -1, d).to(q.dtype)
        lse[:, :, rows] = l.reshape(b, hq, -1)
    return out, lse


def attend_backward(grad_out, q, k, v, out, lse, mask, form: Form):
    """Gradients of :func:`attend` from its saved (out, lse), recomputing P chunk by chunk, in fp32."""
    b, hq, sq, d = q.shape
    hkv = k.shape[1]
    qg, kg, vg = _grouped(q, k, v)
    dog = grad_out.float().reshape(b, hkv, hq // hkv, sq, d)
    delta = (dog * out.float().reshape(dog.shape)).sum(-1, keepdim=True)
    lseg = lse.reshape(b, hkv, hq // hkv, sq, 1)
    dq = torch.empty_like(qg)
    dk, dv = torch.zeros_like(kg.squeeze(2)), torch.zeros_like(vg.squeeze(2))
    step = _chunk(q, k.shape[2])
    for start in range(0, sq, step):
        rows = slice(start, min(start + step, sq))
        s, dcap = _scores(qg[:, :, :, rows], kg, mask, rows, hq, form)
        p = torch.exp(s - lseg[:, :, :, rows])
        do = dog[:, :, :, rows]
        ds = p * (torch.matmul(do, vg.transpose(-1, -2)) - delta[:, :, :, rows])
        ds = ds if dcap is None else ds * dcap
        dq[:, :, :, rows] = torch.matmul(ds, kg) * form.scale
        dk += torch.matmul(ds.transpose(-1, -2), qg[:, :, :, rows]).sum(2) * form.scale
        dv += torch.matmul(p.transpose(-1, -2), do).sum(2)
    # contiguous, as the fake impl declares (empty_like/zeros_like keep q's and k's transposed strides)
    return tuple(g.to(t.dtype).contiguous() for g, t in ((dq.reshape(q.shape), q), (dk, k), (dv, v)))


def quantize_kv(k, v, kv_bits):
    """(k_q, k_scale, v_q, v_scale): K smoothed then quantized, V quantized (empty at 16 bits)."""
    if kv_bits == 16:
        return kv4.no_codes(k)
    sdt = kv4.scale_dtype(k.dtype)
    packed = (*kv4.quantize(kv4.smooth(k), kv_bits, sdt), *kv4.quantize(v, kv_bits, sdt))
    return tuple(t.contiguous() for t in packed)  # the fake impl declares contiguous outputs


def _saved_kv(k_q, k_scale, v_q, v_scale, kv_bits, dtype):
    if kv_bits == 16:
        return k_q, v_q
    return kv4.dequantize(k_q, k_scale, kv_bits, dtype), kv4.dequantize(v_q, v_scale, kv_bits, dtype)


_FWD_ARGS = "Tensor? mask=None, Tensor? segments=None, *, bool causal, float scale, int kv_bits, int window=0, float softcap=0.0"


def _reference(q, k, v, mask=None, segments=None, *, causal, scale, kv_bits, window=0, softcap=0.0):
    _check(q, k, v, mask, causal, kv_bits, segments, window, softcap)
    packed = quantize_kv(k, v, kv_bits)
    kd, vd = (k, v) if kv_bits == 16 else _saved_kv(*packed, kv_bits, torch.float32)
    out, lse = attend(q, kd, vd, mask, Form(causal, scale, window, softcap, segments))
    return (out, lse, *packed)


def _fake(q, k, v, mask=None, segments=None, *, causal, scale, kv_bits, window=0, softcap=0.0):
    _check(q, k, v, mask, causal, kv_bits, segments, window, softcap)
    b, hq, sq, d = q.shape
    out, lse = q.new_empty(q.shape), q.new_empty(b, hq, sq, dtype=torch.float32)
    if kv_bits == 16:
        return out, lse, *kv4.no_codes(k)
    hkv, sk = k.shape[1], k.shape[2]
    codes = (b, hkv, sk, kv4.code_cols(d, kv_bits))
    scales = (b, hkv, sk, d // kv4.group_size(d), 2)
    sdt = kv4.scale_dtype(k.dtype)
    return (
        out,
        lse,
        k.new_empty(codes, dtype=torch.uint8),
        k.new_empty(scales, dtype=sdt),
        k.new_empty(codes, dtype=torch.uint8),
        k.new_empty(scales, dtype=sdt),
    )


def _repeated_kv(q, kv_heads, kv_len, mask, segments, causal, window, softcap) -> list[torch.Tensor]:
    """K and V repeated to the query heads ([B, Hq, Sk, D]), when the call takes the cuDNN route with
    GQA (codegen/attention_cudnn.py): transients of the op on top of the 16-bit K and V."""
    from ..codegen import attention_cudnn

    if not attention_cudnn.serves(q, mask, causal, window, softcap, segments) or q.shape[1] == kv_heads:
        return []
    b, hq, _, d = q.shape
    return [q.new_empty((b, hq, kv_len, d)) for _ in range(2)]


def _workspace(q, k, v, mask=None, segments=None, *, causal, scale, kv_bits, window=0, softcap=0.0):
    """At 4/8 bits the kernel reads a transient 16-bit K and V dequantized from the codes (the int32
    band bounds of a window or documents, 8 bytes a token, are not counted), and on the cuDNN route
    with GQA K and V repeated to the query heads."""
    kv = [] if kv_bits == 16 else [k.new_empty(k.shape, dtype=q.dtype), v.new_empty(v.shape, dtype=q.dtype)]
    return kv + _repeated_kv(q, k.shape[1], k.shape[2], mask, segments, causal, window, softcap)


def _cuda(q, k, v, mask=None, segments=None, *, causal, scale, kv_bits, window=0, softcap=0.0):
    from ..codegen import attention_cudnn, attention_kv4

    form = dict(causal=causal, scale=scale, kv_bits=kv_bits, window=window, softcap=softcap)
    if not attention_kv4.supports(q.shape[-1], q.dtype):
        return _reference(q, k, v, mask, segments, **form)
    _check(q, k, v, mask, causal, kv_bits, segments, window, softcap)
    if attention_cudnn.serves(q, mask, causal, window, softcap, segments):
        return attention_cudnn.forward(q, k, v, causal, scale, kv_bits)
    return attention_kv4.forward(q, k, v, mask, causal, scale, kv_bits, window=window, softcap=softcap, segments=segments)


def _bwd_reference(grad_out, q, k_q, k_scale, v_q, v_scale, out, lse, mask=None, segments=None, *, causal, scale,
                   kv_bits, window=0, softcap=0.0):
    kd, vd = _saved_kv(k_q, k_scale, v_q, v_scale, kv_bits, torch.float32)
    dq, dk, dv = attend_backward(grad_out, q, kd, vd, out, lse, mask, Form(causal, scale, window, softcap, segments))
    return dq, dk.to(q.dtype), dv.to(q.dtype)


def _bwd_fake(grad_out, q, k_q, k_scale, v_q, v_scale, out, lse, mask=None, segments=None, *, causal, scale, kv_bits,
              window=0, softcap=0.0):
    b, _, _, d = q.shape
    kv_shape = (b, k_q.shape[1], k_q.shape[2], d)
    return q.new_empty(q.shape), q.new_empty(kv_shape), q.new_empty(kv_shape)


def _bwd_workspace(grad_out, q, k_q, k_scale, v_q, v_scale, out, lse, mask=None, segments=None, *, causal, scale,
                   kv_bits, window=0, softcap=0.0):
    """The row statistics (delta, like lse) and, at 4/8 bits, the transient 16-bit K and V. Not
    counted: the fp32 dK/dV partials of a split grid (chosen from the device's SM count, and only
    for sequences short enough that they are small against the step)."""
    b, _, _, d = q.shape
    kv = [] if kv_bits == 16 else [q.new_empty((b, k_q.shape[1], k_q.shape[2], d)) for _ in range(2)]
    # on the cuDNN route with GQA: K, V and their gradients at the query heads
    repeated = _repeated_kv(q, k_q.shape[1], k_q.shape[2], mask, segments, causal, window, softcap)
    return [lse.new_empty(lse.shape), *kv, *repeated, *repeated]


def _bwd_cuda(grad_out, q, k_q, k_scale, v_q, v_scale, out, lse, mask=None, segments=None, *, causal, scale, kv_bits,
              window=0, softcap=0.0):
    from ..codegen import attention_cudnn, attention_kv4

    saved = (grad_out, q, k_q, k_scale, v_q, v_scale, out, lse, mask)
    if not attention_kv4.supports(q.shape[-1], q.dtype):
        return _bwd_reference(*saved, segments, causal=causal, scale=scale, kv_bits=kv_bits, window=window, softcap=softcap)
    if attention_cudnn.serves(q, mask, causal, window, softcap, segments):
        return attention_cudnn.backward(*saved[:-1], causal, scale, kv_bits)
    return attention_kv4.backward(*saved, causal, scale, kv_bits, window=window, softcap=softcap, segments=segments)


attention_backward = define_op(
    "attention_backward",
    "(Tensor grad_out, Tensor q, Tensor k_q, Tensor k_scale, Tensor v_q, Tensor v_scale, Tensor out, Tensor lse, "
    + _FWD_ARGS + ") -> (Tensor, Tensor, Tensor)",
    reference=_bwd_reference,
    fake=_bwd_fake,
    cuda=_bwd_cuda,
    workspace=_bwd_workspace,
)

_FORM_KEYS = ("causal", "scale", "kv_bits", "window", "softcap")


def _setup_context(ctx, inputs, keyword_only_inputs, output):
    """Save what the backward reads: the packed K/V (or k, v themselves at 16 bits), never both."""
    q, k, v, mask, segments = inputs
    out, lse, k_q, k_scale, v_q, v_scale = output
    ctx.form = {key: keyword_only_inputs[key] for key in _FORM_KEYS if key in keyword_only_inputs}
    ctx.mark_non_differentiable(lse, k_q, k_scale, v_q, v_scale)
    if ctx.form["kv_bits"] == 16:
        k_q, v_q = k, v
    ctx.save_for_backward(q, k_q, k_scale, v_q, v_scale, out, lse, mask, segments)


def _backward(ctx, grad_out, *_):
    q, k_q, k_scale, v_q, v_scale, out, lse, mask, segments = ctx.saved_tensors
    dq, dk, dv = attention_backward(grad_out.contiguous(), q, k_q, k_scale, v_q, v_scale, out, lse, mask, segments, **ctx.form)
    return dq, dk, dv, None, None


attention = define_op(
    "attention",
    "(Tensor q, Tensor k, Tensor v, " + _FWD_ARGS + ") -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)",
    reference=_reference,
    fake=_fake,
    cuda=_cuda,
    backward=_backward,
    setup_context=_setup_context,
    workspace=_workspace,
)
