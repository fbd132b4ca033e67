"""The K/V format (formats/kv4.py: 4 and 8 bits, per-group step and minimum) and the attention
reference op, as properties over shapes drawn by hypothesis, against float64 math written here.

- Format: scales are the group's minimum (exact) and (max - min) / (2^bits - 1) rounded once to
  the scale dtype (within one unit in the last place of the float64 value: the code rounds an fp32
  quotient); codes are the nearest level to (x - min) / step (equal to float64 rounding but at a
  tie, where one level either way is as near); dequantization is code * step + min rounded once
  (bit-exact: both operands are exact in fp32); the round trip errs by at most half a step plus
  what rounding step and min costs; 4-bit codes pack by halves.
- Op: `lowmem::attention` at 16, 8 and 4 bits against float64 softmax(Q Kᵀ · scale + mask) V on
  the same bits (K smoothed, then the K/V the op kept, decoded in float64), with GQA, causal,
  boolean and additive masks: outputs and the gradients of q, k, v within 1e-4 relative (fp32 math
  over at most 40 keys errs by ~1e-6; kv8's own rounding, ~3e-3, would fail it, so a mode that
  quantizes other bits than it keeps fails here).
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import lowmem_compile.ops  # noqa: F401
from lowmem_compile.formats import kv4

from .models import rel_err

HEAD_DIMS = [2, 8, 16, 48, 64, 80, 96, 128]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _group(d: int) -> int:
    """Elements a scale covers, as docs/attention.md states it: 32 where it divides D/2, else D/2."""
    return 32 if (d // 2) % 32 == 0 else d // 2


def _ulp(x: torch.Tensor) -> torch.Tensor:
    """One unit in the last place of each value of x (a 16-bit float tensor), in float64."""
    mantissa = {torch.bfloat16: 8, torch.float16: 11}[x.dtype]
    tiny = torch.finfo(x.dtype).tiny
    x64 = x.double().abs().clamp(min=tiny)
    return torch.exp2(torch.floor(torch.log2(x64)) - (mantissa - 1))


def _data(shape, dtype, seed, outliers):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * torch.rand(shape[:-1] + (1,), generator=g) * 4
    if outliers:  # RoPE'd keys carry a few large channels
        x[..., :: max(1, shape[-1] // 3)] += 20 * torch.rand(1, generator=g)
    return x.to(dtype)


@settings(max_examples=40)
@given(
    rows=st.integers(1, 12), d=st.sampled_from(HEAD_DIMS), bits=st.sampled_from([4, 8]),
    dtype=st.sampled_from(DTYPES), seed=st.integers(0, 2**16), outliers=st.booleans(),
)
def test_format_against_float64(rows, d, bits, dtype, seed, outliers):
    x = _data((rows, d), dtype, seed, outliers)
    sdt = kv4.scale_dtype(dtype)
    assert sdt == (torch.float16 if dtype == torch.float16 else torch.bfloat16)
    codes, scales = kv4.quantize(x, bits, sdt)
    g, qmax = _group(d), 2**bits - 1
    assert codes.dtype == torch.uint8 and codes.shape == (rows, d // 2 if bits == 4 else d)
    assert scales.dtype == sdt and scales.shape == (rows, d // g, 2)

    # scales: the minimum exactly, the step once rounded (within an ulp of the float64 quotient)
    groups = x.double().reshape(rows, d // g, g)
    lo, hi = groups.amin(-1), groups.amax(-1)
    step, low = scales[..., 0], scales[..., 1]
    assert torch.equal(low, lo.to(sdt))
    exact_step = (hi - lo) / qmax
    assert ((step.double() - exact_step).abs() <= _ulp(exact_step.to(sdt))).all()

    # codes: unpack by halves (byte j holds element j low, j + D/2 high), then the nearest level
    if bits == 4:
        half = d // 2
        unpacked = torch.empty(rows, d, dtype=torch.uint8)
        unpacked[:, :half], unpacked[:, half:] = codes & 15, codes >> 4
        assert torch.equal(kv4.unpack4(codes), unpacked) and torch.equal(kv4.pack4(unpacked), codes)
    else:
        unpacked = codes
    step64, low64 = step.double().unsqueeze(-1), low.double().unsqueeze(-1)
    level = torch.where(step64 > 0, (groups - low64) / step64, torch.zeros_like(groups))
    want = torch.floor(level + 0.5).clamp(0, qmax)
    got = unpacked.double().reshape(rows, d // g, g)
    at_tie = ((level - torch.floor(level)) - 0.5).abs() < 1e-4
    assert torch.equal(got[~at_tie], want[~at_tie])
    assert ((got - want).abs() <= 1)[at_tie].all()

    # dequantization: code * step + min, rounded once to fp32 (and then to the asked dtype)
    decoded = (got * step64 + low64).reshape(rows, d)
    for out_dtype in (torch.float32, dtype):
        assert torch.equal(kv4.dequantize(codes, scales, bits, out_dtype), decoded.float().to(out_dtype))

    # the round trip: half a step, plus the top level's drift from rounding the step, plus min's rounding
    bound = step64 / 2 + qmax * (step64 - exact_step.unsqueeze(-1)).abs() + (low64 - lo.unsqueeze(-1)).abs()
    assert ((decoded.reshape(groups.shape) - groups).abs() <= bound * (1 + 1e-6) + 1e-30).all()


def test_format_constants():
    """Group sizes and bytes a row, as the README and docs state them: 0.3125x of bf16 at 4 bits,
    0.5625x at 8 bits (D=128); odd head dims refused."""
    assert [kv4.group_size(d) for d in (64, 80, 96, 128, 256)] == [32, 40, 48, 32, 32]
    assert kv4.row_bytes(128, 4) / (2 * 128) == 0.3125 and kv4.row_bytes(128, 8) / (2 * 128) == 0.5625
    assert kv4.row_bytes(128, 16) == 256
    with pytest.raises(ValueError, match="even head dim"):
        kv4.group_size(7)
    with pytest.raises(ValueError, match="4 or 8 bits"):
        kv4.quantize(torch.randn(2, 8), 16, torch.bfloat16)


def test_constant_group_quantizes_exactly():
    """A group of one value (step 0) keeps it exactly, codes 0."""
    x = torch.full((3, 64), 1.25)
    for bits in (4, 8):
        codes, scales = kv4.quantize(x, bits, torch.bfloat16)
        assert not codes.any() and torch.equal(kv4.dequantize(codes, scales, bits), x)


# --- the attention reference op ------------------------------------------------------------------


def _decode64(codes, scales, bits):
    """The float64 K or V that codes and scales stand for (independent of kv4.dequantize)."""
    if bits == 4:
        codes = torch.cat([codes & 15, codes >> 4], -1)
    n = scales.shape[-2]
    c = codes.double().reshape(*codes.shape[:-1], n, -1)
    return (c * scales[..., :1].double() + scales[..., 1:].double()).reshape(codes.shape)


def _attention64(q, k, v, mask, causal, scale):
    """softmax(Q Kᵀ · scale + mask) V in float64, K/V repeated to Q's heads."""
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    s = q @ k.transpose(-1, -2) * scale
    if mask is not None:
        s = torch.where(mask, s, -math.inf) if mask.dtype == torch.bool else s + mask.double()
    if causal:
        s = s.masked_fill(torch.ones(s.shape[-2:], dtype=torch.bool).triu(1), -math.inf)
    p = torch.softmax(s, -1).nan_to_num(0.0)  # a row with no key to attend gives 0, as SDPA's does
    return p @ v


def _close(got, want, tol=1e-4):
    """Within `tol` of want's norm, or 1e-5 an element where want is ~0 (one key: dq is exactly 0
    in float64, O(1e-7) in fp32)."""
    return (got.double() - want).norm() <= tol * want.norm() + 1e-5 * want.numel() ** 0.5


@settings(max_examples=30)
@given(
    b=st.integers(1, 2), hkv=st.integers(1, 2), groups=st.integers(1, 3), sq=st.integers(1, 40),
    sk=st.integers(1, 40), d=st.sampled_from([8, 16, 32, 48, 64]), bits=st.sampled_from([16, 8, 4]),
    masking=st.sampled_from(["none", "causal", "bool", "additive", "causal+bool"]), seed=st.integers(0, 2**16),
)
def test_attention_op_against_float64_on_the_same_bits(b, hkv, groups, sq, sk, d, bits, masking, seed):
    causal = masking.startswith("causal")
    if causal:
        sk = sq
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hkv * groups, sq, d, generator=g)
    k = torch.randn(b, hkv, sk, d, generator=g) * 2 + torch.randn(d, generator=g) * 3  # a channel offset to smooth away
    v = torch.randn(b, hkv, sk, d, generator=g)
    mask = None
    if "bool" in masking:  # left padding, at least the last key kept
        keep = torch.arange(sk) >= torch.randint(0, sk, (b, 1, 1, 1), generator=g)
        mask = keep.expand(b, 1, sq, sk)
    elif masking == "additive":
        mask = torch.randn(b, 1, sq, sk, generator=g) * 2
    scale = d**-0.5
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out, lse, k_q, k_scale, v_q, v_scale = torch.ops.lowmem.attention(
        *leaves, mask, causal=causal, scale=scale, kv_bits=bits
    )

    # the same bits in float64: K smoothed (its mean over the sequence removed), then what the op kept
    if bits == 16:
        assert all(t.numel() == 0 for t in (k_q, k_scale, v_q, v_scale))
        k64, v64 = k.double(), v.double()
    else:
        smoothed = k.double() - k.double().mean(-2, keepdim=True)
        want_k = kv4.quantize(smoothed.float(), bits, torch.bfloat16)
        assert torch.equal(k_q, want_k[0]) and torch.equal(k_scale, want_k[1])
        want_v = kv4.quantize(v, bits, torch.bfloat16)
        assert torch.equal(v_q, want_v[0]) and torch.equal(v_scale, want_v[1])
        k64, v64 = _decode64(k_q, k_scale, bits), _decode64(v_q, v_scale, bits)
        # what was kept is K and V within the format's rounding (of the smoothed K)
        assert rel_err(k64, smoothed) < 0.1 if bits == 4 else rel_err(k64, smoothed) < 8e-3
    ref = [t.double().requires_grad_() for t in (q, k64, v64)]
    expected = _attention64(*ref, mask, causal, scale)
    assert out.dtype == torch.float32 and _close(out, expected)

    grad_out = torch.randn(out.shape, generator=g)
    out.backward(grad_out)
    expected.backward(grad_out.double())
    for name, got, want in zip("qkv", leaves, ref):
        # the op's dK and dV are the gradients of the K/V it kept (straight through the rounding)
        assert _close(got.grad, want.grad), name
