"""K/V format, `lowmem::attention` reference and Triton kernels against a float64 attention.

Bars: kv16 relative error < 1e-2 for O, dQ, dK, dV (fp16/bf16 level); kv4 cosine >= 0.99 for O and
>= 0.98 for the gradients; kv8 cosine >= 0.999. Kernels run under Triton's interpreter on CPU in
fp16 and fp32 (bf16 dots are wrong there, and its bf16 casts truncate) and must equal the reference
op to fp16 rounding; the dequantization kernel must equal the format's exactly.
"""

import math
import os

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lowmem_compile.formats import kv4
from lowmem_compile.ops import attention as ops

from .models import rel_err


def _assert_accurate(got, want, bits, exact_tol):
    """(O, dQ, dK, dV) against the reference: relative error at 16 bits, the module's cosine bars below."""
    for name, a, b in zip("O dQ dK dV".split(), got, want):
        if bits == 16:
            assert rel_err(a, b) < exact_tol, name
        else:
            bar = {8: 0.999, 4: 0.99 if name == "O" else 0.98}[bits]
            assert _cos(a, b) >= bar, (name, _cos(a, b))


def _cos(a, b):
    return torch.nn.functional.cosine_similarity(a.double().flatten(), b.double().flatten(), dim=0).item()


def _inputs(b, hq, hkv, s, d, dtype, sk=None, seed=0):
    """Random q, k, v; k carries a per-channel offset (what smoothing removes) like RoPE'd keys."""
    g = torch.Generator().manual_seed(seed)
    sk = s if sk is None else sk
    q = torch.randn(b, hq, s, d, generator=g)
    k = torch.randn(b, hkv, sk, d, generator=g) + 2 * torch.randn(d, generator=g)
    v = torch.randn(b, hkv, sk, d, generator=g)
    return q.to(dtype), k.to(dtype), v.to(dtype)


def _mask(kind, b, hq, s, sk):
    g = torch.Generator().manual_seed(1)
    if kind == "bool":
        return torch.rand(b, 1, s, sk, generator=g) > 0.3
    if kind == "additive":
        keep = torch.rand(b, hq, s, sk, generator=g) > 0.3
        return torch.where(keep, torch.randn(b, hq, s, sk, generator=g) * 0.1, torch.finfo(torch.float32).min)
    if kind == "padding":
        m = torch.ones(b, 1, 1, sk, dtype=torch.bool)
        m[0, ..., : sk // 3] = False
        return m
    if kind == "padding_heads":  # one key vector a query head; whole key blocks masked; one head masks every key
        m = torch.ones(b, hq, 1, sk, dtype=torch.bool)
        m[0, 0] = False
        m[0, 1:, :, :40] = False
        m[-1, :, :, sk - 5 :] = False
        return m
    if kind == "padding_additive":  # HF's finfo.min padding, -inf, and small biases on the other keys
        m = torch.randn(b, 1, 1, sk, generator=g) * 0.5
        m[0, ..., :40] = torch.finfo(torch.float32).min
        m[0, ..., 40:43] = float("-inf")
        m[-1, ..., sk - 5 :] = float("-inf")
        return m
    return None


def _float64_reference(q, k, v, mask, causal, scale, grad_out):
    """SDPA's math in float64 on repeated K/V: (O, dQ, dK, dV)."""
    q, k, v = (t.detach().double().requires_grad_() for t in (q, k, v))
    rep = q.shape[1] // k.shape[1]
    kr, vr = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    s = q @ kr.transpose(-1, -2) * scale
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else s + mask.double()
    if causal:
        s = s.masked_fill(torch.ones(s.shape[-2:], dtype=torch.bool, device=s.device).triu(1), float("-inf"))
    p = torch.softmax(s, -1).nan_to_num(0.0)
    o = p @ vr
    return (o, *torch.autograd.grad(o, (q, k, v), grad_out.double()))


def _op(q, k, v, mask, causal, scale, bits, grad_out):
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out = torch.ops.lowmem.attention(q, k, v, mask, causal=causal, scale=scale, kv_bits=bits)[0]
    return (out, *torch.autograd.grad(out, (q, k, v), grad_out))


# ---- format ----------------------------------------------------------------------------------


@pytest.mark.parametrize("d, group", [(16, 8), (64, 32), (80, 40), (96, 48), (128, 32)])
def test_group_size(d, group):
    assert kv4.group_size(d) == group and (d // 2) % group == 0


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("d", [64, 96])
def test_quantize_roundtrip_within_half_a_step(bits, d):
    x = torch.randn(2, 3, 17, d) * 3 + 1
    codes, scales = kv4.quantize(x, bits, torch.float16)
    assert codes.dtype == torch.uint8 and codes.shape[-1] == kv4.code_cols(d, bits)
    assert scales.shape == (2, 3, 17, d // kv4.group_size(d), 2) and scales.dtype == torch.float16
    back = kv4.dequantize(codes, scales, bits)
    step = scales[..., 0].float().repeat_interleave(kv4.group_size(d), -1)
    # half a step of rounding plus the fp16 rounding of min and step times the largest code
    assert ((back - x).abs() <= 0.5 * step + 2**-10 * (x.abs() + (2**bits - 1) * step) + 1e-6).all()


def test_pack4_is_split_by_halves():
    codes = torch.randint(0, 16, (5, 64), dtype=torch.uint8)
    packed = kv4.pack4(codes)
    assert torch.equal(packed[:, 3] & 15, codes[:, 3]) and torch.equal(packed[:, 3] >> 4, codes[:, 35])
    assert torch.equal(kv4.unpack4(packed), codes)


def test_smoothing_leaves_attention_unchanged():
    q, k, v = _inputs(1, 2, 1, 9, 16, torch.float64)
    a, _ = ops.attend(q, k, v, None, ops.Form(True, 0.25))
    b, _ = ops.attend(q, kv4.smooth(k).double(), v, None, ops.Form(True, 0.25))
    assert rel_err(a, b) < 1e-6


def test_bytes_kept_at_4_bits():
    assert kv4.row_bytes(128, 4) / kv4.row_bytes(128, 16) == 0.3125


def test_bad_inputs_raise():
    q, k, v = _inputs(1, 3, 2, 8, 16, torch.float32)
    with pytest.raises(RuntimeError, match="no multiple"):
        torch.ops.lowmem.attention(q, k, v, None, causal=False, scale=1.0, kv_bits=16)
    q, k, v = _inputs(1, 2, 1, 8, 16, torch.float32)
    with pytest.raises(ValueError, match="kv_bits"):
        torch.ops.lowmem.attention(q, k, v, None, causal=False, scale=1.0, kv_bits=3)
    with pytest.raises(ValueError, match="mask must be bool"):
        torch.ops.lowmem.attention(q, k, v, torch.ones(8, 8, dtype=torch.long), causal=False, scale=1.0, kv_bits=4)


# ---- reference op against float64 -------------------------------------------------------------


@pytest.mark.parametrize("mask_kind, causal", [(None, True), ("bool", False), ("additive", False), ("padding", True)])
@pytest.mark.parametrize("bits", [16, 8, 4])
def test_reference_op_accuracy(mask_kind, causal, bits):
    q, k, v = _inputs(2, 4, 2, 33, 64, torch.float32)
    mask = _mask(mask_kind, 2, 4, 33, 33)
    grad_out = torch.randn(q.shape)
    scale = 1 / math.sqrt(64)
    want = _float64_reference(q, k, v, mask, causal, scale, grad_out)
    got = _op(q, k, v, mask, causal, scale, bits, grad_out)
    _assert_accurate(got, want, bits, exact_tol=1e-5)


def test_fully_masked_row_gives_zero():
    q, k, v = _inputs(1, 2, 2, 6, 16, torch.float32)
    mask = torch.ones(1, 1, 6, 6, dtype=torch.bool)
    mask[..., 2, :] = False
    out, lse = torch.ops.lowmem.attention(q, k, v, mask, causal=False, scale=0.25, kv_bits=16)[:2]
    assert torch.equal(out[:, :, 2], torch.zeros_like(out[:, :, 2])) and torch.isinf(lse[:, :, 2]).all()


def test_kv4_keeps_kv_at_kv_heads_and_in_4_bits():
    q, k, v = _inputs(1, 8, 2, 40, 64, torch.bfloat16)
    out, lse, kq, ks, vq, vs = torch.ops.lowmem.attention(q, k, v, None, causal=True, scale=0.125, kv_bits=4)
    kept = sum(t.numel() * t.element_size() for t in (kq, ks, vq, vs))
    assert kq.shape[:3] == (1, 2, 40) and kept / (2 * k.numel() * 2) == 0.3125


def test_fake_impl_with_symbolic_sizes():
    q, k, v = _inputs(1, 4, 2, 24, 32, torch.float32)
    f = torch.compile(lambda q, k, v: torch.ops.lowmem.attention(q, k, v, None, causal=True, scale=0.1, kv_bits=4)[0], backend="eager", dynamic=True, fullgraph=True)
    for s in (24, 31):
        q, k, v = _inputs(1, 4, 2, s, 32, torch.float32)
        assert rel_err(f(q, k, v), torch.ops.lowmem.attention(q, k, v, None, causal=True, scale=0.1, kv_bits=4)[0]) < 1e-6


# ---- Triton kernels (interpreter on CPU) -------------------------------------------------------


def _kernel_vs_reference(b, hq, hkv, s, d, dtype, bits, causal, mask_kind, sk=None, splits=(None,)):
    """Kernel forward, then its backward at each dK/dV split (None: the launcher's rule), against the
    reference op on the same inputs: (forward outputs, [(dQ, dK, dV) per split])."""
    from lowmem_compile.codegen import attention_kv4 as kern

    sk = s if sk is None else sk
    q, k, v = _inputs(b, hq, hkv, s, d, dtype, sk=sk, seed=s + d)
    mask = _mask(mask_kind, b, hq, s, sk)
    scale = 1 / math.sqrt(d)
    grad_out = torch.randn(q.shape).to(dtype)
    ref = ops._reference(q, k, v, mask, causal=causal, scale=scale, kv_bits=bits)
    got = kern.forward(q, k, v, mask, causal, scale, bits)
    saved = (k, got[3], v, got[5]) if bits == 16 else got[2:]
    ref_saved = (k, ref[3], v, ref[5]) if bits == 16 else ref[2:]
    ref_grads = ops._bwd_reference(grad_out, q, *ref_saved, ref[0], ref[1], mask, causal=causal, scale=scale, kv_bits=bits)
    tol = 1e-5 if dtype == torch.float32 else 5e-3
    if bits != 16:  # K and V codes equal but where a value rounds at a tie; their scales equal
        for codes in (2, 4):
            assert (got[codes] != ref[codes]).float().mean() < 1e-3, codes
        for scales in (3, 5):
            assert torch.equal(got[scales], ref[scales]), scales
    assert rel_err(got[0], ref[0]) < tol
    finite = torch.isfinite(ref[1])
    assert torch.equal(finite, torch.isfinite(got[1])) and rel_err(got[1][finite], ref[1][finite]) < tol
    all_grads = []
    for split in splits:
        grads = kern.backward(grad_out, q, *saved, got[0], got[1], mask, causal, scale, bits, split=split)
        for name, a, r in zip(("dQ", "dK", "dV"), grads, ref_grads):
            assert rel_err(a, r) < 2 * tol, (name, split)
        all_grads.append(grads)
    return got, all_grads


_SLOW = pytest.mark.slow


@pytest.mark.parametrize(
    "bits, causal, mask_kind",
    [
        (16, True, None),
        (4, True, None),
        (8, True, "padding"),
        pytest.param(4, False, "bool", marks=_SLOW),  # bool tiles: test_kernel_cross_attention_lengths
        pytest.param(16, False, "additive", marks=_SLOW),
        (4, False, "additive"),
    ],
)
def test_kernel_matches_reference_fp16(bits, causal, mask_kind):
    _kernel_vs_reference(1, 4, 2, 45, 64, torch.float16, bits, causal, mask_kind)


@pytest.mark.parametrize("bits, causal, mask_kind", [(16, True, "padding_heads"), (4, False, "padding_additive")])
def test_kernel_key_padding_masks(bits, causal, mask_kind):
    """Key masks are read as one vector a key block: per-head vectors, key blocks masked whole (their
    dK/dV programs skip every query block), HF's finfo.min rows (which average every key) and -inf."""
    got, (grads,) = _kernel_vs_reference(2, 4, 2, 70, 64, torch.float16, bits, causal, mask_kind)
    if mask_kind == "padding_heads":  # head 0 of batch 0 attends to nothing: O and dQ are exactly 0
        assert not got[0][0, 0].any() and not grads[0][0, 0].any() and torch.isinf(got[1][0, 0]).all()
        assert got[0][0, 1].abs().sum() > 0


def test_kernel_fp32_exact_kv16():
    _kernel_vs_reference(2, 2, 1, 37, 64, torch.float32, 16, True, None)


@settings(max_examples=3, deadline=None)
@given(
    s=st.integers(2, 50),  # one key only makes dQ exactly 0, where a relative error means nothing
    d=st.sampled_from([32, 80, 96, 128]),
    group=st.sampled_from([1, 2, 4]),
    bits=st.sampled_from([16, 4]),
    causal=st.booleans(),
)
def test_kernel_odd_shapes(s, d, group, bits, causal):
    _kernel_vs_reference(1, 2 * group, 2, s, d, torch.float16, bits, causal, None)


@pytest.mark.parametrize("d, bits", [(128, 4), (32, 4), (80, 8), (96, 4), (80, 16)])
def test_kernel_head_dims(d, bits):
    """Every tile layout: 4 groups (two a nibble) at 128, one a half at 32, halves padded to 64 at 80/96."""
    _kernel_vs_reference(1, 4, 2, 21, d, torch.float16, bits, True, None)


def test_kernel_cross_attention_lengths():
    _kernel_vs_reference(1, 2, 1, 19, 64, torch.float16, 4, False, "bool", sk=50)


@pytest.mark.parametrize(
    "b, bits, causal, mask_kind, split",
    [(2, 4, True, "padding", 2), (1, 8, False, None, 4), (1, 16, True, "padding_heads", 4), (1, 4, False, "additive", 2)],
)
def test_kernel_dkdv_split(b, bits, causal, mask_kind, split):
    """dK/dV with a key block's 4 query heads spread over `split` programs (fp32 partials, summed)
    equals the unsplit kernel to rounding (fp32 at 16 bits; fp16 at 4/8 bits, since fp32 data keeps
    bf16 scales, which the interpreter truncates), and both the reference op: two KV heads and two
    batches (the transient K/V's and the partials' indexing), a length no block divides, key-padding
    masks with key blocks masked whole, a general mask."""
    dtype, tol = (torch.float32, 1e-6) if bits == 16 else (torch.float16, 1e-3)
    _, (whole, parts) = _kernel_vs_reference(b, 8, 2, 45, 32, dtype, bits, causal, mask_kind, splits=(1, split))
    for name, a, b in zip(("dQ", "dK", "dV"), parts, whole):
        assert rel_err(a, b) < tol, name


def test_dkdv_split_rule_and_bad_split():
    from lowmem_compile.codegen import attention_kv4 as kern

    # H200, 8 KV heads of 4 query heads, BLOCK_N = 128: S = 1024, 2048, 4096 (causal); 2048 not causal
    assert [kern.dkdv_split(8, 4, n, True, 132) for n in (8, 16, 32)] == [4, 2, 1]
    assert kern.dkdv_split(8, 4, 16, False, 132) == 2 and kern.dkdv_split(8, 1, 2, True, 132) == 1
    assert kern.dkdv_split(1, 6, 4, True, 132) == 6  # never enough: every head its own program
    q, k, v = _inputs(1, 4, 2, 8, 32, torch.float32)
    fwd = kern.forward(q, k, v, None, True, 0.2, 16)
    with pytest.raises(ValueError, match="split 3 does not divide the 2 query heads"):
        kern.backward(torch.randn(q.shape), q, k, fwd[3], v, fwd[5], fwd[0], fwd[1], None, True, 0.2, 16, split=3)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("d", [32, 80, 96, 128])
def test_dequantize_kernel_is_exact(bits, d):
    """The transient K/V the attention kernels read equals the format's dequantization bit for bit:
    fp16 codes/scales to fp16, bf16 scales to fp32 (bf16 output is checked on the GPU), at a length
    no row block divides, two batches, three heads."""
    from lowmem_compile.codegen import attention_kv4 as kern

    x = torch.randn(2, 3, 37, d) * 3 + 1
    for scales_dtype, dtype in ((torch.float16, torch.float16), (torch.bfloat16, torch.float32)):
        codes, scales = kv4.quantize(x, bits, scales_dtype)
        want = kv4.dequantize(codes, scales, bits, dtype)
        assert torch.equal(kern.dequantize(codes, scales, bits, dtype), want) and want.abs().sum() > 0


@pytest.mark.parametrize("bits, d", [(4, 64), (8, 96), (4, 128), (4, 80), pytest.param(8, 64, marks=_SLOW), pytest.param(4, 96, marks=_SLOW)])
def test_quantize_kernel_is_bit_exact(bits, d):
    from lowmem_compile.codegen import attention_kv4 as kern

    x = (torch.randn(2, 2, 37, d) * 2 + 1).half()
    codes, scales = kern.quantize(x, bits, smooth=True)
    want_codes, want_scales = kv4.quantize(kv4.smooth(x), bits, torch.float16)
    assert torch.equal(codes, want_codes) and torch.equal(scales, want_scales)


# ---- GPU: bf16 at real shapes ------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize(
    "d, bits",
    [(128, 16), (128, 8), (128, 4), (64, 4), (96, 16), *(pytest.param(d, b, marks=_SLOW) for d, b in [(64, 16), (64, 8), (96, 8), (96, 4)])],
)
def test_gpu_bf16_against_float64(d, bits):
    q, k, v = (t.cuda() for t in _inputs(2, 8, 2, 1000, d, torch.bfloat16))
    grad_out = torch.randn(q.shape, device="cuda").bfloat16()
    scale = 1 / math.sqrt(d)
    want = _float64_reference(q, k, v, None, True, scale, grad_out)
    got = _op(q, k, v, None, True, scale, bits, grad_out)
    _assert_accurate(got, want, bits, exact_tol=1e-2)


@pytest.mark.gpu
@pytest.mark.parametrize(
    "mask_kind, causal, bits",
    [("padding", True, 16), ("padding_heads", True, 4), ("padding_additive", False, 16), ("bool", False, 16), ("additive", True, 8)],
)
def test_gpu_masks_bf16(mask_kind, causal, bits):
    """Every mask path at an odd length (unaligned mask rows): key vectors and general tiles."""
    q, k, v = (t.cuda() for t in _inputs(2, 8, 2, 777, 128, torch.bfloat16))
    mask = _mask(mask_kind, 2, 8, 777, 777).cuda()
    grad_out = torch.randn(q.shape, device="cuda").bfloat16()
    want = _float64_reference(q, k, v, mask, causal, 0.088, grad_out)
    got = _op(q, k, v, mask, causal, 0.088, bits, grad_out)
    _assert_accurate(got, want, bits, exact_tol=1e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("bits", [4, 8])
def test_gpu_dequantize_exact_bf16(bits):
    from lowmem_compile.codegen import attention_kv4 as kern

    x = (torch.randn(2, 8, 1000, 128, device="cuda") * 3 + 1).bfloat16()
    codes, scales = kern.quantize(x, bits, smooth=True)
    want = kv4.dequantize(codes, scales, bits, torch.bfloat16)
    assert torch.equal(kern.dequantize(codes, scales, bits, torch.bfloat16), want)


@pytest.mark.gpu
@pytest.mark.parametrize("bits", [16, 4])
def test_gpu_dkdv_split_bf16(bits):
    """The launcher splits dK/dV at 2048 tokens on 8 KV heads (more programs than SMs otherwise
    unbalanced); every split equals the unsplit kernel within bf16 rounding of the sum."""
    from lowmem_compile.codegen import attention_kv4 as kern

    q, k, v = (t.cuda() for t in _inputs(1, 32, 8, 2048, 128, torch.bfloat16))
    grad_out = torch.randn(q.shape, device="cuda").bfloat16()
    fwd = kern.forward(q, k, v, None, True, 0.088, bits)
    saved = (k, fwd[3], v, fwd[5]) if bits == 16 else fwd[2:]
    grads = {s: kern.backward(grad_out, q, *saved, fwd[0], fwd[1], None, True, 0.088, bits, split=s) for s in (1, 2, 4, None)}
    for s in (2, 4, None):
        for name, a, b in zip(("dQ", "dK", "dV"), grads[s], grads[1]):
            assert rel_err(a, b) < 4e-3, (name, s)


def test_tuned_configs_are_kept_on_disk():
    """Each autotuned attention kernel asks Triton to keep its tuned config on disk (where this
    Triton has the option), so processes on one machine launch the same kernels and round alike."""
    import inspect

    import triton

    from lowmem_compile.codegen import attention_kv4

    supported = "cache_results" in inspect.signature(triton.autotune).parameters
    asked = []
    real = triton.autotune

    def recording(*args, **kwargs):
        asked.append(kwargs)
        return real(*args, **kwargs)

    triton.autotune = recording
    try:
        for kind, kernel in (("fwd", attention_kv4._fwd_kernel), ("dq", attention_kv4._dq_kernel),
                             ("dkdv", attention_kv4._dkdv_kernel)):
            attention_kv4._autotune(kind, kernel)
    finally:
        triton.autotune = real
    assert len(asked) == 3 and all(a.get("cache_results", False) == supported for a in asked), asked


def test_measured_picks_only_where_measured(monkeypatch):
    """The untuned launch (`measured_pick`) covers only what the attention benches measured on sm_90:
    head dims up to 128, no general mask, window or softcap; the forward between 2048 and 8192 tokens
    tunes; `LOWMEM_AUTOTUNE=full` and any other device tune everything. Each pick is a config the
    autotuner would have tried (the dK/dV split rule assumes so)."""
    from lowmem_compile.codegen import attention_kv4 as ak

    monkeypatch.setattr(ak, "_INTERPRET", False)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    cuda = torch.device("cuda")
    base = dict(D=128, MASK_KIND=0, BAND=False, SOFTCAP=False, SQ=8192)
    for kind in ("fwd", "dq", "dkdv"):
        for meta in (base, {**base, "SQ": 1024}, {**base, "MASK_KIND": 1}):
            pick = ak.measured_pick(kind, meta, cuda)
            assert pick in ak.tried(kind, meta["MASK_KIND"], meta["D"]), (kind, meta, pick)
        for unmeasured in ({"D": 256}, {"MASK_KIND": 2}, {"BAND": True}, {"SOFTCAP": True}):
            assert ak.measured_pick(kind, {**base, **unmeasured}, cuda) is None, (kind, unmeasured)
        assert ak.measured_pick(kind, base, torch.device("cpu")) is None
    assert ak.measured_pick("fwd", base, cuda) != ak.measured_pick("fwd", {**base, "SQ": 2048}, cuda)
    assert ak.measured_pick("fwd", {**base, "SQ": 4096}, cuda) is None
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    assert ak.measured_pick("dq", base, cuda) is None
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setenv("LOWMEM_AUTOTUNE", "full")
    assert ak.measured_pick("dq", base, cuda) is None
