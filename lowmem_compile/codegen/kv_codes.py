"""K and V to 4/8-bit codes and back, on the GPU: formats/kv4.py's math, bit for bit.

`quantize` writes the codes and per-group (step, min) of formats/kv4.py (K smoothed by its sequence
mean first); `dequantize` expands them into a 16-bit K or V [B, H, S, D], the transient copy the
attention kernels of attention_kv4.py read at 4 and 8 bits (once a pass: quantize, dequantize,
attend in the forward; dequantize, attend in the backward). Both are memory bound: one program per
[BLOCK_S, D] tile of one head, the row as [NG, TG] groups (TG the group size's next power of two).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ..formats import kv4

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


@triton.jit
def _quantize_kernel(X, Mean, Codes, Scales, stride_xb, stride_xh, stride_xn, stride_xd, H, S,
                     D: tl.constexpr, NG: tl.constexpr, GROUP: tl.constexpr, TG: tl.constexpr,
                     KV_BITS: tl.constexpr, SMOOTH: tl.constexpr, BLOCK_S: tl.constexpr):
    """One [BLOCK_S, D] tile of K or V, as [rows, NG, TG] groups, to codes and (step, min) per group;
    formats/kv4.py's math. 4 bits: groups NG/2.. go to the high nibbles of groups 0.."""
    pid_s, pid_bh = tl.program_id(0), tl.program_id(1)
    b, h = pid_bh // H, pid_bh % H
    offs_s = pid_s * BLOCK_S + tl.arange(0, BLOCK_S)
    s_ok = offs_s < S
    j = tl.arange(0, TG)
    j_ok = (j < GROUP)[None, None, :]
    col = tl.arange(0, NG)[:, None] * GROUP + j[None, :]
    x_ptrs = X + b * stride_xb + h * stride_xh + offs_s[:, None, None] * stride_xn + col[None, :, :] * stride_xd
    x = tl.load(x_ptrs, mask=s_ok[:, None, None] & j_ok, other=0.0).to(tl.float32)
    if SMOOTH:
        x -= tl.load(Mean + pid_bh * D + col, mask=j < GROUP, other=0.0)[None, :, :]
    QMAX: tl.constexpr = (1 << KV_BITS) - 1
    low = tl.min(tl.where(j_ok, x, float("inf")), axis=2)
    high = tl.max(tl.where(j_ok, x, float("-inf")), axis=2)
    step = tl.math.div_rn(high - low, tl.full(high.shape, QMAX, tl.float32)).to(Scales.dtype.element_ty)
    low = low.to(Scales.dtype.element_ty)
    sptrs = Scales + (pid_bh * S + offs_s)[:, None] * (2 * NG) + 2 * tl.arange(0, NG)[None, :]
    tl.store(sptrs, step, mask=s_ok[:, None])
    tl.store(sptrs + 1, low, mask=s_ok[:, None])
    step32 = step.to(tl.float32)
    inv = tl.where(step32 > 0, tl.math.div_rn(tl.full(step32.shape, 1.0, tl.float32), step32), 0.0)
    c = tl.floor((x - low.to(tl.float32)[:, :, None]) * inv[:, :, None] + 0.5)
    c = tl.minimum(tl.maximum(c, 0.0), QMAX * 1.0).to(tl.uint8)
    if KV_BITS == 4:
        NB: tl.constexpr = NG // 2
        lo, hi = tl.split(tl.permute(tl.reshape(c, (BLOCK_S, 2, NB, TG)), (0, 2, 3, 1)))
        c = lo | (hi << 4)
        col = tl.arange(0, NB)[:, None] * GROUP + j[None, :]
        row_bytes: tl.constexpr = D // 2
    else:
        row_bytes: tl.constexpr = D
    c_ptrs = Codes + (pid_bh * S + offs_s)[:, None, None] * row_bytes + col[None, :, :]
    tl.store(c_ptrs, c, mask=s_ok[:, None, None] & j_ok)


@triton.jit
def _dequantize_kernel(Codes, Scales, Out, S, D: tl.constexpr, NG: tl.constexpr, GROUP: tl.constexpr,
                       TG: tl.constexpr, KV_BITS: tl.constexpr, BLOCK_S: tl.constexpr):
    """One [BLOCK_S, D] tile of K or V, as [rows, NG, TG] groups, from codes and (step, min) per group:
    code · step + min in fp32, cast to Out's dtype (formats/kv4.py's math; the product of a code and a
    16-bit step is exact in fp32, so a fused multiply-add gives the same value). 4 bits: groups NG/2..
    are the high nibbles of the bytes of groups 0.."""
    pid_s, pid_bh = tl.program_id(0), tl.program_id(1)
    offs_s = pid_s * BLOCK_S + tl.arange(0, BLOCK_S)
    s_ok = offs_s < S
    rows = pid_bh * S + offs_s
    g = tl.arange(0, NG)[:, None]
    j = tl.arange(0, TG)[None, :]
    ok = s_ok[:, None, None] & (j < GROUP)[None, :, :]
    NB: tl.constexpr = NG * KV_BITS // 8  # groups of bytes: all NG at 8 bits, the first half's at 4
    ROW_BYTES: tl.constexpr = D * KV_BITS // 8
    raw = tl.load(Codes + rows[:, None, None] * ROW_BYTES + ((g % NB) * GROUP + j)[None, :, :], mask=ok, other=0)
    codes = (raw >> ((g // NB) * 4)[None, :, :]) & ((1 << KV_BITS) - 1)
    sptrs = Scales + rows[:, None] * (2 * NG) + 2 * tl.arange(0, NG)[None, :]
    step = tl.load(sptrs, mask=s_ok[:, None], other=0.0).to(tl.float32)
    low = tl.load(sptrs + 1, mask=s_ok[:, None], other=0.0).to(tl.float32)
    x = codes.to(tl.float32) * step[:, :, None] + low[:, :, None]
    tl.store(Out + rows[:, None, None] * D + (g * GROUP + j)[None, :, :], x.to(Out.dtype.element_ty), mask=ok)


def quantize(x: torch.Tensor, kv_bits: int, smooth: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """K (smooth=True) or V [B, H, S, D] -> (codes, scales), the layout of formats/kv4.py."""
    b, h, s, d = x.shape
    group = kv4.group_size(d)
    codes = x.new_empty(b, h, s, kv4.code_cols(d, kv_bits), dtype=torch.uint8)
    scales = x.new_empty(b, h, s, d // group, 2, dtype=kv4.scale_dtype(x.dtype))
    mean = x.mean(dim=2, dtype=torch.float32) if smooth else scales  # no fp32 copy of x
    block_s = 32 if _INTERPRET else 64
    _quantize_kernel[(triton.cdiv(s, block_s), b * h)](
        x, mean, codes, scales, *x.stride(), h, s, D=d, NG=d // group, GROUP=group,
        TG=triton.next_power_of_2(group), KV_BITS=kv_bits, SMOOTH=smooth, BLOCK_S=block_s)
    return codes, scales


def dequantize(codes: torch.Tensor, scales: torch.Tensor, kv_bits: int, dtype: torch.dtype) -> torch.Tensor:
    """(codes, scales) of `quantize` -> K or V [B, H, S, D] in `dtype`: kv4.dequantize's values, the
    transient 16-bit copy the attention kernels read."""
    b, h, s, cols = codes.shape
    d = cols * 8 // kv_bits
    ng = scales.shape[3]
    out = torch.empty(b, h, s, d, dtype=dtype, device=codes.device)
    block_s = 32 if _INTERPRET else 64
    _dequantize_kernel[(triton.cdiv(s, block_s), b * h)](
        codes.contiguous(), scales.contiguous(), out, s, D=d, NG=ng, GROUP=d // ng,
        TG=triton.next_power_of_2(d // ng), KV_BITS=kv_bits, BLOCK_S=block_s)
    return out
