"""Triton kernels for linear layers whose weight W [N, K] is stored in NF4 (bitsandbytes' layout).

    forward   y      = x      · Wᵀ (+ b)      x [..., K],      y [..., N]
    backward  grad_x = grad_y · W             grad_y [..., N], grad_x [..., K]

Two strategies, chosen per shape by :func:`_use_gemv` (M = tokens = product of leading dims):

* GEMV (M ≤ GEMV_MAX_M, memory-bound): split-K. Each program owns a block of W rows and a slice of
  the reduction; it loads 16 packed bytes a thread from each row (coalesced, each byte read once, in
  both directions: the backward walks the same row-major tiles and reduces over the rows), decodes
  both nibbles in registers with one absmax load per 16 bytes, and multiplies: fp32 FMAs for one row
  of x, `tl.dot` on a 16-row tile otherwise (2..16 rows would cost 2·M FMAs a weight element, more
  than the decode). W is read as 0.5 byte an element (+ 4/blocksize absmax, 1/blocksize nested)
  against 2 in bf16. The splits write fp32 partials that one small kernel sums (deterministic).
* dequant + cuBLAS (large M, compute-bound): a bandwidth-bound kernel writes W in 16 bits into a
  transient buffer (freed right after the matmul, so the caching allocator hands the same block to
  the next layer), then cuBLAS multiplies. Extra traffic: 2·N·K bytes written and read once.

Every W element is code[nibble] · absmax in fp32, rounded once to the activation dtype, as the
reference does: the dequantized W is bit-identical to bitsandbytes'. A double-quantized absmax is
code2[q] · absmax2 + offset in two fp32 roundings (launches disable fp contraction for that).
The GEMV needs K % 32 == 0 (a 16-byte chunk never straddles a row or an NF4 block); other shapes
take the dequant path. Activations: bf16, fp16, fp32; any leading dims; optional bias.
"""

from __future__ import annotations

import functools
import math
import os

import torch
import triton
import triton.language as tl

from ..formats import nf4 as nf4_format

#: Up to this many tokens the GEMV kernels run, above it dequant + cuBLAS. 1: on the H200 (bench/
#: kernels_nf4.py) dequant + cuBLAS beat both GEMV decodes at 16 tokens on every Llama-3-8B shape,
#: and the table GEMV beat it at one token in the forward.
GEMV_MAX_M = int(os.environ.get("LOWMEM_NF4_GEMV_MAX_M", "1"))
#: The backward GEMV runs only on weights with more elements than this: at one token it lost to
#: dequant + cuBLAS on 4096x4096 and 1024x4096 and won on 4096x14336 and 14336x4096.
GEMV_BWD_MIN_NUMEL = 4096 * 4096
#: How the GEMV turns a nibble into its code value: "table" (a load from the 64-byte table, an L1 hit)
#: or "select" (a 15-way select tree in registers). The table was faster at every measured shape.
GEMV_DECODE = os.environ.get("LOWMEM_NF4_GEMV_DECODE", "table")
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


_CODE = tl.constexpr(nf4_format.NF4_CODE)


@triton.jit
def _select_code(v):
    """NF4 code value of nibble `v` (int32) through a select tree on its bits: no memory access."""
    b0, b1, b2 = (v & 1) != 0, (v & 2) != 0, (v & 4) != 0
    q0 = tl.where(b1, tl.where(b0, _CODE[3], _CODE[2]), tl.where(b0, _CODE[1], _CODE[0]))
    q1 = tl.where(b1, tl.where(b0, _CODE[7], _CODE[6]), tl.where(b0, _CODE[5], _CODE[4]))
    q2 = tl.where(b1, tl.where(b0, _CODE[11], _CODE[10]), tl.where(b0, _CODE[9], _CODE[8]))
    q3 = tl.where(b1, tl.where(b0, _CODE[15], _CODE[14]), tl.where(b0, _CODE[13], _CODE[12]))
    return tl.where((v & 8) != 0, tl.where(b2, q3, q2), tl.where(b2, q1, q0))


@triton.jit
def _gemv_w(packed_ptr, code_ptr, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, rows, kh, N, KH,
            BLOCKSIZE: tl.constexpr, NESTED: tl.constexpr, TABLE: tl.constexpr):
    """(high, low) nibbles of the packed bytes [rows, kh] as fp32 weights, 0 outside [N, KH].

    kh runs in whole 16-byte chunks (16 | KH, 16-aligned starts), so a thread's 16 bytes load as one
    vector and share one NF4 block: the scale index is computed from the chunk start, which makes the
    16 scale loads of a chunk one (identical addresses)."""
    mask = (rows < N) & (kh < KH)
    flat = rows * KH + kh
    byte = tl.load(packed_ptr + flat, mask=mask, other=0).to(tl.int32)
    chunk = rows * KH + (kh // 16) * 16
    scale = _block_scale(absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, chunk // (BLOCKSIZE // 2), mask, NESTED)
    if TABLE:
        hi = tl.load(code_ptr + (byte >> 4))
        lo = tl.load(code_ptr + (byte & 0xF))
    else:
        hi = _select_code(byte >> 4)
        lo = _select_code(byte & 0xF)
    return hi * scale, lo * scale


@triton.jit
def _unpair(word, X_KIND: tl.constexpr):
    """x[2i], x[2i+1] as fp32 from the word holding both (little-endian: the even element is low).
    Loading pairs as one word keeps the x loads as wide as the weight loads."""
    if X_KIND == 0:  # bf16: the high half of an fp32
        even = (word << 16).to(tl.float32, bitcast=True)
        odd = (word & -65536).to(tl.float32, bitcast=True)
    elif X_KIND == 1:  # fp16
        even = (word & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
        odd = (word >> 16).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
    else:  # fp32 pairs in an int64
        even = (word & 0xFFFFFFFF).to(tl.int32).to(tl.float32, bitcast=True)
        odd = (word >> 32).to(tl.int32).to(tl.float32, bitcast=True)
    return even, odd


@triton.jit
def _gemv_fwd_kernel(x_ptr, xw_ptr, packed_ptr, code_ptr, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, bias_ptr,
                     y_ptr, M, N, K, KH, stride_xm, stride_ym, stride_ys, KH_PER_SPLIT,
                     BLOCKSIZE: tl.constexpr, NESTED: tl.constexpr, TABLE: tl.constexpr, HAS_BIAS: tl.constexpr,
                     X_KIND: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     BLOCK_KH: tl.constexpr):
    """y[m, n] (or split pid_s's fp32 partial) = Σ_k x[m, k] · W[n, k] over this split's bytes of each row.

    BLOCK_M == 1: fp32 FMAs into a [BLOCK_N, BLOCK_KH] accumulator in the load layout (x read as
    element pairs `xw_ptr`), one reduction at the end. Otherwise a 16-row `tl.dot` on W in x's dtype."""
    pid_n, pid_s = tl.program_id(0), tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    kh_start = pid_s * KH_PER_SPLIT
    kh_end = tl.minimum(kh_start + KH_PER_SPLIT, KH)
    if BLOCK_M == 1:
        acc = tl.zeros((BLOCK_N, BLOCK_KH), dtype=tl.float32)
        for kh0 in range(kh_start, kh_end, BLOCK_KH):
            kh = kh0 + tl.arange(0, BLOCK_KH)
            hi, lo = _gemv_w(packed_ptr, code_ptr, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, rows[:, None],
                             kh[None, :], N, KH, BLOCKSIZE, NESTED, TABLE)
            xe, xo = _unpair(tl.load(xw_ptr + kh, mask=kh < KH, other=0), X_KIND)
            acc += hi * xe[None, :] + lo * xo[None, :]
        out = tl.sum(acc, axis=1)[None, :]
    else:
        offs_m = tl.arange(0, BLOCK_M)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for kh0 in range(kh_start, kh_end, BLOCK_KH):
            kh = kh0 + tl.arange(0, BLOCK_KH)
            hi, lo = _gemv_w(packed_ptr, code_ptr, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, rows[:, None],
                             kh[None, :], N, KH, BLOCKSIZE, NESTED, TABLE)
            w = tl.reshape(tl.join(hi, lo), (BLOCK_N, 2 * BLOCK_KH)).to(x_ptr.dtype.element_ty)  # high nibble first
            k = 2 * kh0 + tl.arange(0, 2 * BLOCK_KH)
            x = tl.load(x_ptr + offs_m[:, None] * stride_xm + k[None, :], mask=(offs_m[:, None] < M) & (k[None, :] < K),
                        other=0.0)
            acc += tl.dot(x, tl.trans(w), input_precision=PRECISION)
        out = acc
    offs_m = tl.arange(0, BLOCK_M)
    if HAS_BIAS:  # rounded to the activation dtype first, as F.linear(x, W, bias.to(x.dtype)) does
        out += tl.load(bias_ptr + rows, mask=rows < N, other=0.0).to(x_ptr.dtype.element_ty).to(tl.float32)[None, :]
    dest = y_ptr + pid_s * stride_ys + offs_m[:, None] * stride_ym + rows[None, :]
    tl.store(dest, out.to(y_ptr.dtype.element_ty), mask=(offs_m[:, None] < M) & (rows[None, :] < N))


@triton.jit
def _gemv_bwd_kernel(g_ptr, packed_ptr, code_ptr, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, gx_ptr,
                     M, N, K, KH, stride_gm, stride_xm, stride_xs, ROWS_PER_SPLIT,
                     BLOCKSIZE: tl.constexpr, NESTED: tl.constexpr, TABLE: tl.constexpr, PRECISION: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_KH: tl.constexpr):
    """grad_x[m, k] (or split pid_s's fp32 partial) = Σ_n grad_y[m, n] · W[n, k] over this split's rows.

    Same row-major byte tiles as the forward (each row's bytes contiguous, read once); the sum runs
    over the tile's rows. BLOCK_M == 1: FMAs into [BLOCK_N, BLOCK_KH] accumulators, one reduction at
    the end; otherwise a 16-row `tl.dot`."""
    pid_k, pid_s = tl.program_id(0), tl.program_id(1)
    kh = pid_k * BLOCK_KH + tl.arange(0, BLOCK_KH)
    row_start = pid_s * ROWS_PER_SPLIT
    row_end = tl.minimum(row_start + ROWS_PER_SPLIT, N)
    offs_m = tl.arange(0, BLOCK_M)
    if BLOCK_M == 1:
        acc_hi = tl.zeros((BLOCK_N, BLOCK_KH), dtype=tl.float32)
        acc_lo = tl.zeros((BLOCK_N, BLOCK_KH), dtype=tl.float32)
        for n0 in range(row_start, row_end, BLOCK_N):
            rows = n0 + tl.arange(0, BLOCK_N)
            hi, lo = _gemv_w(packed_ptr, code_ptr, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, rows[:, None],
                             kh[None, :], N, KH, BLOCKSIZE, NESTED, TABLE)
            g = tl.load(g_ptr + rows, mask=rows < N, other=0.0).to(tl.float32)[:, None]
            acc_hi += g * hi
            acc_lo += g * lo
        out = tl.reshape(tl.join(tl.sum(acc_hi, axis=0), tl.sum(acc_lo, axis=0)), (1, 2 * BLOCK_KH))
    else:
        out = tl.zeros((BLOCK_M, 2 * BLOCK_KH), dtype=tl.float32)
        for n0 in range(row_start, row_end, BLOCK_N):
            rows = n0 + tl.arange(0, BLOCK_N)
            hi, lo = _gemv_w(packed_ptr, code_ptr, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, rows[:, None],
                             kh[None, :], N, KH, BLOCKSIZE, NESTED, TABLE)
            w = tl.reshape(tl.join(hi, lo), (BLOCK_N, 2 * BLOCK_KH)).to(g_ptr.dtype.element_ty)
            g = tl.load(g_ptr + offs_m[:, None] * stride_gm + rows[None, :],
                        mask=(offs_m[:, None] < M) & (rows[None, :] < N), other=0.0)
            out = tl.dot(g, w, out, input_precision=PRECISION)
    k = pid_k * 2 * BLOCK_KH + tl.arange(0, 2 * BLOCK_KH)
    dest = gx_ptr + pid_s * stride_xs + offs_m[:, None] * stride_xm + k[None, :]
    tl.store(dest, out.to(gx_ptr.dtype.element_ty), mask=(offs_m[:, None] < M) & (k[None, :] < K))


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

#: GEMV tiles (BLOCK_N, BLOCK_KH, warps): BLOCK_KH packed bytes of each of BLOCK_N rows a step, 16 a
#: thread (one 128-bit load). Forward: BLOCK_N output columns; backward: BLOCK_N rows reduced a step
#: and 2·BLOCK_KH output columns. One row of x: FMA; 2..16 rows: a 16-row tl.dot.
_GEMV_TILES = {"fwd_fma": (16, 128, 4), "fwd_dot": (32, 64, 4), "bwd_fma": (16, 128, 4), "bwd_dot": (32, 64, 4)}
_INTERPRET_TILES = {"fwd_fma": (8, 32, 4), "fwd_dot": (16, 16, 4), "bwd_fma": (8, 32, 4), "bwd_dot": (16, 16, 4)}
_PROGRAMS_PER_SM = 4  # splits are added until this many programs exist (memory parallelism)
_SUM_BLOCK = 1024
_X_KIND = {torch.bfloat16: 0, torch.float16: 1, torch.float32: 2}
_PAIR_VIEW = {torch.bfloat16: torch.int32, torch.float16: torch.int32, torch.float32: torch.int64}


def _gemv_tile(m: int, direction: str) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_KH, warps)."""
    key = f"{direction}_{'fma' if m == 1 else 'dot'}"
    tiles = _INTERPRET_TILES if os.environ.get("TRITON_INTERPRET") == "1" else _GEMV_TILES
    return (1 if m == 1 else 16, *tiles[key])


def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 4
    return torch.cuda.get_device_properties(device).multi_processor_count


def _splits(blocks: int, reduce_len: int, step: int, device: torch.device) -> tuple[int, int]:
    """(splits, length per split, a multiple of `step`): split the reduction until the output blocks
    times the splits give _PROGRAMS_PER_SM programs an SM, never below one step a split."""
    want = -(-_PROGRAMS_PER_SM * _sm_count(device) // blocks)
    most = max(1, -(-reduce_len // step))
    per_split = triton.cdiv(triton.cdiv(reduce_len, min(want, most)), step) * step
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


def _use_gemv(m: int, k: int, n: int | None = None) -> bool:
    """GEMV or dequant + cuBLAS; `n` is given for the backward (its own size threshold)."""
    return 0 < m <= min(GEMV_MAX_M, 16) and k % 32 == 0 and (n is None or n * k > GEMV_BWD_MIN_NUMEL)


def _gemv_options(decode: str | None, dtype: torch.dtype) -> dict:
    """TABLE and the launch options. Not software-pipelined: with table loads (the pipeliner would turn
    each 4-byte table load into its own async copy through shared memory) and for fp32 activations
    (the pipelined fp32 dot spills on sm_90)."""
    decode = decode or GEMV_DECODE
    if decode not in ("table", "select"):
        raise ValueError(f"NF4 GEMV decode must be 'select' or 'table', got {decode!r}")
    table = decode == "table"
    return {"TABLE": table, "num_stages": 1 if table or dtype == torch.float32 else 3, "enable_fp_fusion": False}


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


def linear(x, packed, absmax, shape, blocksize, bias=None, absmax2=None, code2=None, offset=None, *,
           decode: str | None = None) -> torch.Tensor:
    """y = x · Wᵀ (+ bias) in x's dtype. `decode` overrides GEMV_DECODE (benchmarks)."""
    n, k = shape
    x2 = x.reshape(-1, k)
    m = x2.shape[0]
    if not _use_gemv(m, k):
        w = dequantize(packed, absmax, shape, blocksize, x.dtype, absmax2, code2, offset)
        return torch.nn.functional.linear(x, w, None if bias is None else bias.to(x.dtype))
    x2 = x2.contiguous()
    bm, bn, bkh, warps = _gemv_tile(m, "fwd")
    splits, per_split = _splits(triton.cdiv(n, bn), k // 2, bkh, x.device)
    y = torch.empty((splits, m, n), dtype=x.dtype if splits == 1 else torch.float32, device=x.device)
    a2, c2, off, nested = _weight_args(absmax, absmax2, code2, offset)
    has_bias = bias is not None and splits == 1
    _gemv_fwd_kernel[(triton.cdiv(n, bn), splits)](
        x2, x2.view(_PAIR_VIEW[x.dtype]), packed, _code(x.device), absmax, a2, c2, off, bias if has_bias else x2, y,
        m, n, k, k // 2, x2.stride(0), y.stride(1), y.stride(0), per_split,
        BLOCKSIZE=blocksize, NESTED=nested, HAS_BIAS=has_bias, X_KIND=_X_KIND[x.dtype], PRECISION=_precision(x),
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_KH=bkh, num_warps=warps, **_gemv_options(decode, x.dtype),
    )
    out = y[0] if splits == 1 else _reduce_splits(y, bias, x.dtype)
    return out.reshape(*x.shape[:-1], n)


def linear_backward(grad_y, packed, absmax, shape, blocksize, absmax2=None, code2=None, offset=None, *,
                    decode: str | None = None) -> torch.Tensor:
    """grad_x = grad_y · W in grad_y's dtype."""
    n, k = shape
    g2 = grad_y.reshape(-1, n)
    m = g2.shape[0]
    if not _use_gemv(m, k, n):
        w = dequantize(packed, absmax, shape, blocksize, grad_y.dtype, absmax2, code2, offset)
        return torch.matmul(grad_y, w)
    g2 = g2.contiguous()
    bm, bn, bkh, warps = _gemv_tile(m, "bwd")
    splits, per_split = _splits(triton.cdiv(k // 2, bkh), n, bn, grad_y.device)
    gx = torch.empty((splits, m, k), dtype=grad_y.dtype if splits == 1 else torch.float32, device=grad_y.device)
    a2, c2, off, nested = _weight_args(absmax, absmax2, code2, offset)
    _gemv_bwd_kernel[(triton.cdiv(k // 2, bkh), splits)](
        g2, packed, _code(grad_y.device), absmax, a2, c2, off, gx,
        m, n, k, k // 2, g2.stride(0), gx.stride(1), gx.stride(0), per_split,
        BLOCKSIZE=blocksize, NESTED=nested, PRECISION=_precision(grad_y), BLOCK_M=bm, BLOCK_N=bn, BLOCK_KH=bkh,
        num_warps=warps, **_gemv_options(decode, grad_y.dtype),
    )
    out = gx[0] if splits == 1 else _reduce_splits(gx, None, grad_y.dtype)
    return out.reshape(*grad_y.shape[:-1], k)
