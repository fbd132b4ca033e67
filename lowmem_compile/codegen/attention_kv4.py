"""Flash attention, forward and backward, GQA-native, on K/V kept in 4, 8 or 16 bits.

Computes O = softmax(Q Kᵀ · scale + mask) V row block by row block with an online softmax (base-2
exponentials, log2(e) folded into the scale, fp32 accumulators), and its gradients from (O, lse) by
recomputing P: dV = Pᵀ dO, dS = P ∘ (dO Vᵀ − rowsum(dO ∘ O)), dQ = dS K · scale, dK = dSᵀ Q · scale.

At 4 and 8 bits, what is kept (formats/kv4.py: codes, per-group step and minimum) is expanded once a
pass by `_dequantize_kernel` into a transient 16-bit K and V [B, Hkv, S, D], the values
code · step + min that every kernel then reads: the forward right after quantizing (so it runs on
the values the backward will see), the backward from the saved codes. The attention kernels read
16-bit K/V only. Expanding tile by tile inside their loops instead repeats the expansion of every
K/V tile once per query block and query head (S²/BLOCK_M work beside the dots); the transient is
O(S·D), as large as K and V themselves, and lives only inside one op call.

Every operand is one tile across the whole head dim ([rows, BLOCK_D], BLOCK_D the next power of two,
columns past D loaded as zero), so every product is one dot into one accumulator. Each program splits
its loop into the blocks that need no mask (fully visible: below the causal diagonal and inside the
sequence) and the few that do (on the diagonal, or past the end).

Masks (MASK_KIND): 0 none; 1 the same for every query row (a key-padding mask, e.g. the [B, 1, 1, Sk]
term HF's causal + padding mask lowers to): one [BLOCK_N] vector a key block, broadcast over the
rows (a dK/dV program loads it once per query head and skips a key block masked whole); 2 any other
(the fallback): a [rows, cols] tile, which enters as the dot's accumulator and has its own configs.
Bool masks arrive as uint8, additive ones as floats.

Kernels: `_quantize_kernel` (K smoothed by its sequence mean, computed by torch, then groups
quantized; V as is), `_dequantize_kernel`, `_fwd_kernel` (one program per query block and query
head; it reads its KV head, so K/V are never repeated), `_delta_kernel` (rowsum(dO ∘ O)),
`_dkdv_kernel` (one program per key block and KV head, looping over the query heads of its group:
dK and dV summed over the group in registers, no atomics; or over a share of them, see
`dkdv_split`) and `_dq_kernel` (one program per query block and query head).

Order of programs: causal programs differ in work (a query block sees the keys up to it, a key block
the queries from it on) and the GPU starts them in grid order, heads fastest here; forward and dQ
walk query blocks from the last, dK/dV key blocks from the first, so the longest start first and
the short ones fill the tail (a longest-first list schedule).

Accepts: q [B, Hq, S, D], k/v [B, Hkv, S, D], fp16 or bf16 (fp32 only under the interpreter, where
dots are exact), D in SUPPORTED_HEAD_DIMS, any sequence length, causal (Sq == Sk) or not, a mask
(bool or additive) broadcastable to [B, Hq, Sq, Sk].
"""

from __future__ import annotations

import inspect
import os

import torch
import triton
import triton.language as tl

from ..formats import kv4

SUPPORTED_HEAD_DIMS = (32, 64, 80, 96, 128)
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def supports(head_dim: int, dtype: torch.dtype) -> bool:
    """Whether the kernels take this case on CUDA (fp32 would run its dots in tf32: not exact)."""
    return head_dim in SUPPORTED_HEAD_DIMS and dtype in (torch.float16, torch.bfloat16)


@triton.jit
def _load_rows(base, offs, ok, stride_r, stride_c, D: tl.constexpr, BLOCK_D: tl.constexpr, FULL: tl.constexpr):
    """Rows `offs` of a [rows, D] operand as one [len(offs), BLOCK_D] tile, columns past D zero.
    FULL: every row is in range and BLOCK_D == D, so the load needs no mask (vectorised, fewer registers)."""
    c = tl.arange(0, BLOCK_D)
    ptrs = base + offs[:, None] * stride_r + c[None, :] * stride_c
    if FULL:
        return tl.load(ptrs)
    return tl.load(ptrs, mask=ok[:, None] & (c < D)[None, :], other=0.0)


@triton.jit
def _key_mask(mask_base, offs_n, n_ok, stride_mn, EVEN: tl.constexpr):
    """One key block of a row-broadcast (key-padding) mask: a [BLOCK_N] vector, the same for every
    query row, so it costs BLOCK_N pointers where a tile costs BLOCK_M x BLOCK_N. EVEN: every key
    is in range, so the load needs no predicate."""
    ptrs = mask_base + offs_n * stride_mn
    if EVEN:
        return tl.load(ptrs)
    return tl.load(ptrs, mask=n_ok, other=0)


@triton.jit
def _masked_dot(a, b, mask_base, rows, cols, ok, stride_r, stride_c, qk_scale):
    """Scores a·b · qk_scale (log2 units) under a [rows, cols] tile of a general mask (the fallback,
    one pointer a score; 0 where not `ok`). The tile's -inf entries enter as the dot's accumulator:
    that pins the tile to the dot's layout (applied only after the dot, the compiler kept the scores
    in two layouts at once and spilled 200-1000 bytes of registers)."""
    m = tl.load(mask_base + rows[:, None] * stride_r + cols[None, :] * stride_c, mask=ok, other=0)
    if m.dtype == tl.uint8:
        return tl.dot(a, b, tl.where(m != 0, 0.0, float("-inf"))) * qk_scale
    add = m.to(tl.float32)
    return _masked(tl.dot(a, b, tl.where(add == float("-inf"), add, 0.0)) * qk_scale, m)


@triton.jit
def _masked(s, m):
    """Scores in log2 units with mask values `m` applied (a tile, or a key vector broadcast along the
    rows): bool masks arrive as uint8 (0 = masked, -inf); an additive entry below -1e29 (HF's
    finfo.min) sets the score to -1024 (natural units), as ops/attention.py says, -inf stays -inf."""
    if m.dtype == tl.uint8:
        return tl.where(m != 0, s, float("-inf"))
    add = m.to(tl.float32)
    fill = tl.where(add == float("-inf"), add, -1024.0 * 1.4426950408889634)
    return tl.where(add < -1e29, fill, s + add * 1.4426950408889634)


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


@triton.jit
def _query_block(Q, K, V, Mask, stride_qb, stride_qh, stride_qm, stride_qd, stride_kb, stride_kh,
                 stride_vb, stride_vh, stride_mb, stride_mh, HQ, SQ, SK, GQA: tl.constexpr, D: tl.constexpr,
                 BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """What a forward and a dQ program share: its query block (grid axis 1, from the last block: the
    longest causal rows start first) and Q tile, the bases of its KV head and mask, and the key range
    split into blocks without masks [0, full_end) and with [full_end, masked_end)."""
    pid_bh = tl.program_id(0)
    pid_m = tl.num_programs(1) - 1 - tl.program_id(1)
    b, h = pid_bh // HQ, pid_bh % HQ
    hk = h // GQA
    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    m_ok = offs_m < SQ
    q = _load_rows(Q + b * stride_qb + h * stride_qh, offs_m, m_ok, stride_qm, stride_qd, D, BLOCK_D, False)
    if CAUSAL:
        full_end = start_m
        masked_end = tl.minimum(start_m + BLOCK_M, SK)
    else:
        full_end = (SK // BLOCK_N) * BLOCK_N
        masked_end = SK
    return (pid_bh, offs_m, m_ok, q, K + b * stride_kb + hk * stride_kh, V + b * stride_vb + hk * stride_vh,
            Mask + b * stride_mb + h * stride_mh, full_end, masked_end)


@triton.jit
def _scores(q, k, mask_base, offs_m, offs_n, m_ok, n_ok, stride_mm, stride_mn, qk_scale,
            MASK_KIND: tl.constexpr, MASKED: tl.constexpr):
    """Q Kᵀ in log2 units for one key block with the user's mask applied (not the causal or length
    bounds, which forward and dQ apply their own ways): a general mask enters the dot as its
    accumulator, a key-padding vector is broadcast over the rows."""
    if MASK_KIND == 2:
        s = _masked_dot(q, tl.trans(k), mask_base, offs_m, offs_n, m_ok[:, None] & n_ok[None, :], stride_mm, stride_mn, qk_scale)
    else:
        s = tl.dot(q, tl.trans(k)) * qk_scale
    if MASK_KIND == 1:
        s = _masked(s, _key_mask(mask_base, offs_n, n_ok, stride_mn, not MASKED)[None, :])
    return s


@triton.jit
def _fwd_blocks(acc, l_i, m_i, q, k_base, v_base, mask_base, offs_m, m_ok, lo, hi, SK, qk_scale,
                stride_kn, stride_kd, stride_vn, stride_vd, stride_mm, stride_mn, D: tl.constexpr,
                BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr, MASKED: tl.constexpr,
                BLOCK_N: tl.constexpr):
    """Key blocks [lo, hi) into the online softmax; MASKED blocks apply causal and length bounds."""
    dtype = q.dtype
    FULL: tl.constexpr = BLOCK_D == D and not MASKED
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_ok = offs_n < SK
        k = _load_rows(k_base, offs_n, n_ok, stride_kn, stride_kd, D, BLOCK_D, FULL)
        s = _scores(q, k, mask_base, offs_m, offs_n, m_ok, n_ok, stride_mm, stride_mn, qk_scale, MASK_KIND, MASKED)
        if MASKED:
            ok = n_ok[None, :]
            if CAUSAL:
                ok = ok & (offs_n[None, :] <= offs_m[:, None])
            s = tl.where(ok, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(s - m_safe[:, None])
        alpha = tl.math.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = _load_rows(v_base, offs_n, n_ok, stride_vn, stride_vd, D, BLOCK_D, FULL)
        acc = tl.dot(p.to(dtype), v, acc * alpha[:, None])
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _fwd_kernel(Q, K, V, Mask, Out, Lse,
                stride_qb, stride_qh, stride_qm, stride_qd, stride_kb, stride_kh, stride_kn, stride_kd,
                stride_vb, stride_vh, stride_vn, stride_vd, stride_mb, stride_mh, stride_mm, stride_mn,
                HQ, SQ, SK, sm_scale,
                GQA: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr,
                MASK_KIND: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_bh, offs_m, m_ok, q, k_base, v_base, mask_base, full_end, masked_end = _query_block(
        Q, K, V, Mask, stride_qb, stride_qh, stride_qm, stride_qd, stride_kb, stride_kh, stride_vb, stride_vh,
        stride_mb, stride_mh, HQ, SQ, SK, GQA, D, BLOCK_D, CAUSAL, BLOCK_M, BLOCK_N)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    qk_scale = sm_scale * 1.4426950408889634
    acc, l_i, m_i = _fwd_blocks(
        acc, l_i, m_i, q, k_base, v_base, mask_base, offs_m, m_ok, 0, full_end, SK, qk_scale,
        stride_kn, stride_kd, stride_vn, stride_vd, stride_mm, stride_mn, D, BLOCK_D, CAUSAL, MASK_KIND, False, BLOCK_N)
    acc, l_i, m_i = _fwd_blocks(
        acc, l_i, m_i, q, k_base, v_base, mask_base, offs_m, m_ok, full_end, masked_end, SK, qk_scale,
        stride_kn, stride_kd, stride_vn, stride_vd, stride_mm, stride_mn, D, BLOCK_D, CAUSAL, MASK_KIND, True, BLOCK_N)
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    d = tl.arange(0, BLOCK_D)
    o_ptrs = Out + pid_bh * SQ * D + offs_m[:, None] * D + d[None, :]
    tl.store(o_ptrs, (acc / l_safe[:, None]).to(Out.dtype.element_ty), mask=m_ok[:, None] & (d < D)[None, :])
    lse = tl.where(l_i == 0.0, float("inf"), (m_i + tl.math.log2(l_safe)) * 0.6931471805599453)
    tl.store(Lse + pid_bh * SQ + offs_m, lse, mask=m_ok)


@triton.jit
def _delta_kernel(Out, dO, Delta, SQ, D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr):
    """rowsum(dO ∘ O) in fp32 (both contiguous [B·Hq, SQ, D])."""
    pid_m, pid_bh = tl.program_id(0), tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    ok = (offs_m < SQ)[:, None] & (offs_d < D)[None, :]
    ptrs = pid_bh * SQ * D + offs_m[:, None] * D + offs_d[None, :]
    o = tl.load(Out + ptrs, mask=ok, other=0.0).to(tl.float32)
    do = tl.load(dO + ptrs, mask=ok, other=0.0).to(tl.float32)
    tl.store(Delta + pid_bh * SQ + offs_m, tl.sum(o * do, axis=1), mask=offs_m < SQ)


@triton.jit
def _dkdv_blocks(dk, dv, k, v, q_base, do_base, lse_base, delta_base, mask_base, key_mask, offs_n, n_ok, lo, hi, SQ,
                 qk_scale, stride_qm, stride_qd, stride_mm, stride_mn, D: tl.constexpr, BLOCK_D: tl.constexpr,
                 CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr, MASKED: tl.constexpr, BLOCK_M: tl.constexpr):
    """Query blocks [lo, hi) into the dK, dV accumulators of one key block (scores transposed);
    `key_mask`: the block's key-padding vector (MASK_KIND 1), loaded once by the caller."""
    dtype = k.dtype
    FULL: tl.constexpr = BLOCK_D == D and not MASKED
    for start_m in range(lo, hi, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        m_ok = offs_m < SQ
        q = _load_rows(q_base, offs_m, m_ok, stride_qm, stride_qd, D, BLOCK_D, FULL)
        do = _load_rows(do_base, offs_m, m_ok, D, 1, D, BLOCK_D, FULL)
        lse2 = tl.load(lse_base + offs_m, mask=m_ok, other=0.0) * 1.4426950408889634
        delta = tl.load(delta_base + offs_m, mask=m_ok, other=0.0)
        if MASK_KIND == 2:
            s_t = _masked_dot(k, tl.trans(q), mask_base, offs_n, offs_m, n_ok[:, None] & m_ok[None, :], stride_mn, stride_mm, qk_scale)
        else:
            s_t = tl.dot(k, tl.trans(q)) * qk_scale
        if MASK_KIND == 1:
            s_t = _masked(s_t, key_mask[:, None])
        p_t = tl.math.exp2(s_t - lse2[None, :])
        if MASKED:
            keep = m_ok[None, :]
            if CAUSAL:
                keep = keep & (offs_m[None, :] >= offs_n[:, None])
            p_t = tl.where(keep, p_t, 0.0)
        dv = tl.dot(p_t.to(dtype), do, dv)
        dp_t = tl.dot(v, tl.trans(do))
        ds_t = (p_t * (dp_t - delta[None, :])).to(dtype)
        dk = tl.dot(ds_t, q, dk)
    return dk, dv


@triton.jit
def _dkdv_kernel(Q, K, V, Mask, dO, Lse, Delta, dK, dV,
                 stride_qb, stride_qh, stride_qm, stride_qd, stride_kb, stride_kh, stride_kn, stride_kd,
                 stride_vb, stride_vh, stride_vn, stride_vd, stride_mb, stride_mh, stride_mm, stride_mn,
                 HKV, SQ, SK, sm_scale,
                 GQA: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr,
                 MASK_KIND: tl.constexpr, SPLIT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Grid (SPLIT · B · Hkv, key blocks): program (part · B·Hkv + KV head, key block) sums the query
    heads [part, part + 1) · GQA/SPLIT of its group into slab `program_id(0)` of dK, dV (at SPLIT > 1
    fp32 partials, summed by the launcher). Key blocks from the first: the longest causal ones start first."""
    pid = tl.program_id(0)
    n_bh = tl.num_programs(0) // SPLIT
    part, pid_bh = pid // n_bh, pid % n_bh
    b, hk = pid_bh // HKV, pid_bh % HKV
    start_n = tl.program_id(1) * BLOCK_N
    offs_n = start_n + tl.arange(0, BLOCK_N)
    n_ok = offs_n < SK
    dtype = Q.dtype.element_ty
    k = _load_rows(K + b * stride_kb + hk * stride_kh, offs_n, n_ok, stride_kn, stride_kd, D, BLOCK_D, False)
    v = _load_rows(V + b * stride_vb + hk * stride_vh, offs_n, n_ok, stride_vn, stride_vd, D, BLOCK_D, False)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    qk_scale = sm_scale * 1.4426950408889634
    if CAUSAL:
        full_start = start_n + BLOCK_N
    else:
        full_start = 0
    full_end = tl.maximum(full_start, (SQ // BLOCK_M) * BLOCK_M)
    HEADS: tl.constexpr = GQA // SPLIT
    for g in range(part * HEADS, part * HEADS + HEADS):
        h = hk * GQA + g
        bh = b * HKV * GQA + h
        q_base = Q + b * stride_qb + h * stride_qh
        do_base = dO + bh * SQ * D
        mask_base = Mask + b * stride_mb + h * stride_mh
        q_end = SQ
        key_mask = n_ok  # a placeholder: read only at MASK_KIND 1
        if MASK_KIND == 1:
            # one vector for every query block; a block whose keys are all masked (-inf: padding)
            # has P = 0 in every row, so its dK, dV are exactly 0 and its query loop is skipped
            key_mask = _key_mask(mask_base, offs_n, n_ok, stride_mn, False)
            seen = tl.where(n_ok, _masked(tl.zeros([BLOCK_N], tl.float32), key_mask), float("-inf"))
            q_end = tl.where(tl.max(seen, axis=0) == float("-inf"), 0, SQ)
        if CAUSAL:
            dk, dv = _dkdv_blocks(
                dk, dv, k, v, q_base, do_base, Lse + bh * SQ, Delta + bh * SQ, mask_base, key_mask, offs_n, n_ok,
                start_n, tl.minimum(full_start, q_end), SQ, qk_scale, stride_qm, stride_qd, stride_mm, stride_mn,
                D, BLOCK_D, CAUSAL, MASK_KIND, True, BLOCK_M)
        dk, dv = _dkdv_blocks(
            dk, dv, k, v, q_base, do_base, Lse + bh * SQ, Delta + bh * SQ, mask_base, key_mask, offs_n, n_ok,
            full_start, tl.minimum(full_end, q_end), SQ, qk_scale, stride_qm, stride_qd, stride_mm, stride_mn,
            D, BLOCK_D, CAUSAL, MASK_KIND, False, BLOCK_M)
        dk, dv = _dkdv_blocks(
            dk, dv, k, v, q_base, do_base, Lse + bh * SQ, Delta + bh * SQ, mask_base, key_mask, offs_n, n_ok,
            full_end, q_end, SQ, qk_scale, stride_qm, stride_qd, stride_mm, stride_mn,
            D, BLOCK_D, CAUSAL, MASK_KIND, True, BLOCK_M)
    d = tl.arange(0, BLOCK_D)
    ptrs = pid * SK * D + offs_n[:, None] * D + d[None, :]
    ok = n_ok[:, None] & (d < D)[None, :]
    tl.store(dK + ptrs, (dk * sm_scale).to(dK.dtype.element_ty), mask=ok)
    tl.store(dV + ptrs, dv.to(dV.dtype.element_ty), mask=ok)


@triton.jit
def _dq_blocks(dq, q, do, lse2, delta, k_base, v_base, mask_base, offs_m, m_ok, lo, hi, SK, qk_scale,
               stride_kn, stride_kd, stride_vn, stride_vd, stride_mm, stride_mn, D: tl.constexpr,
               BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr, MASKED: tl.constexpr,
               BLOCK_N: tl.constexpr):
    """Key blocks [lo, hi) into the dQ accumulator of one query block."""
    dtype = q.dtype
    FULL: tl.constexpr = BLOCK_D == D and not MASKED
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_ok = offs_n < SK
        k = _load_rows(k_base, offs_n, n_ok, stride_kn, stride_kd, D, BLOCK_D, FULL)
        v = _load_rows(v_base, offs_n, n_ok, stride_vn, stride_vd, D, BLOCK_D, FULL)
        s = _scores(q, k, mask_base, offs_m, offs_n, m_ok, n_ok, stride_mm, stride_mn, qk_scale, MASK_KIND, MASKED)
        p = tl.math.exp2(s - lse2[:, None])
        if MASKED:
            keep = n_ok[None, :]
            if CAUSAL:
                keep = keep & (offs_n[None, :] <= offs_m[:, None])
            p = tl.where(keep, p, 0.0)
        dp = tl.dot(do, tl.trans(v))
        ds = (p * (dp - delta[:, None])).to(dtype)
        dq = tl.dot(ds, k, dq)
    return dq


@triton.jit
def _dq_kernel(Q, K, V, Mask, dO, Lse, Delta, dQ,
               stride_qb, stride_qh, stride_qm, stride_qd, stride_kb, stride_kh, stride_kn, stride_kd,
               stride_vb, stride_vh, stride_vn, stride_vd, stride_mb, stride_mh, stride_mm, stride_mn,
               HQ, SQ, SK, sm_scale,
               GQA: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr,
               MASK_KIND: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_bh, offs_m, m_ok, q, k_base, v_base, mask_base, full_end, masked_end = _query_block(
        Q, K, V, Mask, stride_qb, stride_qh, stride_qm, stride_qd, stride_kb, stride_kh, stride_vb, stride_vh,
        stride_mb, stride_mh, HQ, SQ, SK, GQA, D, BLOCK_D, CAUSAL, BLOCK_M, BLOCK_N)
    d = tl.arange(0, BLOCK_D)
    ptrs = pid_bh * SQ * D + offs_m[:, None] * D + d[None, :]
    ok = m_ok[:, None] & (d < D)[None, :]
    do = tl.load(dO + ptrs, mask=ok, other=0.0)
    lse2 = tl.load(Lse + pid_bh * SQ + offs_m, mask=m_ok, other=0.0) * 1.4426950408889634
    delta = tl.load(Delta + pid_bh * SQ + offs_m, mask=m_ok, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    qk_scale = sm_scale * 1.4426950408889634
    dq = _dq_blocks(
        dq, q, do, lse2, delta, k_base, v_base, mask_base, offs_m, m_ok, 0, full_end, SK, qk_scale,
        stride_kn, stride_kd, stride_vn, stride_vd, stride_mm, stride_mn, D, BLOCK_D, CAUSAL, MASK_KIND, False, BLOCK_N)
    dq = _dq_blocks(
        dq, q, do, lse2, delta, k_base, v_base, mask_base, offs_m, m_ok, full_end, masked_end, SK, qk_scale,
        stride_kn, stride_kd, stride_vn, stride_vd, stride_mm, stride_mn, D, BLOCK_D, CAUSAL, MASK_KIND, True, BLOCK_N)
    tl.store(dQ + ptrs, (dq * sm_scale).to(dQ.dtype.element_ty), mask=ok)


# (BLOCK_M, BLOCK_N, num_warps, num_stages): those that compile for sm_90 (Triton 3.6) without register
# spills and fit in shared memory (docs/attention.md has the tables and the exceptions); each costs a
# compile on first use. _CONFIGS serve no mask and key-padding masks, _TILE_MASK_CONFIGS general masks
# (a tile of mask pointers leaves room for smaller tiles only). The causal split needs
# BLOCK_M % BLOCK_N == 0 for fwd/dq and BLOCK_N % BLOCK_M == 0 for dkdv.
_CONFIGS = {
    "fwd": [(128, 64, 8, 3), (128, 128, 8, 2), (64, 64, 4, 3)],
    "dq": [(128, 64, 8, 3), (128, 32, 8, 2), (64, 64, 4, 3)],
    "dkdv": [(16, 128, 8, 2), (16, 128, 8, 3), (16, 64, 8, 2)],
}
_TILE_MASK_CONFIGS = {"fwd": [(128, 32, 8, 3), (128, 32, 8, 2)], "dq": [(128, 32, 8, 2)], "dkdv": [(16, 32, 8, 2)]}
_INTERPRET_CONFIGS = {"fwd": [(32, 16, 4, 1)], "dq": [(32, 16, 4, 1)], "dkdv": [(16, 32, 4, 1)]}
_KEY = ["SQ", "SK", "D", "CAUSAL", "MASK_KIND", "GQA"]


def config_key(c: triton.Config) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages): a config's key in _CONFIGS."""
    return c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages


def tried(kind: str, mask_kind: int) -> list[tuple[int, int, int, int]]:
    """The configs `kind`'s autotuner tries at this MASK_KIND (2: a general mask)."""
    if _INTERPRET:
        return list(_INTERPRET_CONFIGS[kind])
    return list((_TILE_MASK_CONFIGS if mask_kind == 2 else _CONFIGS)[kind])


def _autotune(kind: str, kernel):
    """`kernel` autotuned over its configs, each tried only at the mask kinds it is listed for."""
    tables = [_INTERPRET_CONFIGS] if _INTERPRET else [_CONFIGS, _TILE_MASK_CONFIGS]
    keys = list(dict.fromkeys(c for t in tables for c in t[kind]))
    if any((n % m if kind == "dkdv" else m % n) for m, n, _, _ in keys):
        raise ValueError(f"attention {kind} configs break the causal split's block divisibility: {keys}")
    configs = [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s) for m, n, w, s in keys]

    def prune(configs, named_args, **kwargs):
        keep = tried(kind, kwargs["MASK_KIND"])
        return [c for c in configs if config_key(c) in keep]

    key = _KEY + ["SPLIT"] if kind == "dkdv" else _KEY
    return triton.autotune(configs, key=key, prune_configs_by={"early_config_prune": prune}, **_DISK_CACHE)(kernel)


#: The tuned config kept in Triton's on-disk cache (keyed on Triton's version, the kernel's source
#: and the tuning key), so every later process on the machine launches the same kernels and rounds
#: alike instead of tuning again, with timing noise, to a possibly different config. Older Triton
#: versions without the option tune in each process.
_DISK_CACHE = {"cache_results": True} if "cache_results" in inspect.signature(triton.autotune).parameters else {}


_fwd = _autotune("fwd", _fwd_kernel)
_dq = _autotune("dq", _dq_kernel)
_dkdv = _autotune("dkdv", _dkdv_kernel)


def dkdv_split(kv_programs: int, gqa: int, key_blocks: int, causal: bool, sms: int) -> int:
    """Programs a key block's query heads are spread over in dK/dV: the fewest (a divisor of `gqa`)
    that give the grid at least `sms` times the work of its longest program.

    `kv_programs` = B · Hkv, `key_blocks` = cdiv(Sk, BLOCK_N) (`split_for` fills them in for a call).
    Causal, key block n of N sees N - n query blocks, so a grid of kv_programs · split · N programs
    holds kv_programs · split · (N + 1) / 2 longest programs' worth of work (kv_programs · split · N
    without causality). Below `sms` the longest program outlasts an even share of the work however
    the rest is placed; at or above it, the longest-first order leaves the tail to short programs.
    H200 (132 SMs), B = 1, 8 KV heads of 4 query heads, BLOCK_N = 128: 4 at 1024, 2 at 2048 (68
    units unsplit), 1 from 4096 on."""
    per_program = (key_blocks + 1) / 2 if causal else key_blocks
    for split in range(1, gqa + 1):
        if gqa % split == 0 and kv_programs * split * per_program >= sms:
            return split
    return gqa


def split_for(q: torch.Tensor, hkv: int, sk: int, causal: bool, mask_kind: int) -> int:
    """`dkdv_split` for this call: B · Hkv KV programs a key block, key blocks of the largest BLOCK_N the
    autotuner tries (the fewest blocks, so the split holds at every BLOCK_N it may pick), the device's
    SMs (1 under the interpreter, which runs one program at a time)."""
    block_n = max(n for _, n, _, _ in tried("dkdv", mask_kind))
    sms = torch.cuda.get_device_properties(q.device).multi_processor_count if q.device.type == "cuda" else 1
    return dkdv_split(q.shape[0] * hkv, q.shape[1] // hkv, triton.cdiv(sk, block_n), causal, sms)


def _mask_args(mask, q, sk):
    """(tensor, 4 strides, kind) with broadcast dims at stride 0; kind 0 none, 1 the same for every
    query row (a key-padding mask: read as one vector a key block), 2 any other (read tile by tile).
    Bool masks go as uint8, which is how the kernels tell them from additive ones."""
    if mask is None:
        return q, (0, 0, 0, 0), 0
    b, hq, sq = q.shape[:3]
    full = mask.expand(b, hq, sq, sk)
    kind = 1 if full.stride(2) == 0 or sq == 1 else 2
    if mask.dtype == torch.bool:
        full = full.view(torch.uint8)
    return full, full.stride(), kind


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


def _meta(q, hkv, causal, mask_kind):
    d = q.shape[-1]
    return dict(GQA=q.shape[1] // hkv, D=d, BLOCK_D=max(16, triton.next_power_of_2(d)), CAUSAL=causal, MASK_KIND=mask_kind)


def forward(q, k, v, mask, causal: bool, scale: float, kv_bits: int):
    """(out, lse, k_q, k_scale, v_q, v_scale), as `lowmem::attention` defines them; at 4/8 bits the
    kernel runs on the dequantized codes (a transient 16-bit K and V)."""
    b, hq, sq, _ = q.shape
    hkv, sk = k.shape[1], k.shape[2]
    if kv_bits == 16:
        packed = kv4.no_codes(k)
    else:
        packed = (*quantize(k, kv_bits, True), *quantize(v, kv_bits, False))
        k, v = dequantize(*packed[:2], kv_bits, q.dtype), dequantize(*packed[2:], kv_bits, q.dtype)
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty(b, hq, sq, dtype=torch.float32, device=q.device)
    mask_t, mask_strides, mask_kind = _mask_args(mask, q, sk)
    _fwd[lambda m: (b * hq, triton.cdiv(sq, m["BLOCK_M"]))](
        q, k, v, mask_t, out, lse, *q.stride(), *k.stride(), *v.stride(), *mask_strides, hq, sq, sk, scale,
        **_meta(q, hkv, causal, mask_kind))
    return (out, lse, *packed)


def backward(grad_out, q, k_q, k_scale, v_q, v_scale, out, lse, mask, causal: bool, scale: float, kv_bits: int,
             split: int | None = None):
    """(dq, dk, dv) from what the forward saved; dk, dv at the KV-head count. At 4/8 bits the kernels
    run on the dequantized codes (a transient 16-bit K and V, freed on return). `split`: programs a
    key block's query heads are spread over in dK/dV (a divisor of Hq/Hkv; None: `dkdv_split`)."""
    b, hq, sq, d = q.shape
    hkv, sk = k_q.shape[1], k_q.shape[2]
    grad_out, out = grad_out.contiguous(), out.contiguous()
    delta = torch.empty_like(lse)
    _delta_kernel[(triton.cdiv(sq, 64), b * hq)](out, grad_out, delta, sq, D=d, BLOCK_D=triton.next_power_of_2(d), BLOCK_M=64)
    if kv_bits == 16:
        k, v = k_q, v_q
    else:
        k, v = dequantize(k_q, k_scale, kv_bits, q.dtype), dequantize(v_q, v_scale, kv_bits, q.dtype)
    mask_t, mask_strides, mask_kind = _mask_args(mask, q, sk)
    meta = _meta(q, hkv, causal, mask_kind)
    split = split_for(q, hkv, sk, causal, mask_kind) if split is None else split
    if meta["GQA"] % split:
        raise ValueError(f"attention dK/dV: split {split} does not divide the {meta['GQA']} query heads of a KV head")
    strides = (*q.stride(), *k.stride(), *v.stride(), *mask_strides)
    dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    # SPLIT > 1: one fp32 partial a share of the group's heads, summed below
    dk = torch.empty((split,) * (split > 1) + (b, hkv, sk, d), dtype=torch.float32 if split > 1 else q.dtype, device=q.device)
    dv = torch.empty_like(dk)
    _dkdv[lambda m: (split * b * hkv, triton.cdiv(sk, m["BLOCK_N"]))](
        q, k, v, mask_t, grad_out, lse, delta, dk, dv, *strides, hkv, sq, sk, scale, SPLIT=split, **meta)
    _dq[lambda m: (b * hq, triton.cdiv(sq, m["BLOCK_M"]))](
        q, k, v, mask_t, grad_out, lse, delta, dq, *strides, hq, sq, sk, scale, **meta)
    if split > 1:
        dk, dv = dk.sum(0).to(q.dtype), dv.sum(0).to(q.dtype)
    return dq, dk, dv
