"""Triton kernels for linear layers whose weight W [N, K] is stored in NF4 (bitsandbytes' layout).

    forward   y      = x      · Wᵀ (+ b)      x [..., K],      y [..., N]
    backward  grad_x = grad_y · W             grad_y [..., N], grad_x [..., K]

Two strategies, chosen per shape by :func:`_use_fused` (M = tokens = product of leading dims):

* fused (M ≤ FUSED_MAX_M, memory-bound): each program dequantizes its W tile in registers and feeds
  `tl.dot`; W is read once as 0.5 byte an element (+ 4/blocksize for the absmax, 1/blocksize when
  double-quantized) against 2 bytes in bf16, so the kernel moves ~3.6x fewer bytes than cuBLAS. When
  the output tiles cannot fill the GPU the reduction dimension is split and fp32 partials summed.
* dequant + cuBLAS (large M, compute-bound): a bandwidth-bound kernel writes W in 16 bits into a
  transient buffer (freed right after the matmul, so the caching allocator hands the same block to
  the next layer), then cuBLAS multiplies. Extra traffic: 2·N·K bytes written and read once.

Every W element is code[nibble] · absmax in fp32, rounded once to the activation dtype, as the
reference does: the dequantized W is bit-identical to bitsandbytes'. A double-quantized absmax is
code2[q] · absmax2 + offset in two fp32 roundings (launches disable fp contraction for that).
The fused path needs K % blocksize == 0 (blocks never straddle rows); other shapes take the dequant
path. Activations: bf16, fp16, fp32; any leading dims; optional bias.
"""

from __future__ import annotations

import functools
import math
import os

import torch
import triton
import triton.language as tl

from ..formats import nf4 as nf4_format

#: Up to this many tokens the fused kernel runs, above it dequant + cuBLAS. Default 0 (fused off): on
#: H200 the fused kernel measured 9-21x slower than dequant + cuBLAS at M <= 16 (bench/results/nf4).
FUSED_MAX_M = int(os.environ.get("LOWMEM_NF4_FUSED_MAX_M", "0"))
_DEQUANT_BYTES = 4096  # packed bytes a dequant program handles: 16 per thread at 8 warps
_DEQUANT_WARPS = 8


@triton.jit
def _block_scale(absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, block, mask, NESTED: tl.constexpr):
    """The fp32 absmax of NF4 block `block`: stored, or code2[q] · absmax2[block // 256] + offset."""
    if NESTED:  # one return for both branches: Triton needs a single result type
        q = tl.load(absmax_ptr + block, mask=mask, other=0).to(tl.int32)
        scale = tl.load(code2_ptr + q, mask=mask, other=0.0) * tl.load(absmax2_ptr + block // 256, mask=mask, other=0.0)
        scale = scale + tl.load(offset_ptr)
    else:
        scale = tl.load(absmax_ptr + block, mask=mask, other=0.0)
    return scale


@triton.jit
def _w_tile(packed_ptr, code_ptr, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, offs_n, offs_kh, N, KH,
            BLOCKSIZE: tl.constexpr, NESTED: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """W[offs_n, 2·offs_kh .. 2·offs_kh+1] as fp32 [BLOCK_N, BLOCK_K]; offs_kh indexes the KH = K/2 packed
    bytes of a row (passed as its own argument so that its alignment is known and loads vectorize)."""
    mask = (offs_n[:, None] < N) & (offs_kh[None, :] < KH)
    byte = tl.load(packed_ptr + offs_n[:, None] * KH + offs_kh[None, :], mask=mask, other=0).to(tl.int32)
    # Both nibbles of a byte lie in the same NF4 block (block sizes are even), so one scale serves both.
    block = (offs_n[:, None] * KH + offs_kh[None, :]) // (BLOCKSIZE // 2)
    scale = _block_scale(absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, block, mask, NESTED)
    hi = tl.load(code_ptr + (byte >> 4)) * scale
    lo = tl.load(code_ptr + (byte & 0xF)) * scale
    return tl.reshape(tl.join(hi, lo), (BLOCK_N, BLOCK_K))  # high nibble first


@triton.jit
def _fused_fwd_kernel(x_ptr, packed_ptr, code_ptr, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, bias_ptr, y_ptr,
                      M, N, K, KH, stride_xm, stride_ym, stride_ys, K_PER_SPLIT,
                      BLOCKSIZE: tl.constexpr, NESTED: tl.constexpr, HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """y[m, n] (or the fp32 partial of split pid_s) = Σ_k x[m, k] · W[n, k] over this split's K range."""
    pid_m, pid_n, pid_s = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    k_start = pid_s * K_PER_SPLIT
    for k0 in range(k_start, tl.minimum(k_start + K_PER_SPLIT, K), BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :],
                    mask=(offs_m[:, None] < M) & (offs_k[None, :] < K), other=0.0)
        w = _w_tile(packed_ptr, code_ptr, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, offs_n,
                    k0 // 2 + tl.arange(0, BLOCK_K // 2), N, KH, BLOCKSIZE, NESTED, BLOCK_N, BLOCK_K)
        acc += tl.dot(x, tl.trans(w.to(x.dtype)), input_precision=PRECISION)
    if HAS_BIAS:  # rounded to the activation dtype first, as F.linear(x, W, bias.to(x.dtype)) does
        bias = tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(x_ptr.dtype.element_ty)
        acc += bias.to(tl.float32)[None, :]
    out = y_ptr + pid_s * stride_ys + offs_m[:, None] * stride_ym + offs_n[None, :]
    tl.store(out, acc.to(y_ptr.dtype.element_ty), mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))


@triton.jit
def _fused_bwd_kernel(g_ptr, packed_ptr, code_ptr, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, gx_ptr,
                      M, N, K, KH, stride_gm, stride_xm, stride_xs, N_PER_SPLIT,
                      BLOCKSIZE: tl.constexpr, NESTED: tl.constexpr, PRECISION: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """grad_x[m, k] (or the fp32 partial of split pid_s) = Σ_n grad_y[m, n] · W[n, k] over this split's N range."""
    pid_m, pid_k, pid_s = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_kh = pid_k * (BLOCK_K // 2) + tl.arange(0, BLOCK_K // 2)
    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    n_start = pid_s * N_PER_SPLIT
    for n0 in range(n_start, tl.minimum(n_start + N_PER_SPLIT, N), BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        g = tl.load(g_ptr + offs_m[:, None] * stride_gm + offs_n[None, :],
                    mask=(offs_m[:, None] < M) & (offs_n[None, :] < N), other=0.0)
        w = _w_tile(packed_ptr, code_ptr, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, offs_n, offs_kh,
                    N, KH, BLOCKSIZE, NESTED, BLOCK_N, BLOCK_K)
        acc += tl.dot(g, w.to(g.dtype), input_precision=PRECISION)
    out = gx_ptr + pid_s * stride_xs + offs_m[:, None] * stride_xm + offs_k[None, :]
    tl.store(out, acc.to(gx_ptr.dtype.element_ty), mask=(offs_m[:, None] < M) & (offs_k[None, :] < K))


@triton.jit
def _dequant_kernel(packed_ptr, code_ptr, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, out_ptr, numel, nbytes,
                    BLOCKSIZE: tl.constexpr, NESTED: tl.constexpr, ROWS: tl.constexpr, EVEN: tl.constexpr):
    """ROWS whole NF4 blocks a program, one row each: one scale load per block and contiguous, wide
    loads and stores (out[2i], out[2i+1] = code[hi], code[lo] of byte i, times the block's absmax)."""
    block = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    byte = block[:, None] * (BLOCKSIZE // 2) + tl.arange(0, BLOCKSIZE // 2)[None, :]
    elem = block[:, None] * BLOCKSIZE + tl.arange(0, BLOCKSIZE)[None, :]
    scale = _block_scale(absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, block, block * BLOCKSIZE < numel, NESTED)
    if EVEN:  # every program full: unmasked, so loads and stores vectorize regardless of numel's alignment
        packed = tl.load(packed_ptr + byte).to(tl.int32)
    else:
        packed = tl.load(packed_ptr + byte, mask=byte < nbytes, other=0).to(tl.int32)
    hi = (tl.load(code_ptr + (packed >> 4)) * scale[:, None]).to(out_ptr.dtype.element_ty)
    lo = (tl.load(code_ptr + (packed & 0xF)) * scale[:, None]).to(out_ptr.dtype.element_ty)
    w = tl.reshape(tl.join(hi, lo), (ROWS, BLOCKSIZE))  # high nibble first
    if EVEN:
        tl.store(out_ptr + elem, w)
    else:
        tl.store(out_ptr + elem, w, mask=elem < numel)


@triton.jit
def _sum_splits_kernel(part_ptr, bias_ptr, out_ptr, SPLITS, MN, N, HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr):
    """out = Σ_s part[s] (+ bias rounded to out's dtype) in one pass: the split reduction's epilogue."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < MN
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for s in range(SPLITS):
        acc += tl.load(part_ptr + s * MN + offs, mask=mask, other=0.0)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs % N, mask=mask, other=0.0).to(out_ptr.dtype.element_ty).to(tl.float32)
    tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)


# --- launchers -----------------------------------------------------------------------------------

#: Fused-kernel tiles by token bucket (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages). Forward: BLOCK_K is the
#: reduction step, so a W tile row is BLOCK_K/2 contiguous bytes; backward: BLOCK_K is the output width.
#: Picked for H100/H200-class GPUs (registers and shared memory checked at compile time, see docs/nf4.md).
#: fp32 activations take an fp32 (FMA) product whose operands live in registers: a small tile, no spills.
_FUSED_TILES = {16: (16, 64, 128, 4, 4), 32: (32, 64, 128, 4, 3), 64: (64, 64, 128, 4, 3)}
_BWD_TILES = {16: (16, 32, 256, 4, 3), 32: (32, 32, 256, 4, 3), 64: (64, 64, 128, 4, 3)}
_FP32_TILE = (16, 32, 64, 4, 2)
_INTERPRET_TILE = (16, 32, 64, 4, 1)
_SUM_BLOCK = 1024


def _tile(m: int, tiles: dict, dtype: torch.dtype) -> tuple[int, int, int, int, int]:
    if os.environ.get("TRITON_INTERPRET") == "1":
        return _INTERPRET_TILE
    if dtype == torch.float32:
        return _FP32_TILE
    return tiles[min(b for b in tiles if b >= min(m, max(tiles)))]


def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 4
    return torch.cuda.get_device_properties(device).multi_processor_count


def _splits(tiles: int, reduce_len: int, block: int, device: torch.device) -> tuple[int, int]:
    """(splits, length per split): split the reduction when the output tiles would leave SMs idle
    (aim: two programs an SM), each split keeping ≥ 2 steps so the loads still pipeline."""
    want = -(-2 * _sm_count(device) // tiles)
    most = max(1, reduce_len // (2 * block))
    per_split = triton.cdiv(triton.cdiv(reduce_len, max(1, min(want, most))), block) * block
    return triton.cdiv(reduce_len, per_split), per_split


@functools.lru_cache(maxsize=None)
def _code(device: torch.device) -> torch.Tensor:
    """The 16 NF4 values on `device`, made once (a host-to-device copy cannot run inside a CUDA graph)."""
    return nf4_format.code_table(device)


def _precision(t: torch.Tensor) -> str:
    return "ieee" if t.dtype == torch.float32 else "tf32"  # fp32 activations get an fp32 product


def _weight_args(absmax, absmax2, code2, offset) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, bool]:
    nested = absmax2 is not None
    if not nested:  # unused pointers: any tensor will do
        return absmax, absmax, absmax, False
    return absmax2, code2, offset, True


def _use_fused(m: int, k: int, blocksize: int) -> bool:
    return m <= FUSED_MAX_M and k % blocksize == 0 and k % 2 == 0


def _dequant_constexprs(blocksize: int) -> dict:
    return {"ROWS": max(1, 2 * _DEQUANT_BYTES // blocksize)}


def _reduce_splits(part: torch.Tensor, bias, dtype: torch.dtype) -> torch.Tensor:
    """Σ over the leading split dim of fp32 partials [S, M, N] (+ bias) -> [M, N] in `dtype`, one launch."""
    splits, m, n = part.shape
    out = torch.empty((m, n), dtype=dtype, device=part.device)
    _sum_splits_kernel[(triton.cdiv(m * n, _SUM_BLOCK),)](
        part, part if bias is None else bias, out, splits, m * n, n, HAS_BIAS=bias is not None, BLOCK=_SUM_BLOCK,
    )
    return out


def dequantize(packed, absmax, shape, blocksize, dtype, absmax2=None, code2=None, offset=None) -> torch.Tensor:
    """W in `dtype`, bit-identical to `formats.nf4.dequantize` (and bitsandbytes)."""
    numel = math.prod(shape)
    out = torch.empty(shape, dtype=dtype, device=packed.device)
    a2, c2, off, nested = _weight_args(absmax, absmax2, code2, offset)
    rows = _dequant_constexprs(blocksize)["ROWS"]
    grid = (triton.cdiv(triton.cdiv(numel, blocksize), rows),)
    _dequant_kernel[grid](packed, _code(packed.device), absmax, a2, c2, off, out, numel, (numel + 1) // 2,
                          BLOCKSIZE=blocksize, NESTED=nested, ROWS=rows, EVEN=numel % (rows * blocksize) == 0,
                          num_warps=_DEQUANT_WARPS, enable_fp_fusion=False)
    return out


def linear(x, packed, absmax, shape, blocksize, bias=None, absmax2=None, code2=None, offset=None) -> torch.Tensor:
    """y = x · Wᵀ (+ bias) in x's dtype."""
    n, k = shape
    x2 = x.reshape(-1, k)
    m = x2.shape[0]
    if m == 0 or not _use_fused(m, k, blocksize):
        w = dequantize(packed, absmax, shape, blocksize, x.dtype, absmax2, code2, offset)
        return torch.nn.functional.linear(x, w, None if bias is None else bias.to(x.dtype))
    x2 = x2.contiguous()
    bm, bn, bk, warps, stages = _tile(m, _FUSED_TILES, x.dtype)
    splits, per_split = _splits(triton.cdiv(m, bm) * triton.cdiv(n, bn), k, bk, x.device)
    y = torch.empty((splits, m, n), dtype=x.dtype if splits == 1 else torch.float32, device=x.device)
    a2, c2, off, nested = _weight_args(absmax, absmax2, code2, offset)
    has_bias = bias is not None and splits == 1
    _fused_fwd_kernel[(triton.cdiv(m, bm), triton.cdiv(n, bn), splits)](
        x2, packed, _code(x.device), absmax, a2, c2, off, bias if has_bias else x2, y,
        m, n, k, k // 2, x2.stride(0), y.stride(1), y.stride(0), per_split,
        BLOCKSIZE=blocksize, NESTED=nested, HAS_BIAS=has_bias, PRECISION=_precision(x), BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk,
        num_warps=warps, num_stages=stages, enable_fp_fusion=False,
    )
    out = y[0] if splits == 1 else _reduce_splits(y, bias, x.dtype)
    return out.reshape(*x.shape[:-1], n)


def linear_backward(grad_y, packed, absmax, shape, blocksize, absmax2=None, code2=None, offset=None) -> torch.Tensor:
    """grad_x = grad_y · W in grad_y's dtype."""
    n, k = shape
    g2 = grad_y.reshape(-1, n)
    m = g2.shape[0]
    if m == 0 or not _use_fused(m, k, blocksize):
        w = dequantize(packed, absmax, shape, blocksize, grad_y.dtype, absmax2, code2, offset)
        return torch.matmul(grad_y, w)
    g2 = g2.contiguous()
    bm, bn, bk, warps, stages = _tile(m, _BWD_TILES, grad_y.dtype)
    splits, per_split = _splits(triton.cdiv(m, bm) * triton.cdiv(k, bk), n, bn, grad_y.device)
    gx = torch.empty((splits, m, k), dtype=grad_y.dtype if splits == 1 else torch.float32, device=grad_y.device)
    a2, c2, off, nested = _weight_args(absmax, absmax2, code2, offset)
    _fused_bwd_kernel[(triton.cdiv(m, bm), triton.cdiv(k, bk), splits)](
        g2, packed, _code(grad_y.device), absmax, a2, c2, off, gx,
        m, n, k, k // 2, g2.stride(0), gx.stride(1), gx.stride(0), per_split,
        BLOCKSIZE=blocksize, NESTED=nested, PRECISION=_precision(grad_y), BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk,
        num_warps=warps, num_stages=stages, enable_fp_fusion=False,
    )
    out = gx[0] if splits == 1 else _reduce_splits(gx, None, grad_y.dtype)
    return out.reshape(*grad_y.shape[:-1], k)
