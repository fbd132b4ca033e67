"""The attention forms beyond plain causal: sliding windows, packed documents (segment ids), logit
softcapping, scales other than 1/√d and head dim 256, in `lowmem::attention`'s reference and kernels.

Bars: the reference op against a float64 SDPA-style computation with the mask written out in full
(1e-5 relative, fp32); the kernels under Triton's interpreter against the reference op on the same
inputs (fp32: 1e-5, fp16: 5e-3 forward, 1e-2 gradients, as tests/test_attention_kernels.py); on the
GPU in bf16 against float64 (kv16 1e-2 relative; kv4 cosine 0.99 / 0.98).
"""

import math

import pytest
import torch

from lowmem_compile.ops import attention as ops

from .models import rel_err
from .test_attention_kernels import _assert_accurate, _inputs, _mask, _op


def _documents(b, s, docs, seed=0):
    """Document ids [b, s]: each row cut into `docs` contiguous documents of random lengths >= 1."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(b):
        cuts = torch.randperm(s - 1, generator=g)[: docs - 1].sort().values + 1
        ids = torch.zeros(s, dtype=torch.long)
        ids[cuts] = 1
        rows.append(ids.cumsum(0))
    return torch.stack(rows)


def _band_mask(b, s, window, segments):
    """The bool mask [b, 1, s, s] a window and documents allow, written out (causal applied apart)."""
    q, kv = torch.arange(s)[:, None], torch.arange(s)[None, :]
    keep = torch.ones(b, 1, s, s, dtype=torch.bool)
    if window:
        keep &= kv > q - window
    if segments is not None:
        keep &= (segments[:, :, None] == segments[:, None, :])[:, None]
    return keep


def _float64(q, k, v, mask, scale, softcap, grad_out):
    """(O, dQ, dK, dV) in float64 by autograd: causal, capped scores, then the bool/additive mask."""
    q, k, v = (t.detach().double().requires_grad_() for t in (q, k, v))
    rep = q.shape[1] // k.shape[1]
    s = q @ k.repeat_interleave(rep, 1).transpose(-1, -2) * scale
    if softcap:
        s = torch.tanh(s / softcap) * softcap
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else s + mask.double()
    s = s.masked_fill(torch.ones(s.shape[-2:], dtype=torch.bool, device=s.device).triu(1), float("-inf"))
    o = torch.softmax(s, -1).nan_to_num(0.0) @ v.repeat_interleave(rep, 1)
    return (o, *torch.autograd.grad(o, (q, k, v), grad_out.double()))


def _form_op(q, k, v, mask, segments, bits, grad_out, **form):
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out = torch.ops.lowmem.attention(q, k, v, mask, segments, causal=True, kv_bits=bits, **form)[0]
    return (out, *torch.autograd.grad(out, (q, k, v), grad_out))


# ---- the reference op and the band bounds -------------------------------------------------------


@pytest.mark.parametrize(
    "window, docs, softcap, mask_kind",
    [(5, 0, 0.0, None), (0, 3, 0.0, None), (7, 4, 0.0, "padding"), (0, 0, 4.0, None), (6, 2, 3.0, "additive"), (100, 0, 0.0, None)],
)
def test_reference_forms_against_float64(window, docs, softcap, mask_kind):
    """Windows (one shorter than a block, one longer than the sequence), documents, a softcap that
    bites (scores up to ~3x the cap), with masks on top; a scale that is not 1/√d."""
    b, s, d = 2, 29, 16
    q, k, v = _inputs(b, 4, 2, s, d, torch.float32)
    q = q * 3
    segments = _documents(b, s, docs) if docs else None
    mask = _mask(mask_kind, b, 4, s, s)
    full = _band_mask(b, s, window, segments)
    if mask is not None:
        full = full & mask if mask.dtype == torch.bool else torch.where(full, mask, float("-inf"))
    grad_out = torch.randn(q.shape)
    want = _float64(q, k, v, full, 0.3, softcap, grad_out)
    got = _form_op(q, k, v, mask, segments, 16, grad_out, scale=0.3, window=window, softcap=softcap)
    _assert_accurate(got, want, 16, exact_tol=1e-5)


def test_forms_need_causal_and_valid_values():
    q, k, v = _inputs(1, 2, 1, 8, 16, torch.float32)
    with pytest.raises(ValueError, match="need causal"):
        torch.ops.lowmem.attention(q, k, v, None, None, causal=False, scale=0.25, kv_bits=16, window=4)
    with pytest.raises(ValueError, match="need causal"):
        torch.ops.lowmem.attention(q, k, v, None, torch.zeros(1, 8, dtype=torch.long), causal=False, scale=0.25, kv_bits=16)
    with pytest.raises(ValueError, match="must be >= 0"):
        torch.ops.lowmem.attention(q, k, v, None, causal=True, scale=0.25, kv_bits=16, softcap=-1.0)
    with pytest.raises(ValueError, match="integer document ids"):
        torch.ops.lowmem.attention(q, k, v, None, torch.zeros(1, 8), causal=True, scale=0.25, kv_bits=16)


@pytest.mark.parametrize("window, docs", [(0, 5), (4, 0), (3, 4), (50, 2)])
def test_band_bounds_match_the_written_out_mask(window, docs):
    """Row q sees keys [lo(q), q] and key kv is seen by queries [kv, hi(kv)): both read off the full mask."""
    from lowmem_compile.codegen.attention_kv4 import _bounds

    b, s = 3, 23
    segments = _documents(b, s, docs, seed=docs) if docs else None
    bounds = _bounds(b, s, window, segments, "cpu")
    keep = _band_mask(b, s, window, segments)[:, 0] & torch.ones(s, s, dtype=torch.bool).tril()
    idx = torch.arange(s)
    assert bounds.dtype == torch.int32 and bounds.shape == (b, 2, s)
    assert torch.equal(bounds[:, 0].long(), torch.where(keep, idx, s).min(-1).values)
    assert torch.equal(bounds[:, 1].long(), torch.where(keep, idx[:, None], -1).max(-2).values + 1)
    assert _bounds(b, s, s, None, "cpu") is None and _bounds(b, s, 0, None, "cpu") is None


# ---- kernels (interpreter on CPU) against the reference op --------------------------------------


def _kernel_vs_reference(b, hq, hkv, s, d, dtype, bits, *, window=0, docs=0, softcap=0.0, scale=None, mask_kind=None,
                         split=None):
    from lowmem_compile.codegen import attention_kv4 as kern

    q, k, v = _inputs(b, hq, hkv, s, d, dtype, seed=s + d + window)
    q = (q.float() * 2).to(dtype)  # sharper scores: the softcap bites, windows matter
    segments = _documents(b, s, docs, seed=s) if docs else None
    mask = _mask(mask_kind, b, hq, s, s)
    scale = 1 / math.sqrt(d) if scale is None else scale
    form = dict(window=window, softcap=softcap, segments=segments)
    grad_out = torch.randn(q.shape).to(dtype)
    ref = ops._reference(q, k, v, mask, segments, causal=True, scale=scale, kv_bits=bits, window=window, softcap=softcap)
    got = kern.forward(q, k, v, mask, True, scale, bits, **form)
    saved = (k, got[3], v, got[5]) if bits == 16 else got[2:]
    ref_saved = (k, ref[3], v, ref[5]) if bits == 16 else ref[2:]
    ref_grads = ops._bwd_reference(grad_out, q, *ref_saved, ref[0], ref[1], mask, segments, causal=True, scale=scale,
                                   kv_bits=bits, window=window, softcap=softcap)
    tol = 1e-5 if dtype == torch.float32 else 5e-3
    assert rel_err(got[0], ref[0]) < tol
    finite = torch.isfinite(ref[1])
    assert torch.equal(finite, torch.isfinite(got[1])) and rel_err(got[1][finite], ref[1][finite]) < tol
    grads = kern.backward(grad_out, q, *saved, got[0], got[1], mask, True, scale, bits, split=split, **form)
    for name, a, r in zip(("dQ", "dK", "dV"), grads, ref_grads):
        assert rel_err(a, r) < 2 * tol, name


@pytest.mark.parametrize(
    "s, window, dtype, bits",
    [(70, 5, torch.float32, 16), (70, 20, torch.float16, 4), (45, 16, torch.float16, 16), (33, 2, torch.float32, 16), (40, 64, torch.float16, 16)],
)
def test_kernel_window(s, window, dtype, bits):
    """Windows shorter than a key block, exactly one, spanning several, of two keys (one makes dQ
    exactly 0) and longer than the sequence (plain causal); lengths no block divides."""
    _kernel_vs_reference(1, 4, 2, s, 32, dtype, bits, window=window)


@pytest.mark.parametrize(
    "s, docs, window, dtype, mask_kind",
    [(64, 2, 0, torch.float32, None), (77, 5, 0, torch.float16, None), (70, 3, 9, torch.float16, None), (50, 4, 0, torch.float32, "padding")],
)
def test_kernel_documents(s, docs, window, dtype, mask_kind):
    """Packed rows of 2-5 documents (different cuts in each of two rows), with a window inside the
    documents and with a key-padding mask on top."""
    _kernel_vs_reference(2, 4, 2, s, 32, dtype, 16, docs=docs, window=window, mask_kind=mask_kind)


@pytest.mark.parametrize(
    "softcap, scale, dtype, bits, mask_kind",
    [(2.0, 0.3, torch.float32, 16, None), (5.0, None, torch.float16, 8, "padding_additive"), (3.0, 0.2, torch.float32, 16, "additive")],
)
def test_kernel_softcap_and_scale(softcap, scale, dtype, bits, mask_kind):
    """Capped scores forward and backward (1 − tanh²), a scale other than 1/√d, with key-padding and
    general additive masks applied after the cap."""
    _kernel_vs_reference(1, 4, 2, 41, 32, dtype, bits, softcap=softcap, scale=scale, mask_kind=mask_kind)


@pytest.mark.parametrize("bits, window, docs, softcap", [(16, 0, 0, 0.0), (4, 0, 0, 0.0), (16, 9, 2, 4.0)])
def test_kernel_head_dim_256(bits, window, docs, softcap):
    _kernel_vs_reference(1, 2, 1, 37, 256, torch.float32 if bits == 16 else torch.float16, bits, window=window, docs=docs,
                         softcap=softcap)


def test_kernel_band_with_split_dkdv():
    """dK/dV spread over two programs a key block (fp32 partials) under a window and documents."""
    _kernel_vs_reference(1, 4, 1, 52, 32, torch.float32, 16, window=11, docs=3, softcap=6.0, split=2)


# ---- GPU: bf16 at real shapes -------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize(
    "d, bits, window, docs, softcap",
    [(256, 16, 0, 0, 0.0), (256, 4, 0, 0, 0.0), (256, 8, 300, 0, 50.0), (128, 16, 300, 0, 0.0), (128, 4, 0, 5, 0.0),
     (256, 16, 0, 3, 30.0), (96, 16, 129, 2, 0.0)],
)
def test_gpu_forms_bf16(d, bits, window, docs, softcap):
    """Head dim 256, windows, documents and softcaps on the GPU at an odd length against float64."""
    b, s = 2, 1000
    q, k, v = (t.cuda() for t in _inputs(b, 8, 2, s, d, torch.bfloat16))
    segments = _documents(b, s, docs).cuda() if docs else None
    grad_out = torch.randn(q.shape, device="cuda").bfloat16()
    full = _band_mask(b, s, window, segments.cpu() if docs else None).cuda()
    want = _float64(q, k, v, full, 0.0625, softcap, grad_out)
    got = _form_op(q, k, v, None, segments, bits, grad_out, scale=0.0625, window=window, softcap=softcap)
    _assert_accurate(got, want, bits, exact_tol=1e-2)


@pytest.mark.gpu
def test_gpu_window_and_documents_skip_tiles():
    """A window of 1024 over 16384 tokens and 8 documents of 2048 run in a fraction of causal's time
    (they visit ~1/8 of its tiles): fwd+bwd under 0.35x causal's at head dim 128 (generous: launch
    and edge blocks)."""
    import triton.testing

    s = 16384
    q, k, v = (t.cuda().requires_grad_() for t in _inputs(1, 16, 4, s, 128, torch.bfloat16))
    grad_out = torch.randn(q.shape, device="cuda").bfloat16()
    segments = torch.arange(s, device="cuda")[None] // 2048

    def step(**form):
        out = torch.ops.lowmem.attention(q, k, v, None, form.pop("segments", None), causal=True, scale=0.088, kv_bits=16, **form)[0]
        out.backward(grad_out)

    causal = triton.testing.do_bench(step, warmup=5, rep=20)
    for form in ({"window": 1024}, {"segments": segments}):
        assert triton.testing.do_bench(lambda: step(**form), warmup=5, rep=20) < 0.35 * causal, form


# ---- head dim 256: cuDNN's kernels on our K/V storage (codegen/attention_cudnn.py) ---------------


def test_the_cudnn_route_is_taken_only_where_it_computes_the_same_function(monkeypatch):
    """cuDNN's fused kernel takes causal or unmasked calls at head dim 256 in 16 bits; a mask, a
    window, a softcap, documents, another head dim, fp32, the CPU or the route switched off stay on the
    Triton kernels (decided from metadata only, so the fake tensors of a plan decide alike)."""
    import types

    from lowmem_compile.codegen import attention_cudnn

    monkeypatch.setattr(torch.backends.cudnn, "is_available", lambda: True)

    def q(d=256, dtype=torch.bfloat16, device="cuda"):
        return types.SimpleNamespace(device=torch.device(device), shape=(1, 8, 64, d), dtype=dtype)

    plain = dict(mask=None, causal=True, window=0, softcap=0.0, segments=None)
    assert attention_cudnn.serves(q(), **plain)
    assert attention_cudnn.serves(q(dtype=torch.float16), **{**plain, "causal": False})
    for other in ({"mask": torch.ones(1, 1, 1, 64, dtype=torch.bool)}, {"window": 16}, {"softcap": 30.0},
                  {"segments": torch.zeros(1, 64, dtype=torch.int64)}):
        assert not attention_cudnn.serves(q(), **{**plain, **other}), other
    assert not attention_cudnn.serves(q(d=128), **plain)
    monkeypatch.setattr(attention_cudnn, "SERVED_HEAD_DIMS", attention_cudnn.HEAD_DIMS["all"])
    assert attention_cudnn.serves(q(d=128), **plain) and not attention_cudnn.serves(q(d=32), **plain)
    monkeypatch.setattr(attention_cudnn, "SERVED_HEAD_DIMS", attention_cudnn.HEAD_DIMS["1"])
    assert not attention_cudnn.serves(q(dtype=torch.float32), **plain)
    assert not attention_cudnn.serves(q(device="cpu"), **plain)
    monkeypatch.setattr(attention_cudnn, "SERVED_HEAD_DIMS", attention_cudnn.HEAD_DIMS["0"])
    assert not attention_cudnn.serves(q(), **plain)


@pytest.mark.gpu
@pytest.mark.parametrize("bits, kv_heads", [(16, 2), (4, 2), (8, 8)])
def test_gpu_head_dim_256_on_cudnn_and_on_triton_against_float64(bits, kv_heads, monkeypatch):
    """The op at head dim 256 (GQA 4:1 and none) runs cuDNN's forward and backward, both within the
    bf16 tolerances of float64; with the route off the Triton kernels run and are too."""
    from lowmem_compile.codegen import attention_cudnn

    ran = []
    for name in ("forward", "backward"):
        real = getattr(attention_cudnn, name)
        monkeypatch.setattr(attention_cudnn, name, lambda *a, _real=real, _name=name: (ran.append(_name), _real(*a))[1])
    b, s = 1, 1000
    q, k, v = (t.cuda() for t in _inputs(b, 8, kv_heads, s, 256, torch.bfloat16))
    grad_out = torch.randn(q.shape, device="cuda").bfloat16()
    want = _float64(q, k, v, None, 0.0625, 0.0, grad_out)
    got = _form_op(q, k, v, None, None, bits, grad_out, scale=0.0625)
    assert ran == ["forward", "backward"]
    _assert_accurate(got, want, bits, exact_tol=1e-2)
    monkeypatch.setattr(attention_cudnn, "SERVED_HEAD_DIMS", attention_cudnn.HEAD_DIMS["0"])
    ran.clear()
    _assert_accurate(_form_op(q, k, v, None, None, bits, grad_out, scale=0.0625), want, bits, exact_tol=1e-2)
    assert ran == []


def test_the_cudnn_route_counts_its_repeated_heads_as_workspace(monkeypatch):
    """Under GQA the cuDNN route repeats K and V to the query heads, [B, Hq, Sk, D] (Sk, not Sq,
    when the query is shorter than the keys), and in the backward their gradients too; the op's
    declared workspace says so, so the cost model sees them. Without GQA nothing is repeated."""
    from lowmem_compile.codegen import attention_cudnn

    monkeypatch.setattr(attention_cudnn, "serves", lambda *a: True)
    b, hq, hkv, sq, sk, d = 1, 8, 2, 16, 48, 256
    q = torch.empty(b, hq, sq, d, device="meta", dtype=torch.bfloat16)
    k = v = torch.empty(b, hkv, sk, d, device="meta", dtype=torch.bfloat16)
    form = dict(causal=False, scale=0.0625, kv_bits=16)
    assert [tuple(t.shape) for t in ops._workspace(q, k, v, **form)] == [(b, hq, sk, d)] * 2
    lse = torch.empty(b, hq, sq, device="meta")
    bwd = ops._bwd_workspace(q, q, k, k, v, v, q, lse, **form)
    assert [tuple(t.shape) for t in bwd[1:]] == [(b, hq, sk, d)] * 4
    same = torch.empty(b, hq, sk, d, device="meta", dtype=torch.bfloat16)
    assert ops._workspace(q, same, same, **form) == []
