"""Flash attention, forward and backward, GQA-native, reading K/V in 4, 8 or 16 bits.

Computes O = softmax(Q Kᵀ · scale + mask) V row block by row block with an online softmax (base-2
exponentials, fp32 accumulators), and its gradients from (O, lse) by recomputing P:
dV = Pᵀ dO, dS = P ∘ (dO Vᵀ − rowsum(dO ∘ O)), dQ = dS K · scale, dK = dSᵀ Q · scale.

Every kernel works on the head dim in two *halves* (columns [0, D/2) and [D/2, D)) because that is
how 4-bit codes are packed (formats/kv4.py: byte j = element j | element j + D/2 << 4): a tile of K
or V is two [rows, D/2] tiles, dequantized in registers as code · step + min, and each product is
the sum of two dots. The same code path then serves 8 and 16 bits, and head dims 80 and 96, whose
halves (40, 48) are padded to the next power of two with masked loads.

Kernels: `_quantize_kernel` (K smoothed by its sequence mean, computed by torch, then groups
quantized; V as is), `_fwd_kernel` (one program per query block and query head; it reads its KV
head, so K/V are never repeated), `_delta_kernel` (rowsum(dO ∘ O)), `_dkdv_kernel` (one program
per key block and KV head, looping over the query heads of its group: dK and dV summed over the
group in registers, no atomics) and `_dq_kernel` (one program per query block and query head).

Bytes kept for the backward per KV head and row: D/2 + 4·D/G (4 bits) or D + 4·D/G (8 bits) for K
and again for V, against 2·D each in bf16 (G = 32 at D = 64, 128: 0.3125x at 4 bits); plus O (2·D
a query row, shared with the next layer's input) and lse (4 bytes a query row).

Accepts: q [B, Hq, S, D], k/v [B, Hkv, S, D], fp16 or bf16 (fp32 only under the interpreter, where
dots are exact), D in SUPPORTED_HEAD_DIMS, any sequence length, causal (Sq == Sk) or not, a mask
(bool or additive) broadcastable to [B, Hq, Sq, Sk]: key-padding masks of shape [B, 1, 1, Sk]
are read with zero strides; any other shape is read tile by tile (the fallback, more bytes).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ..formats import kv4

SUPPORTED_HEAD_DIMS = (32, 64, 80, 96, 128)
_LOG2E = 1.4426950408889634
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def supports(head_dim: int, dtype: torch.dtype) -> bool:
    """Whether the kernels take this case on CUDA (fp32 would run its dots in tf32: not exact)."""
    return head_dim in SUPPORTED_HEAD_DIMS and dtype in (torch.float16, torch.bfloat16)


@triton.jit
def _load_kv(base, sbase, offs_n, n_ok, offs_j, stride_n, stride_d, stride_sn,
             HALF: tl.constexpr, GROUP: tl.constexpr, KV_BITS: tl.constexpr, DTYPE: tl.constexpr,
             FULL: tl.constexpr):
    """Rows `offs_n` of K or V as two [rows, D/2] halves in DTYPE, dequantized when packed.

    FULL: every row is in range and D/2 is a power of two, so the loads need no mask (fewer
    registers, vectorised). Scales are loaded once per group as [rows] vectors and broadcast
    across the group's columns, not gathered per element."""
    ok = n_ok[:, None] & (offs_j[None, :] < HALF)
    rows = base + offs_n[:, None] * stride_n
    if KV_BITS == 4:
        if FULL:
            byte = tl.load(rows + offs_j[None, :] * stride_d)
        else:
            byte = tl.load(rows + offs_j[None, :] * stride_d, mask=ok, other=0)
        lo = byte & 15
        hi = byte >> 4
    else:
        if FULL:
            lo = tl.load(rows + offs_j[None, :] * stride_d)
            hi = tl.load(rows + (offs_j[None, :] + HALF) * stride_d)
        else:
            lo = tl.load(rows + offs_j[None, :] * stride_d, mask=ok, other=0)
            hi = tl.load(rows + (offs_j[None, :] + HALF) * stride_d, mask=ok, other=0)
    if KV_BITS != 16:
        srows = sbase + offs_n * stride_sn
        NGH: tl.constexpr = HALF // GROUP
        step_lo = tl.zeros(lo.shape, tl.float32)
        min_lo = tl.zeros(lo.shape, tl.float32)
        step_hi = tl.zeros(lo.shape, tl.float32)
        min_hi = tl.zeros(lo.shape, tl.float32)
        for g in tl.static_range(NGH):
            in_g = ((offs_j // GROUP) == g)[None, :]
            step_lo = tl.where(in_g, tl.load(srows + 2 * g, mask=n_ok, other=0.0).to(tl.float32)[:, None], step_lo)
            min_lo = tl.where(in_g, tl.load(srows + 2 * g + 1, mask=n_ok, other=0.0).to(tl.float32)[:, None], min_lo)
            step_hi = tl.where(in_g, tl.load(srows + 2 * (g + NGH), mask=n_ok, other=0.0).to(tl.float32)[:, None], step_hi)
            min_hi = tl.where(in_g, tl.load(srows + 2 * (g + NGH) + 1, mask=n_ok, other=0.0).to(tl.float32)[:, None], min_hi)
        lo = lo.to(tl.float32) * step_lo + min_lo
        hi = hi.to(tl.float32) * step_hi + min_hi
    return lo.to(DTYPE), hi.to(DTYPE)


@triton.jit
def _apply_mask(s, mask_base, offs_m, offs_n, m_ok, n_ok, stride_mm, stride_mn, MASK_KIND: tl.constexpr):
    """Scores in log2 units with a bool (1) or additive (2) mask tile applied; an additive entry
    below -1e29 (HF's finfo.min) sets the score to -1024 (natural units), as ops/attention.py says."""
    ok = m_ok[:, None] & n_ok[None, :]
    ptrs = mask_base + offs_m[:, None] * stride_mm + offs_n[None, :] * stride_mn
    if MASK_KIND == 1:
        s = tl.where(tl.load(ptrs, mask=ok, other=0) != 0, s, float("-inf"))
    if MASK_KIND == 2:
        add = tl.load(ptrs, mask=ok, other=0.0).to(tl.float32)
        masked = tl.where(add == float("-inf"), add, -1024.0 * 1.4426950408889634)
        s = tl.where(add < -1e29, masked, s + add * 1.4426950408889634)
    return s


@triton.jit
def _quantize_kernel(X, Mean, Codes, Scales, stride_xb, stride_xh, stride_xn, stride_xd, H, S,
                     HALF: tl.constexpr, BLOCK_DH: tl.constexpr, GROUP: tl.constexpr,
                     KV_BITS: tl.constexpr, SMOOTH: tl.constexpr, BLOCK_S: tl.constexpr):
    """One [BLOCK_S, D] tile of K or V to codes and (step, min) per group; formats/kv4.py's math."""
    pid_s, pid_bh = tl.program_id(0), tl.program_id(1)
    b, h = pid_bh // H, pid_bh % H
    offs_s = pid_s * BLOCK_S + tl.arange(0, BLOCK_S)
    offs_j = tl.arange(0, BLOCK_DH)
    ok = (offs_s < S)[:, None] & (offs_j < HALF)[None, :]
    rows = X + b * stride_xb + h * stride_xh + offs_s[:, None] * stride_xn
    x_lo = tl.load(rows + offs_j[None, :] * stride_xd, mask=ok, other=0.0).to(tl.float32)
    x_hi = tl.load(rows + (offs_j[None, :] + HALF) * stride_xd, mask=ok, other=0.0).to(tl.float32)
    if SMOOTH:
        mean = Mean + pid_bh * 2 * HALF
        x_lo -= tl.load(mean + offs_j, mask=offs_j < HALF, other=0.0)[None, :]
        x_hi -= tl.load(mean + HALF + offs_j, mask=offs_j < HALF, other=0.0)[None, :]
    NG: tl.constexpr = 2 * HALF // GROUP
    QMAX: tl.constexpr = (1 << KV_BITS) - 1
    srow = Scales + (pid_bh * S + offs_s) * (NG * 2)
    code_lo = tl.zeros([BLOCK_S, BLOCK_DH], tl.float32)
    code_hi = tl.zeros([BLOCK_S, BLOCK_DH], tl.float32)
    for g in tl.static_range(NG):
        col0 = (g % (NG // 2)) * GROUP  # g is a constexpr here, so col0 is one too
        in_g = (offs_j >= col0) & (offs_j < col0 + GROUP)
        if g < NG // 2:
            x = x_lo
        else:
            x = x_hi
        low = tl.min(tl.where(in_g[None, :], x, float("inf")), axis=1)
        high = tl.max(tl.where(in_g[None, :], x, float("-inf")), axis=1)
        step = tl.math.div_rn(high - low, tl.full(high.shape, QMAX, tl.float32)).to(Scales.dtype.element_ty)
        low = low.to(Scales.dtype.element_ty)
        tl.store(srow + g * 2, step, mask=offs_s < S)
        tl.store(srow + g * 2 + 1, low, mask=offs_s < S)
        step32 = step.to(tl.float32)
        inv = tl.where(step32 > 0, tl.math.div_rn(tl.full(step32.shape, 1.0, tl.float32), step32), 0.0)
        c = tl.floor((x - low.to(tl.float32)[:, None]) * inv[:, None] + 0.5)
        c = tl.minimum(tl.maximum(c, 0.0), QMAX * 1.0)
        if g < NG // 2:
            code_lo = tl.where(in_g[None, :], c, code_lo)
        else:
            code_hi = tl.where(in_g[None, :], c, code_hi)
    if KV_BITS == 4:
        crow = Codes + (pid_bh * S + offs_s)[:, None] * HALF
        tl.store(crow + offs_j[None, :], (code_lo.to(tl.uint8) | (code_hi.to(tl.uint8) << 4)), mask=ok)
    else:
        crow = Codes + (pid_bh * S + offs_s)[:, None] * (2 * HALF)
        tl.store(crow + offs_j[None, :], code_lo.to(tl.uint8), mask=ok)
        tl.store(crow + HALF + offs_j[None, :], code_hi.to(tl.uint8), mask=ok)


@triton.jit
def _fwd_blocks(acc_lo, acc_hi, l_i, m_i, q_lo, q_hi, k_base, ks_base, v_base, vs_base, mask_base,
                offs_m, m_ok, offs_j, lo, hi, SK, qk_scale,
                stride_kn, stride_kd, stride_ksn, stride_vn, stride_vd, stride_vsn, stride_mm, stride_mn,
                HALF: tl.constexpr, GROUP: tl.constexpr, KV_BITS: tl.constexpr, CAUSAL: tl.constexpr,
                MASK_KIND: tl.constexpr, MASKED: tl.constexpr, EVEN_D: tl.constexpr, BLOCK_N: tl.constexpr):
    """Key blocks [lo, hi) into the online softmax; MASKED blocks apply causal and length bounds."""
    dtype = q_lo.dtype
    FULL: tl.constexpr = EVEN_D and not MASKED
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_ok = offs_n < SK
        k_lo, k_hi = _load_kv(k_base, ks_base, offs_n, n_ok, offs_j, stride_kn, stride_kd, stride_ksn, HALF, GROUP, KV_BITS, dtype, FULL)
        s = tl.dot(q_hi, tl.trans(k_hi), tl.dot(q_lo, tl.trans(k_lo))) * qk_scale
        if MASK_KIND != 0:
            s = _apply_mask(s, mask_base, offs_m, offs_n, m_ok, n_ok, stride_mm, stride_mn, MASK_KIND)
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
        v_lo, v_hi = _load_kv(v_base, vs_base, offs_n, n_ok, offs_j, stride_vn, stride_vd, stride_vsn, HALF, GROUP, KV_BITS, dtype, FULL)
        p = p.to(dtype)
        acc_lo = tl.dot(p, v_lo, acc_lo * alpha[:, None])
        acc_hi = tl.dot(p, v_hi, acc_hi * alpha[:, None])
        m_i = m_new
    return acc_lo, acc_hi, l_i, m_i


@triton.jit
def _fwd_kernel(Q, K, KS, V, VS, Mask, Out, Lse,
                stride_qb, stride_qh, stride_qm, stride_qd, stride_kb, stride_kh, stride_kn, stride_kd,
                stride_ksb, stride_ksh, stride_ksn, stride_vb, stride_vh, stride_vn, stride_vd,
                stride_vsb, stride_vsh, stride_vsn, stride_mb, stride_mh, stride_mm, stride_mn,
                HQ, SQ, SK, sm_scale,
                GQA: tl.constexpr, HALF: tl.constexpr, BLOCK_DH: tl.constexpr, GROUP: tl.constexpr,
                KV_BITS: tl.constexpr, CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_m, pid_bh = tl.program_id(0), tl.program_id(1)
    b, h = pid_bh // HQ, pid_bh % HQ
    hk = h // GQA
    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_j = tl.arange(0, BLOCK_DH)
    m_ok = offs_m < SQ
    q_ok = m_ok[:, None] & (offs_j < HALF)[None, :]
    q_rows = Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qm
    q_lo = tl.load(q_rows + offs_j[None, :] * stride_qd, mask=q_ok, other=0.0)
    q_hi = tl.load(q_rows + (offs_j[None, :] + HALF) * stride_qd, mask=q_ok, other=0.0)
    k_base = K + b * stride_kb + hk * stride_kh
    v_base = V + b * stride_vb + hk * stride_vh
    ks_base = KS + b * stride_ksb + hk * stride_ksh
    vs_base = VS + b * stride_vsb + hk * stride_vsh
    mask_base = Mask + b * stride_mb + h * stride_mh
    acc_lo = tl.zeros([BLOCK_M, BLOCK_DH], tl.float32)
    acc_hi = tl.zeros([BLOCK_M, BLOCK_DH], tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    qk_scale = sm_scale * 1.4426950408889634
    if CAUSAL:
        full_end = start_m
        masked_end = tl.minimum(start_m + BLOCK_M, SK)
    else:
        full_end = (SK // BLOCK_N) * BLOCK_N
        masked_end = SK
    acc_lo, acc_hi, l_i, m_i = _fwd_blocks(
        acc_lo, acc_hi, l_i, m_i, q_lo, q_hi, k_base, ks_base, v_base, vs_base, mask_base, offs_m, m_ok, offs_j,
        0, full_end, SK, qk_scale, stride_kn, stride_kd, stride_ksn, stride_vn, stride_vd, stride_vsn,
        stride_mm, stride_mn, HALF, GROUP, KV_BITS, CAUSAL, MASK_KIND, False, HALF == BLOCK_DH, BLOCK_N)
    acc_lo, acc_hi, l_i, m_i = _fwd_blocks(
        acc_lo, acc_hi, l_i, m_i, q_lo, q_hi, k_base, ks_base, v_base, vs_base, mask_base, offs_m, m_ok, offs_j,
        full_end, masked_end, SK, qk_scale, stride_kn, stride_kd, stride_ksn, stride_vn, stride_vd, stride_vsn,
        stride_mm, stride_mn, HALF, GROUP, KV_BITS, CAUSAL, MASK_KIND, True, HALF == BLOCK_DH, BLOCK_N)
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    o_rows = Out + pid_bh * SQ * 2 * HALF + offs_m[:, None] * (2 * HALF)
    tl.store(o_rows + offs_j[None, :], (acc_lo / l_safe[:, None]).to(Out.dtype.element_ty), mask=q_ok)
    tl.store(o_rows + HALF + offs_j[None, :], (acc_hi / l_safe[:, None]).to(Out.dtype.element_ty), mask=q_ok)
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
def _dkdv_blocks(dk_lo, dk_hi, dv_lo, dv_hi, k_lo, k_hi, v_lo, v_hi, q_base, do_base, lse_base, delta_base,
                 mask_base, offs_n, n_ok, offs_j, lo, hi, SQ, qk_scale, stride_qm, stride_qd, stride_mm, stride_mn,
                 HALF: tl.constexpr, CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr, MASKED: tl.constexpr,
                 EVEN_D: tl.constexpr, BLOCK_M: tl.constexpr):
    """Query blocks [lo, hi) into the dK, dV accumulators of one key block (scores transposed)."""
    dtype = k_lo.dtype
    for start_m in range(lo, hi, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        m_ok = offs_m < SQ
        ok = m_ok[:, None] & (offs_j < HALF)[None, :]
        q_rows = q_base + offs_m[:, None] * stride_qm
        do_rows = do_base + offs_m[:, None] * (2 * HALF)
        if EVEN_D and not MASKED:
            q_lo = tl.load(q_rows + offs_j[None, :] * stride_qd)
            q_hi = tl.load(q_rows + (offs_j[None, :] + HALF) * stride_qd)
            do_lo = tl.load(do_rows + offs_j[None, :])
            do_hi = tl.load(do_rows + HALF + offs_j[None, :])
        else:
            q_lo = tl.load(q_rows + offs_j[None, :] * stride_qd, mask=ok, other=0.0)
            q_hi = tl.load(q_rows + (offs_j[None, :] + HALF) * stride_qd, mask=ok, other=0.0)
            do_lo = tl.load(do_rows + offs_j[None, :], mask=ok, other=0.0)
            do_hi = tl.load(do_rows + HALF + offs_j[None, :], mask=ok, other=0.0)
        lse2 = tl.load(lse_base + offs_m, mask=m_ok, other=0.0) * 1.4426950408889634
        delta = tl.load(delta_base + offs_m, mask=m_ok, other=0.0)
        s_t = tl.dot(k_hi, tl.trans(q_hi), tl.dot(k_lo, tl.trans(q_lo))) * qk_scale
        if MASK_KIND != 0:
            s_t = tl.trans(_apply_mask(tl.trans(s_t), mask_base, offs_m, offs_n, m_ok, n_ok, stride_mm, stride_mn, MASK_KIND))
        p_t = tl.math.exp2(s_t - lse2[None, :])
        if MASKED:
            keep = m_ok[None, :]
            if CAUSAL:
                keep = keep & (offs_m[None, :] >= offs_n[:, None])
            p_t = tl.where(keep, p_t, 0.0)
        p16 = p_t.to(dtype)
        dv_lo = tl.dot(p16, do_lo, dv_lo)
        dv_hi = tl.dot(p16, do_hi, dv_hi)
        dp_t = tl.dot(v_hi, tl.trans(do_hi), tl.dot(v_lo, tl.trans(do_lo)))
        ds_t = (p_t * (dp_t - delta[None, :])).to(dtype)
        dk_lo = tl.dot(ds_t, q_lo, dk_lo)
        dk_hi = tl.dot(ds_t, q_hi, dk_hi)
    return dk_lo, dk_hi, dv_lo, dv_hi


@triton.jit
def _dkdv_kernel(Q, K, KS, V, VS, Mask, dO, Lse, Delta, dK, dV,
                 stride_qb, stride_qh, stride_qm, stride_qd, stride_kb, stride_kh, stride_kn, stride_kd,
                 stride_ksb, stride_ksh, stride_ksn, stride_vb, stride_vh, stride_vn, stride_vd,
                 stride_vsb, stride_vsh, stride_vsn, stride_mb, stride_mh, stride_mm, stride_mn,
                 HKV, SQ, SK, sm_scale,
                 GQA: tl.constexpr, HALF: tl.constexpr, BLOCK_DH: tl.constexpr, GROUP: tl.constexpr,
                 KV_BITS: tl.constexpr, CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_n, pid_bh = tl.program_id(0), tl.program_id(1)
    b, hk = pid_bh // HKV, pid_bh % HKV
    start_n = pid_n * BLOCK_N
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_j = tl.arange(0, BLOCK_DH)
    n_ok = offs_n < SK
    dtype = Q.dtype.element_ty
    k_lo, k_hi = _load_kv(K + b * stride_kb + hk * stride_kh, KS + b * stride_ksb + hk * stride_ksh, offs_n, n_ok,
                          offs_j, stride_kn, stride_kd, stride_ksn, HALF, GROUP, KV_BITS, dtype, False)
    v_lo, v_hi = _load_kv(V + b * stride_vb + hk * stride_vh, VS + b * stride_vsb + hk * stride_vsh, offs_n, n_ok,
                          offs_j, stride_vn, stride_vd, stride_vsn, HALF, GROUP, KV_BITS, dtype, False)
    dk_lo = tl.zeros([BLOCK_N, BLOCK_DH], tl.float32)
    dk_hi = tl.zeros([BLOCK_N, BLOCK_DH], tl.float32)
    dv_lo = tl.zeros([BLOCK_N, BLOCK_DH], tl.float32)
    dv_hi = tl.zeros([BLOCK_N, BLOCK_DH], tl.float32)
    qk_scale = sm_scale * 1.4426950408889634
    if CAUSAL:
        full_start = start_n + BLOCK_N
    else:
        full_start = 0
    full_end = tl.maximum(full_start, (SQ // BLOCK_M) * BLOCK_M)
    for g in range(GQA):
        h = hk * GQA + g
        bh = b * HKV * GQA + h
        q_base = Q + b * stride_qb + h * stride_qh
        do_base = dO + bh * SQ * 2 * HALF
        mask_base = Mask + b * stride_mb + h * stride_mh
        if CAUSAL:
            dk_lo, dk_hi, dv_lo, dv_hi = _dkdv_blocks(
                dk_lo, dk_hi, dv_lo, dv_hi, k_lo, k_hi, v_lo, v_hi, q_base, do_base, Lse + bh * SQ, Delta + bh * SQ,
                mask_base, offs_n, n_ok, offs_j, start_n, tl.minimum(full_start, SQ), SQ, qk_scale, stride_qm, stride_qd,
                stride_mm, stride_mn, HALF, CAUSAL, MASK_KIND, True, HALF == BLOCK_DH, BLOCK_M)
        dk_lo, dk_hi, dv_lo, dv_hi = _dkdv_blocks(
            dk_lo, dk_hi, dv_lo, dv_hi, k_lo, k_hi, v_lo, v_hi, q_base, do_base, Lse + bh * SQ, Delta + bh * SQ,
            mask_base, offs_n, n_ok, offs_j, full_start, full_end, SQ, qk_scale, stride_qm, stride_qd,
            stride_mm, stride_mn, HALF, CAUSAL, MASK_KIND, False, HALF == BLOCK_DH, BLOCK_M)
        dk_lo, dk_hi, dv_lo, dv_hi = _dkdv_blocks(
            dk_lo, dk_hi, dv_lo, dv_hi, k_lo, k_hi, v_lo, v_hi, q_base, do_base, Lse + bh * SQ, Delta + bh * SQ,
            mask_base, offs_n, n_ok, offs_j, full_end, SQ, SQ, qk_scale, stride_qm, stride_qd,
            stride_mm, stride_mn, HALF, CAUSAL, MASK_KIND, True, HALF == BLOCK_DH, BLOCK_M)
    ok = n_ok[:, None] & (offs_j < HALF)[None, :]
    rows = pid_bh * SK * 2 * HALF + offs_n[:, None] * (2 * HALF)
    tl.store(dK + rows + offs_j[None, :], (dk_lo * sm_scale).to(dK.dtype.element_ty), mask=ok)
    tl.store(dK + rows + HALF + offs_j[None, :], (dk_hi * sm_scale).to(dK.dtype.element_ty), mask=ok)
    tl.store(dV + rows + offs_j[None, :], dv_lo.to(dV.dtype.element_ty), mask=ok)
    tl.store(dV + rows + HALF + offs_j[None, :], dv_hi.to(dV.dtype.element_ty), mask=ok)


@triton.jit
def _dq_blocks(dq_lo, dq_hi, q_lo, q_hi, do_lo, do_hi, lse2, delta, k_base, ks_base, v_base, vs_base, mask_base,
               offs_m, m_ok, offs_j, lo, hi, SK, qk_scale,
               stride_kn, stride_kd, stride_ksn, stride_vn, stride_vd, stride_vsn, stride_mm, stride_mn,
               HALF: tl.constexpr, GROUP: tl.constexpr, KV_BITS: tl.constexpr, CAUSAL: tl.constexpr,
               MASK_KIND: tl.constexpr, MASKED: tl.constexpr, EVEN_D: tl.constexpr, BLOCK_N: tl.constexpr):
    """Key blocks [lo, hi) into the dQ accumulator of one query block."""
    dtype = q_lo.dtype
    FULL: tl.constexpr = EVEN_D and not MASKED
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_ok = offs_n < SK
        k_lo, k_hi = _load_kv(k_base, ks_base, offs_n, n_ok, offs_j, stride_kn, stride_kd, stride_ksn, HALF, GROUP, KV_BITS, dtype, FULL)
        v_lo, v_hi = _load_kv(v_base, vs_base, offs_n, n_ok, offs_j, stride_vn, stride_vd, stride_vsn, HALF, GROUP, KV_BITS, dtype, FULL)
        s = tl.dot(q_hi, tl.trans(k_hi), tl.dot(q_lo, tl.trans(k_lo))) * qk_scale
        if MASK_KIND != 0:
            s = _apply_mask(s, mask_base, offs_m, offs_n, m_ok, n_ok, stride_mm, stride_mn, MASK_KIND)
        p = tl.math.exp2(s - lse2[:, None])
        if MASKED:
            keep = n_ok[None, :]
            if CAUSAL:
                keep = keep & (offs_n[None, :] <= offs_m[:, None])
            p = tl.where(keep, p, 0.0)
        dp = tl.dot(do_hi, tl.trans(v_hi), tl.dot(do_lo, tl.trans(v_lo)))
        ds = (p * (dp - delta[:, None])).to(dtype)
        dq_lo = tl.dot(ds, k_lo, dq_lo)
        dq_hi = tl.dot(ds, k_hi, dq_hi)
    return dq_lo, dq_hi


@triton.jit
def _dq_kernel(Q, K, KS, V, VS, Mask, dO, Lse, Delta, dQ,
               stride_qb, stride_qh, stride_qm, stride_qd, stride_kb, stride_kh, stride_kn, stride_kd,
               stride_ksb, stride_ksh, stride_ksn, stride_vb, stride_vh, stride_vn, stride_vd,
               stride_vsb, stride_vsh, stride_vsn, stride_mb, stride_mh, stride_mm, stride_mn,
               HQ, SQ, SK, sm_scale,
               GQA: tl.constexpr, HALF: tl.constexpr, BLOCK_DH: tl.constexpr, GROUP: tl.constexpr,
               KV_BITS: tl.constexpr, CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_m, pid_bh = tl.program_id(0), tl.program_id(1)
    b, h = pid_bh // HQ, pid_bh % HQ
    hk = h // GQA
    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_j = tl.arange(0, BLOCK_DH)
    m_ok = offs_m < SQ
    ok = m_ok[:, None] & (offs_j < HALF)[None, :]
    q_rows = Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qm
    q_lo = tl.load(q_rows + offs_j[None, :] * stride_qd, mask=ok, other=0.0)
    q_hi = tl.load(q_rows + (offs_j[None, :] + HALF) * stride_qd, mask=ok, other=0.0)
    do_rows = dO + pid_bh * SQ * 2 * HALF + offs_m[:, None] * (2 * HALF)
    do_lo = tl.load(do_rows + offs_j[None, :], mask=ok, other=0.0)
    do_hi = tl.load(do_rows + HALF + offs_j[None, :], mask=ok, other=0.0)
    lse2 = tl.load(Lse + pid_bh * SQ + offs_m, mask=m_ok, other=0.0) * 1.4426950408889634
    delta = tl.load(Delta + pid_bh * SQ + offs_m, mask=m_ok, other=0.0)
    k_base = K + b * stride_kb + hk * stride_kh
    v_base = V + b * stride_vb + hk * stride_vh
    ks_base = KS + b * stride_ksb + hk * stride_ksh
    vs_base = VS + b * stride_vsb + hk * stride_vsh
    mask_base = Mask + b * stride_mb + h * stride_mh
    dq_lo = tl.zeros([BLOCK_M, BLOCK_DH], tl.float32)
    dq_hi = tl.zeros([BLOCK_M, BLOCK_DH], tl.float32)
    qk_scale = sm_scale * 1.4426950408889634
    if CAUSAL:
        full_end = start_m
        masked_end = tl.minimum(start_m + BLOCK_M, SK)
    else:
        full_end = (SK // BLOCK_N) * BLOCK_N
        masked_end = SK
    dq_lo, dq_hi = _dq_blocks(
        dq_lo, dq_hi, q_lo, q_hi, do_lo, do_hi, lse2, delta, k_base, ks_base, v_base, vs_base, mask_base, offs_m, m_ok,
        offs_j, 0, full_end, SK, qk_scale, stride_kn, stride_kd, stride_ksn, stride_vn, stride_vd, stride_vsn,
        stride_mm, stride_mn, HALF, GROUP, KV_BITS, CAUSAL, MASK_KIND, False, HALF == BLOCK_DH, BLOCK_N)
    dq_lo, dq_hi = _dq_blocks(
        dq_lo, dq_hi, q_lo, q_hi, do_lo, do_hi, lse2, delta, k_base, ks_base, v_base, vs_base, mask_base, offs_m, m_ok,
        offs_j, full_end, masked_end, SK, qk_scale, stride_kn, stride_kd, stride_ksn, stride_vn, stride_vd, stride_vsn,
        stride_mm, stride_mn, HALF, GROUP, KV_BITS, CAUSAL, MASK_KIND, True, HALF == BLOCK_DH, BLOCK_N)
    rows = dQ + pid_bh * SQ * 2 * HALF + offs_m[:, None] * (2 * HALF)
    tl.store(rows + offs_j[None, :], (dq_lo * sm_scale).to(dQ.dtype.element_ty), mask=ok)
    tl.store(rows + HALF + offs_j[None, :], (dq_hi * sm_scale).to(dQ.dtype.element_ty), mask=ok)


# (BLOCK_M, BLOCK_N, num_warps, num_stages), kept to those that compile for sm_90 without register
# spills (or the least: dkdv spills 48 bytes at its best) at D = 128 and fit in shared memory; each
# config costs a compile on the first call. The filter keeps the block-size divisibility the causal
# stage split relies on (fwd/dq: BLOCK_M % BLOCK_N == 0; dkdv: BLOCK_N % BLOCK_M == 0).
_FWD_CONFIGS = [(128, 32, 8, 3), (128, 64, 8, 2)]
_DQ_CONFIGS = [(128, 32, 8, 2)]
_DKDV_CONFIGS = [(32, 64, 8, 2)]
_INTERPRET_CONFIGS = {"fwd": [(32, 16, 4, 1)], "dq": [(32, 16, 4, 1)], "dkdv": [(16, 32, 4, 1)]}
_KEY = ["SQ", "SK", "HALF", "KV_BITS", "CAUSAL", "MASK_KIND", "GQA"]


def _configs(kind: str, configs: list[tuple[int, int, int, int]]) -> list[triton.Config]:
    if _INTERPRET:
        configs = _INTERPRET_CONFIGS[kind]
    ok = (lambda m, n: n % m == 0) if kind == "dkdv" else (lambda m, n: m % n == 0)
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s) for m, n, w, s in configs if ok(m, n)]


_fwd = triton.autotune(_configs("fwd", _FWD_CONFIGS), key=_KEY)(_fwd_kernel)
_dq = triton.autotune(_configs("dq", _DQ_CONFIGS), key=_KEY)(_dq_kernel)
_dkdv = triton.autotune(_configs("dkdv", _DKDV_CONFIGS), key=_KEY)(_dkdv_kernel)


def _mask_args(mask, q, sk):
    """(tensor, 4 strides, kind) with broadcast dims at stride 0; kind 0 none, 1 bool, 2 additive."""
    if mask is None:
        return q, (0, 0, 0, 0), 0
    b, hq, sq = q.shape[:3]
    full = mask.expand(b, hq, sq, sk)
    if mask.dtype == torch.bool:
        return full.view(torch.uint8), full.stride(), 1
    return full, full.stride(), 2


def _kv_args(t, scales, kv_bits):
    if kv_bits == 16:
        return (t, t, *t.stride(), 0, 0, 0)
    return (t, scales, *t.stride(), *scales.stride()[:3])


def quantize(x: torch.Tensor, kv_bits: int, smooth: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """K (smooth=True) or V [B, H, S, D] -> (codes, scales), the layout of formats/kv4.py."""
    b, h, s, d = x.shape
    ngroups = d // kv4.group_size(d)
    codes = x.new_empty(b, h, s, kv4.code_cols(d, kv_bits), dtype=torch.uint8)
    scales = x.new_empty(b, h, s, ngroups, 2, dtype=kv4.scale_dtype(x.dtype))
    mean = x.float().mean(dim=2).contiguous() if smooth else scales
    block_s = 32 if _INTERPRET else 64
    _quantize_kernel[(triton.cdiv(s, block_s), b * h)](
        x, mean, codes, scales, *x.stride(), h, s, HALF=d // 2, BLOCK_DH=triton.next_power_of_2(d // 2),
        GROUP=kv4.group_size(d), KV_BITS=kv_bits, SMOOTH=smooth, BLOCK_S=block_s)
    return codes, scales


def _meta(q, k, kv_bits, causal, mask_kind):
    d = q.shape[-1]
    return dict(GQA=q.shape[1] // k.shape[1], HALF=d // 2, BLOCK_DH=max(16, triton.next_power_of_2(d // 2)),
                GROUP=kv4.group_size(d), KV_BITS=kv_bits, CAUSAL=causal, MASK_KIND=mask_kind)


def forward(q, k, v, mask, causal: bool, scale: float, kv_bits: int):
    """(out, lse, k_q, k_scale, v_q, v_scale), as `lowmem::attention` defines them."""
    b, hq, sq, _ = q.shape
    sk = k.shape[2]
    if kv_bits == 16:
        packed = kv4.no_codes(k)
        kq, ks, vq, vs = k, None, v, None
    else:
        packed = (*quantize(k, kv_bits, True), *quantize(v, kv_bits, False))
        kq, ks, vq, vs = packed
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty(b, hq, sq, dtype=torch.float32, device=q.device)
    mask_t, mask_strides, mask_kind = _mask_args(mask, q, sk)
    grid = lambda meta: (triton.cdiv(sq, meta["BLOCK_M"]), b * hq)  # noqa: E731
    _fwd[grid](q, *_kv_args(kq, ks, kv_bits)[:2], vq, _kv_args(vq, vs, kv_bits)[1], mask_t, out, lse,
               *q.stride(), *_kv_args(kq, ks, kv_bits)[2:], *_kv_args(vq, vs, kv_bits)[2:], *mask_strides,
               hq, sq, sk, scale, **_meta(q, k, kv_bits, causal, mask_kind))
    return (out, lse, *packed)


def backward(grad_out, q, k_q, k_scale, v_q, v_scale, out, lse, mask, causal: bool, scale: float, kv_bits: int):
    """(dq, dk, dv) from what the forward saved; dk, dv at the KV-head count."""
    b, hq, sq, d = q.shape
    hkv, sk = k_q.shape[1], k_q.shape[2]
    grad_out, out = grad_out.contiguous(), out.contiguous()
    delta = torch.empty_like(lse)
    _delta_kernel[(triton.cdiv(sq, 64), b * hq)](out, grad_out, delta, sq, D=d, BLOCK_D=triton.next_power_of_2(d), BLOCK_M=64)
    ks, vs = (None, None) if kv_bits == 16 else (k_scale, v_scale)
    kargs, vargs = _kv_args(k_q, ks, kv_bits), _kv_args(v_q, vs, kv_bits)
    mask_t, mask_strides, mask_kind = _mask_args(mask, q, sk)
    meta = _meta(q, q.new_empty(b, hkv, 1, 1), kv_bits, causal, mask_kind)
    strides = (*q.stride(), *kargs[2:], *vargs[2:], *mask_strides)
    dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    dk = torch.empty(b, hkv, sk, d, dtype=q.dtype, device=q.device)
    dv = torch.empty_like(dk)
    _dkdv[lambda m: (triton.cdiv(sk, m["BLOCK_N"]), b * hkv)](
        q, *kargs[:2], vargs[0], vargs[1], mask_t, grad_out, lse, delta, dk, dv, *strides, hkv, sq, sk, scale, **meta)
    _dq[lambda m: (triton.cdiv(sq, m["BLOCK_M"]), b * hq)](
        q, *kargs[:2], vargs[0], vargs[1], mask_t, grad_out, lse, delta, dq, *strides, hq, sq, sk, scale, **meta)
    return dq, dk, dv
