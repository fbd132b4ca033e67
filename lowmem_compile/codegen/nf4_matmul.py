"""Triton kernels for linear layers whose weight W [N, K] is stored in NF4 (bitsandbytes' layout).

    forward   y      = x      · Wᵀ (+ b)      x [..., K],      y [..., N]
    backward  grad_x = grad_y · W             grad_y [..., N], grad_x [..., K]

Two strategies, chosen per shape by :func:`use_gemv` (M = tokens = product of leading dims):

* GEMV (M ≤ GEMV_MAX_M, memory-bound): each program streams 16-byte chunks of W rows (32 NF4
  values, one absmax), one chunk a thread a row per step, every load 16 bytes wide and coalesced,
  each byte read once. The nibbles index the 16 code values held in shared memory (`tl.gather`);
  everything is computed in the load layout, so no tile goes through shared memory to change
  layout. Few tokens (`uses_fma`: 1-4 forward, 1-2 backward, by weight size): fp32 FMAs, each
  token's sums kept apart (`_token_stack`), a chunk summed in registers and scaled once. Otherwise,
  up to 16 tokens: a 16-row `tl.dot` on W in x's dtype, with the reduction index permuted so that
  the mma operand fragment of each thread is exactly the 16 bytes it loaded (see `_kperm`). The backward reduces
  over W's rows: a program owns a strip of columns and a range of rows. Splits of the reduction
  write fp32 partials that one small kernel sums with the bias (deterministic, no atomics).
* dequant + cuBLAS (large M, compute-bound): a bandwidth-bound kernel writes W in 16 bits into a
  transient buffer (freed right after the matmul, so the caching allocator hands the same block to
  the next layer), then cuBLAS multiplies. Extra traffic: 2·N·K bytes written and read once. A
  Triton matmul decoding W inside its loop was measured at 1.5-2.2x the time of the same loop on a
  16-bit W, itself 0.83-0.92x of cuBLAS, and removed (docs/nf4.md).

The dequantized W (dequant kernel, and the GEMV's tl.dot operand) is code[nibble] · absmax in fp32
rounded once to the activation dtype, bit-identical to the reference and to bitsandbytes; a
double-quantized absmax is code2[q] · absmax2 + offset in two fp32 roundings (those launches
disable fp contraction). The FMA GEMV keeps the weights in fp32 (differences at the level of
that rounding). The GEMV needs K % 32 == 0 (a 16-byte chunk never straddles a row or an NF4 block);
other shapes take the dequant path. Activations: bf16, fp16, fp32; any leading dims; optional bias.
"""

from __future__ import annotations

import functools
import math
import os

import torch
import triton
import triton.language as tl

from ..formats import nf4 as nf4_format

#: Up to this many tokens the GEMV kernels run, above it dequant + cuBLAS (at most 16: one mma tile).
GEMV_MAX_M = int(os.environ.get("LOWMEM_NF4_GEMV_MAX_M", "16"))
#: Overrides `uses_fma`'s per-shape choice when set: FMAs up to this many tokens (0..4), tl.dot above.
FMA_MAX_M = int(os.environ["LOWMEM_NF4_FMA_MAX_M"]) if "LOWMEM_NF4_FMA_MAX_M" in os.environ else None
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
def _nf4_chunks(packed_ptr, code, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, start, ok,
                BLOCKSIZE: tl.constexpr, NESTED: tl.constexpr):
    """Decode the 16-byte chunks beginning at byte `start` [C] (masked by `ok`; a chunk inside one
    NF4 block): the code values of their 32 elements [C, 32] fp32 (unscaled, element order) and the
    chunk's absmax [C].

    One chunk's bytes stay in one thread (a 16-byte load) and the per-chunk values (start, mask,
    absmax) one a thread, so the scale is one load a chunk and no value changes layout. The lookup
    is one gather from the 16 code values (`code`, in shared memory once lowered). The nibbles are
    cut from the chunk's four 32-bit words, a shift and a mask each (the mask also scales the index
    into a shared-memory byte offset): the integer pipe, at half the FP rate on sm_90, bounds the
    few-token kernels, and widening each byte first cost 2 more integer ops a byte (7.4 -> 5.4)."""
    C: tl.constexpr = start.shape[0]
    byte = tl.load(packed_ptr + start[:, None] + tl.arange(0, 16)[None, :], mask=ok[:, None], other=0).to(tl.uint32)
    scale = _block_scale(absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, start // (BLOCKSIZE // 2), ok, NESTED)
    b0, b1, b2, b3 = _quarters(byte)  # byte 4·l + k of the chunk: plane k, lane l
    word = b0 | (b1 << 8) | (b2 << 16) | (b3 << 24)  # the loaded register itself, once compiled
    # [C, 4, 2, 2, 2]: lane l, byte 4·l + 2·i + j, high nibble first (element order once flattened)
    nibble = tl.join(tl.join(tl.join(word >> 4, word >> 20), tl.join(word >> 12, word >> 28)),
                     tl.join(tl.join(word, word >> 16), tl.join(word >> 8, word >> 24))) & 0xF
    index = tl.reshape(nibble, (C * 32,)).to(tl.int32)
    return tl.reshape(tl.gather(code, index, 0), (C, 32)), scale


@triton.jit
def _halves(codes):
    """[C, 32] element-order codes -> (high nibbles, low nibbles), each [C, 16]."""
    return tl.split(tl.reshape(codes, (codes.shape[0], 16, 2)))


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
def _token_stack(t0, t1, t2, t3, BLOCK_M: tl.constexpr):
    """The first BLOCK_M (1, 2 or 4) of four same-shape tensors stacked on new last dims (one: t0
    itself; [..., 2]; [..., 2, 2]; flattened, token order). `tl.join` keeps each element in the thread that
    computed it, so per-token accumulators of the FMA kernels stay in the decode's layout (a token
    dim made by broadcasting went through shared memory every step)."""
    if BLOCK_M == 1:
        out = t0
    elif BLOCK_M == 2:
        out = tl.join(t0, t1)
    else:
        out = tl.join(tl.join(t0, t2), tl.join(t1, t3))  # [..., i, j] = t(2i + j)
    return out


@triton.jit
def _quarters(t):
    """[C, 16] -> four [C, 4]: element 4·l + 2·i + j of a row goes to quarter (i, j), lane l."""
    h0, h1 = tl.split(tl.reshape(t, (t.shape[0], 4, 2, 2)))
    q00, q10 = tl.split(h0)
    q01, q11 = tl.split(h1)
    return q00, q01, q10, q11


@triton.jit
def _dot_chains(a, b, c, d):
    """Σ over a row of a·b + c·d ([C, 16] each) -> [C]: four chains of 8 products (1 multiply and 7
    FMAs each) summed at the end, 35 instructions where the sum of a·b + c·d by a tree takes 47."""
    a0, a1, a2, a3 = _quarters(a)
    b0, b1, b2, b3 = _quarters(b)
    c0, c1, c2, c3 = _quarters(c)
    d0, d1, d2, d3 = _quarters(d)
    s = a0 * b0
    s = c0 * d0 + s
    s = a1 * b1 + s
    s = c1 * d1 + s
    s = a2 * b2 + s
    s = c2 * d2 + s
    s = a3 * b3 + s
    s = c3 * d3 + s
    return tl.sum(s, axis=1)


@triton.jit
def _token_dot(hi, lo, words, ok, scale, X_KIND: tl.constexpr):
    """One token's [C] chunk sums Σ code · x, scaled (0 where not `ok`): x's element pairs at `words`."""
    xe, xo = _unpair(tl.load(words), X_KIND)
    return tl.where(ok, _dot_chains(hi, xe, lo, xo) * scale, 0.0)


@triton.jit
def _token_grad(g_ptrs, ok, scale):
    """One token's grad_y at the chunks' rows times their absmax, [C, 1] fp32."""
    return (tl.load(g_ptrs, mask=ok, other=0.0).to(tl.float32) * scale)[:, None]


@triton.jit
def _kperm(t, TPR: tl.constexpr):
    """Reorder the reduction index of a step [B, 32·TPR] (TPR 16-byte chunks of a row) for tl.dot.

    mma.m16n8k16's operand fragment gives lane t (of the 4 sharing a row) the element pairs
    p ≡ t (mod 4) of the reduction. Feeding the dot pair 4·i + t from byte 16·t + i (i < 16) makes
    lane t's pairs exactly the 16 contiguous bytes it loaded, so W enters the mma from the registers
    it was decoded in. x gets the same order (a sum does not care about the order of its terms)."""
    return tl.reshape(tl.permute(tl.reshape(t, (t.shape[0], TPR, 16, 2)), (0, 2, 1, 3)), (t.shape[0], 32 * TPR))


@triton.jit
def _opaque(v):
    """`v` unchanged, behind a reduction over a one-element axis. Triton sizes the mma operand's
    register fragments (kWidth) from the narrowest load that feeds the operand through elementwise
    ops; the nested absmax index (uint8) would make it 4 instead of 2, and W would then go through
    shared memory to change layout. A reduction is not elementwise, so that search stops here."""
    return tl.max(v[:, None], axis=1)


@triton.jit
def _gemv_fwd_kernel(x_ptr, xw_ptr, packed_ptr, code_ptr, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, bias_ptr,
                     y_ptr, M, N, KH, stride_xm, stride_ym, stride_ys, KH_PER_SPLIT,
                     BLOCKSIZE: tl.constexpr, NESTED: tl.constexpr, HAS_BIAS: tl.constexpr, X_KIND: tl.constexpr,
                     PRECISION: tl.constexpr, FMA: tl.constexpr, BLOCK_M: tl.constexpr, ROWS: tl.constexpr,
                     TPR: tl.constexpr):
    """y[m, n] (or split pid_s's fp32 partial) = Σ_k x[m, k] · W[n, k] over this split's bytes of ROWS rows.

    A step covers TPR chunks (16·TPR bytes) of each of the ROWS rows: chunk q of the step is chunk
    q % TPR of row q // TPR. FMA: fp32 FMAs on the codes for each of the BLOCK_M tokens, each chunk
    summed and then scaled (one x load serves the thread's rows). Otherwise one tl.dot of the 16 rows
    of x (masked to M) with the scaled W in x's dtype, reduction index permuted by `_kperm` (TPR = 4)."""
    pid_n, pid_s = tl.program_id(0), tl.program_id(1)
    CH: tl.constexpr = ROWS * TPR
    STEP: tl.constexpr = 16 * TPR
    q = tl.arange(0, CH)
    row = pid_n * ROWS + q // TPR
    chunk = 16 * (q % TPR)
    row_start = row.to(tl.int64) * KH
    kh_start = pid_s * KH_PER_SPLIT
    kh_end = tl.minimum(kh_start + KH_PER_SPLIT, KH)
    code = tl.load(code_ptr + tl.arange(0, 16))
    offs_m = tl.arange(0, BLOCK_M)
    if FMA:
        zero = tl.zeros((CH,), dtype=tl.float32)
        acc = _token_stack(zero, zero, zero, zero, BLOCK_M)
        for k0 in range(kh_start, kh_end, STEP):
            kc = k0 + chunk
            ok = (row < N) & (kc < kh_end)
            codes, scale = _nf4_chunks(packed_ptr, code, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, row_start + kc,
                                       ok, BLOCKSIZE, NESTED)
            hi, lo = _halves(codes)
            # Unmasked (clamped into x, the chunk dropped below) so that the thread's rows, which share
            # these x words, share one load: masked loads are not merged. Tokens past M read token
            # M - 1 and are dropped by the store's mask.
            words = xw_ptr + tl.minimum(kc, KH - 16)[:, None] + tl.arange(0, 16)[None, :]
            d0 = _token_dot(hi, lo, words, ok, scale, X_KIND)
            d1, d2, d3 = d0, d0, d0
            if BLOCK_M >= 2:
                d1 = _token_dot(hi, lo, words + tl.minimum(1, M - 1) * KH, ok, scale, X_KIND)
            if BLOCK_M == 4:
                d2 = _token_dot(hi, lo, words + tl.minimum(2, M - 1) * KH, ok, scale, X_KIND)
                d3 = _token_dot(hi, lo, words + tl.minimum(3, M - 1) * KH, ok, scale, X_KIND)
            acc += _token_stack(d0, d1, d2, d3, BLOCK_M)
        out = tl.trans(tl.sum(tl.reshape(acc, (ROWS, TPR, BLOCK_M)), axis=1))
    else:
        acc = tl.zeros((BLOCK_M, ROWS), dtype=tl.float32)
        for k0 in range(kh_start, kh_end, STEP):
            kc = k0 + chunk
            ok = (row < N) & (kc < kh_end)
            codes, scale = _nf4_chunks(packed_ptr, code, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, row_start + kc,
                                       ok, BLOCKSIZE, NESTED)
            scale = _opaque(scale)
            w = _kperm(tl.reshape((codes * scale[:, None]).to(x_ptr.dtype.element_ty), (ROWS, 32 * TPR)), TPR)
            k = 2 * k0 + tl.arange(0, 32 * TPR)
            x = tl.load(x_ptr + offs_m[:, None] * stride_xm + k[None, :],
                        mask=(offs_m[:, None] < M) & (k[None, :] < 2 * kh_end), other=0.0)
            acc = tl.dot(_kperm(x, TPR), tl.trans(w), acc, input_precision=PRECISION)
        out = acc
    rows = pid_n * ROWS + tl.arange(0, ROWS)
    if HAS_BIAS:  # rounded to the activation dtype first, as F.linear(x, W, bias.to(x.dtype)) does
        out += tl.load(bias_ptr + rows, mask=rows < N, other=0.0).to(x_ptr.dtype.element_ty).to(tl.float32)[None, :]
    dest = y_ptr + pid_s * stride_ys + offs_m[:, None] * stride_ym + rows[None, :]
    tl.store(dest, out.to(y_ptr.dtype.element_ty), mask=(offs_m[:, None] < M) & (rows[None, :] < N))


@triton.jit
def _gemv_bwd_kernel(g_ptr, packed_ptr, code_ptr, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, gx_ptr,
                     M, N, KH, stride_gm, stride_xm, stride_xs, ROWS_PER_SPLIT,
                     BLOCKSIZE: tl.constexpr, NESTED: tl.constexpr, PRECISION: tl.constexpr, FMA: tl.constexpr,
                     BLOCK_M: tl.constexpr, ROWS: tl.constexpr, TPR: tl.constexpr, GROUPS: tl.constexpr):
    """grad_x[m, k] (or split pid_s's fp32 partial) = Σ_n grad_y[m, n] · W[n, k] over this split's rows,
    for a strip of 32·TPR columns (TPR chunks of each row).

    A step covers ROWS rows of the strip, the same chunk layout as the forward. FMA: per-chunk
    accumulators for each of the BLOCK_M tokens (grad_y · absmax once a chunk), summed over the rows
    at the end; the step's rows go in GROUPS groups that add into the same accumulators, so a thread
    has GROUPS chunks in flight while its accumulators stay those of one chunk. Otherwise (GROUPS = 1)
    a 16-row tl.dot with W in x's dtype (the reduction runs down W's rows here, so the operand changes
    layout through shared memory)."""
    pid_k, pid_s = tl.program_id(0), tl.program_id(1)
    SUB: tl.constexpr = ROWS // GROUPS  # rows of a group
    q = tl.arange(0, SUB * TPR)
    kc = pid_k * 16 * TPR + 16 * (q % TPR)
    row_start = pid_s * ROWS_PER_SPLIT
    row_end = tl.minimum(row_start + ROWS_PER_SPLIT, N)
    code = tl.load(code_ptr + tl.arange(0, 16))
    offs_m = tl.arange(0, BLOCK_M)
    if FMA:
        zero = tl.zeros((SUB * TPR, 16), dtype=tl.float32)
        acc_hi = _token_stack(zero, zero, zero, zero, BLOCK_M)
        acc_lo = _token_stack(zero, zero, zero, zero, BLOCK_M)
        for n0 in range(row_start, row_end, ROWS):
            for group in tl.static_range(GROUPS):
                row = n0 + group * SUB + q // TPR
                ok = (row < row_end) & (kc < KH)
                codes, scale = _nf4_chunks(packed_ptr, code, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr,
                                           row.to(tl.int64) * KH + kc, ok, BLOCKSIZE, NESTED)
                hi, lo = _halves(codes)
                g, in_rows = g_ptr + row, row < row_end  # tokens past M read token M - 1, never stored
                g0 = _token_grad(g, in_rows, scale)
                g1, g2, g3 = g0, g0, g0
                if BLOCK_M >= 2:
                    g1 = _token_grad(g + tl.minimum(1, M - 1) * stride_gm, in_rows, scale)
                if BLOCK_M == 4:
                    g2 = _token_grad(g + tl.minimum(2, M - 1) * stride_gm, in_rows, scale)
                    g3 = _token_grad(g + tl.minimum(3, M - 1) * stride_gm, in_rows, scale)
                acc_hi += _token_stack(g0 * hi, g1 * hi, g2 * hi, g3 * hi, BLOCK_M)
                acc_lo += _token_stack(g0 * lo, g1 * lo, g2 * lo, g3 * lo, BLOCK_M)
        hi = tl.sum(tl.reshape(acc_hi, (SUB, TPR, 16, BLOCK_M)), axis=0)
        lo = tl.sum(tl.reshape(acc_lo, (SUB, TPR, 16, BLOCK_M)), axis=0)
        out = tl.reshape(tl.permute(tl.join(hi, lo), (2, 0, 1, 3)), (BLOCK_M, 32 * TPR))
    else:
        out = tl.zeros((BLOCK_M, 32 * TPR), dtype=tl.float32)
        for n0 in range(row_start, row_end, ROWS):
            row = n0 + q // TPR
            ok = (row < row_end) & (kc < KH)
            codes, scale = _nf4_chunks(packed_ptr, code, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr,
                                       row.to(tl.int64) * KH + kc, ok, BLOCKSIZE, NESTED)
            w = (codes * scale[:, None]).to(g_ptr.dtype.element_ty)
            rows = n0 + tl.arange(0, ROWS)
            g = tl.load(g_ptr + offs_m[:, None] * stride_gm + rows[None, :],
                        mask=(offs_m[:, None] < M) & (rows[None, :] < row_end), other=0.0)
            out = tl.dot(g, tl.reshape(w, (ROWS, 32 * TPR)), out, input_precision=PRECISION)
    k = pid_k * 32 * TPR + tl.arange(0, 32 * TPR)
    dest = gx_ptr + pid_s * stride_xs + offs_m[:, None] * stride_xm + k[None, :]
    tl.store(dest, out.to(gx_ptr.dtype.element_ty), mask=(offs_m[:, None] < M) & (k[None, :] < 2 * KH))


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

#: GEMV tiles (ROWS, TPR, warps, stages, warps an SM): a step covers TPR 16-byte chunks of each of ROWS
#: rows, one chunk a thread. FMA: a step spans 2 KB of a row across the program (TPR = 128), each
#: thread holds 4 rows at the same columns (2 at 4 tokens, `_gemv_tile`), so one x load serves them.
#: tl.dot: TPR = 4 is the mma fragment's 4 lanes a row (`_kperm`); 128 rows are the dot's N.
#: Backward: strips of 64 (FMA) or 32 (dot) bytes of 256 or 64 rows a step; the FMA's 256 rows go in
#: 8 groups of 32 sharing one chunk's accumulators a thread (`_row_groups`): 8 chunks in flight a
#: thread where the 32-row tile had 1 (bench/results/nf4_bwd_groups/2026-11-30/: one token 1.18-1.22x
#: faster on the three large weights). Splits of the reduction
#: are added until the programs hold "warps an SM" warps on every SM (memory parallelism), while the
#: fp32 partials stay below 1/_PARTIAL_SHARE of the weight's bytes. Chosen by `bench/nf4_gemv_tiles.py`
#: on an H200 (bench/results/nf4_gemv_tiles/2026-11-29T14/: 0.91, 0.82 and 0.82 of the previous
#: tiles' time for the forward dot, backward FMA and backward dot; the forward FMA tile stayed).
_GEMV_TILES = {"fwd_fma": (4, 128, 4, 2, 16), "fwd_dot": (128, 4, 4, 2, 16), "bwd_fma": (256, 4, 4, 2, 16),
               "bwd_dot": (64, 2, 2, 3, 16)}
_INTERPRET_TILES = {"fwd_fma": (2, 4, 4, 2, 16), "fwd_dot": (16, 4, 4, 2, 16), "bwd_fma": (32, 2, 1, 2, 16),
                    "bwd_dot": (16, 2, 4, 2, 16)}
_PARTIAL_SHARE = 2
_SUM_BLOCK = 1024
_X_KIND = {torch.bfloat16: 0, torch.float16: 1, torch.float32: 2}
_PAIR_VIEW = {torch.bfloat16: torch.int32, torch.float16: torch.int32, torch.float32: torch.int64}


def uses_fma(m: int, n: int, k: int, direction: str) -> bool:
    """Whether the M-token GEMV ("fwd" / "bwd") on an [N, K] weight uses FMAs (fp32 weights, an FMA
    an element a token, one launch) rather than the 16-row tl.dot (W rounded to x's dtype, a cost
    that does not grow with M, plus the split sum on small weights). Measured on an H200
    (bench/results/nf4/2026-11-29T21/): forward FMAs to 2 tokens (1.1-2.1x faster than the dot on
    every Llama-3-8B shape), to 4 on weights up to 2^23 elements (4096->1024: 5.8 against 10.0 µs;
    4096^2 even; 4096->14336: 49.7 against 40.1); backward one token, and 2 on weights of 2^25
    elements or more (4096->14336: 39.2 against 43.0 µs; 4096->1024: 14.5 against 7.7), but not on
    weights up to 2^23 elements, where the one-token FMA backward took 11.3 µs and the dot 7.6-7.7
    at every token count from 1 to 16 (its cost does not depend on M; one token timed in
    bench/results/nf4/2026-11-29T23/)."""
    if FMA_MAX_M is not None:
        if not 0 <= FMA_MAX_M <= 4:  # the FMA kernels hold 1, 2 or 4 tokens
            raise ValueError(f"LOWMEM_NF4_FMA_MAX_M must be 0..4 (0: always the dot), got {FMA_MAX_M}")
        return m <= FMA_MAX_M
    if direction == "fwd":
        return m <= 2 or (m <= 4 and n * k <= 1 << 23)
    return n * k > 1 << 23 and (m == 1 or (m == 2 and n * k >= 1 << 25))


def _gemv_tile(m: int, n: int, k: int, direction: str) -> tuple:
    """(FMA, BLOCK_M, ROWS, TPR, warps, stages, warps an SM). An FMA tile holds the tokens rounded up
    to a power of two; at 4 tokens the forward's rows halve (a thread keeps x of every token and the
    codes of every row in registers: ~100 registers a thread at 2 rows, over 150 at 4, on sm_90)."""
    fma = uses_fma(m, n, k, direction)
    tiles = _INTERPRET_TILES if os.environ.get("TRITON_INTERPRET") == "1" else _GEMV_TILES
    rows, tpr, warps, stages, warps_per_sm = tiles[f"{direction}_{'fma' if fma else 'dot'}"]
    if not fma:
        return False, 16, rows, tpr, warps, stages, warps_per_sm
    bm = triton.next_power_of_2(m)
    return True, bm, max(1, rows // max(1, bm // 2)) if direction == "fwd" else rows, tpr, warps, stages, warps_per_sm


@functools.lru_cache(maxsize=None)
def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 4
    return torch.cuda.get_device_properties(device).multi_processor_count


def _gemv_plan(m: int, n: int, k: int, direction: str, device: torch.device) -> tuple[int, ...]:
    """(FMA, BLOCK_M, ROWS, TPR, warps, stages, programs along the output, splits, reduction length per split).

    The reduction (forward: a row's bytes; backward: the rows) is split until the programs hold the
    tile's warps an SM, while the fp32 partials stay under 1/_PARTIAL_SHARE of the weight's bytes and
    each split keeps at least one step; a split's length is a multiple of the step."""
    fma, bm, rows, tpr, warps, stages, warps_per_sm = _gemv_tile(m, n, k, direction)
    if direction == "fwd":
        blocks, reduce_len, step, most = triton.cdiv(n, rows), k // 2, 16 * tpr, k // (_PARTIAL_SHARE * 8 * bm)
    else:
        blocks, reduce_len, step, most = triton.cdiv(k // 2, 16 * tpr), n, rows, n // (_PARTIAL_SHARE * 8 * bm)
    want = min(-(-warps_per_sm * _sm_count(device) // (blocks * warps)), max(1, most), -(-reduce_len // step))
    per_split = triton.cdiv(triton.cdiv(reduce_len, want), step) * step
    return fma, bm, rows, tpr, warps, stages, blocks, triton.cdiv(reduce_len, per_split), per_split


@functools.lru_cache(maxsize=None)
def code_table(device: torch.device) -> torch.Tensor:
    """The 16 NF4 values on `device`, made once (a host-to-device copy cannot run inside a CUDA graph).
    Made lazily by the first call; a caller about to hand allocation to a CUDA graph tree makes it
    first (the tree's warm-up routes its thread's allocations to a private pool and refuses to
    capture while a tensor it did not return lives there)."""
    return nf4_format.code_table(device)


def _precision(t: torch.Tensor) -> str:
    return "ieee" if t.dtype == torch.float32 else "tf32"  # fp32 activations get an fp32 product


def _weight_args(absmax, absmax2, code2, offset) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, bool]:
    nested = absmax2 is not None
    if not nested:  # unused pointers: any tensor will do
        return absmax, absmax, absmax, False
    return absmax2, code2, offset, True


def use_gemv(m: int, k: int, strategy: str | None) -> bool:
    """Whether M tokens of K features take the GEMV kernels: `strategy` forces one, None is the
    per-shape choice (which `nf4_matmul="graph"` also asks, to leave such sites to the op)."""
    if strategy not in (None, "gemv", "dequant"):
        raise ValueError(f"NF4 strategy must be 'gemv', 'dequant' or None (per shape), got {strategy!r}")
    if strategy == "gemv" and not (0 < m <= 16 and k % 32 == 0):
        raise ValueError(f"the NF4 GEMV needs 1..16 tokens and K % 32 == 0, got M={m}, K={k}")
    if strategy is not None:
        return strategy == "gemv"
    return 0 < m <= min(GEMV_MAX_M, 16) and k % 32 == 0


def _row_groups(fma: bool, rows: int, tpr: int, warps: int) -> int:
    """Groups of rows in a step of the FMA backward: as many as leave one chunk a thread a group
    (a thread's accumulators are those of the chunks of one group)."""
    if not fma:
        return 1
    groups = max(1, rows * tpr // (32 * warps))
    if rows % groups:
        raise ValueError(f"backward FMA tile: {rows} rows do not split into {groups} groups of one chunk a thread")
    return groups


def _gemv_options(fma: bool, dtype: torch.dtype, warps: int, stages: int) -> dict:
    """Launch options. The FMA kernels may contract (their weights stay fp32, nothing to match bit
    for bit); the dot kernels round W like the reference, so no contraction there (the
    nested absmax is two roundings). fp32 activations are not software-pipelined (the pipelined fp32
    dot spills on sm_90)."""
    return {"num_warps": warps, "num_stages": 1 if dtype == torch.float32 else stages, "enable_fp_fusion": fma}


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
    _dequant_kernel[grid](packed, code_table(packed.device), absmax, a2, c2, off, out, numel, (numel + 1) // 2,
                          BLOCKSIZE=blocksize, NESTED=nested, ROWS=rows, EVEN=numel % (rows * blocksize) == 0,
                          num_warps=_DEQUANT_WARPS, enable_fp_fusion=False)
    return out


def _pairs(t: torch.Tensor) -> torch.Tensor:
    """`t` (contiguous [M, K]) viewed as words of two elements, for the one-token kernel's x loads."""
    if t.storage_offset() % 2:  # the word view needs an even element offset
        t = t.clone()
    return t.view(_PAIR_VIEW[t.dtype])


def linear(x, packed, absmax, shape, blocksize, bias=None, absmax2=None, code2=None, offset=None, *,
           strategy: str | None = None) -> torch.Tensor:
    """y = x · Wᵀ (+ bias) in x's dtype. `strategy` ("gemv" / "dequant") overrides the per-shape choice."""
    n, k = shape
    x2 = x.reshape(-1, k)
    m = x2.shape[0]
    if not use_gemv(m, k, strategy):
        w = dequantize(packed, absmax, shape, blocksize, x.dtype, absmax2, code2, offset)
        return torch.nn.functional.linear(x, w, None if bias is None else bias.to(x.dtype))
    x2 = x2.contiguous()
    fma, bm, rows, tpr, warps, stages, blocks, splits, per_split = _gemv_plan(m, n, k, "fwd", x.device)
    y = torch.empty((splits, m, n), dtype=x.dtype if splits == 1 else torch.float32, device=x.device)
    a2, c2, off, nested = _weight_args(absmax, absmax2, code2, offset)
    has_bias = bias is not None and splits == 1
    _gemv_fwd_kernel[(blocks, splits)](
        x2, _pairs(x2) if fma else x2, packed, code_table(x.device), absmax, a2, c2, off, bias if has_bias else x2, y,
        m, n, k // 2, x2.stride(0), y.stride(1), y.stride(0), per_split,
        BLOCKSIZE=blocksize, NESTED=nested, HAS_BIAS=has_bias, X_KIND=_X_KIND[x.dtype], PRECISION=_precision(x),
        FMA=fma, BLOCK_M=bm, ROWS=rows, TPR=tpr, **_gemv_options(fma, x.dtype, warps, stages),
    )
    out = y[0] if splits == 1 else _reduce_splits(y, bias, x.dtype)
    return out.reshape(*x.shape[:-1], n)


def linear_backward(grad_y, packed, absmax, shape, blocksize, absmax2=None, code2=None, offset=None, *,
                    strategy: str | None = None) -> torch.Tensor:
    """grad_x = grad_y · W in grad_y's dtype. `strategy` as in :func:`linear`."""
    n, k = shape
    g2 = grad_y.reshape(-1, n)
    m = g2.shape[0]
    if not use_gemv(m, k, strategy):
        w = dequantize(packed, absmax, shape, blocksize, grad_y.dtype, absmax2, code2, offset)
        return torch.matmul(grad_y, w)
    g2 = g2.contiguous()
    fma, bm, rows, tpr, warps, stages, strips, splits, per_split = _gemv_plan(m, n, k, "bwd", grad_y.device)
    gx = torch.empty((splits, m, k), dtype=grad_y.dtype if splits == 1 else torch.float32, device=grad_y.device)
    a2, c2, off, nested = _weight_args(absmax, absmax2, code2, offset)
    _gemv_bwd_kernel[(strips, splits)](
        g2, packed, code_table(grad_y.device), absmax, a2, c2, off, gx,
        m, n, k // 2, g2.stride(0), gx.stride(1), gx.stride(0), per_split,
        BLOCKSIZE=blocksize, NESTED=nested, PRECISION=_precision(grad_y), FMA=fma, BLOCK_M=bm, ROWS=rows,
        TPR=tpr, GROUPS=_row_groups(fma, rows, tpr, warps), **_gemv_options(fma, grad_y.dtype, warps, stages),
    )
    out = gx[0] if splits == 1 else _reduce_splits(gx, None, grad_y.dtype)
    return out.reshape(*grad_y.shape[:-1], k)
