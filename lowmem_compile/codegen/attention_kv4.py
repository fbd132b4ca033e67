"""Flash attention, forward and backward, GQA-native, on K/V kept in 4, 8 or 16 bits.

Computes O = softmax(cap(Q Kᵀ · scale) + mask) V row block by row block with an online softmax
(base-2 exponentials, log2(e) folded into the scale, fp32 accumulators), and its gradients from
(O, lse) by recomputing P: dV = Pᵀ dO, dS = P ∘ (dO Vᵀ − rowsum(dO ∘ O)) ∘ cap', dQ = dS K · scale,
dK = dSᵀ Q · scale. cap is the identity, or Gemma 2's logit softcap c · tanh(x / c) (cap' = 1 − t²,
t = tanh(x / c), recomputed with P).

At 4 and 8 bits, what is kept (formats/kv4.py: codes, per-group step and minimum) is expanded once a
pass by kv_codes.py into a transient 16-bit K and V [B, Hkv, S, D], the values code · step + min
that every kernel then reads: the forward right after quantizing (so it runs on the values the
backward will see), the backward from the saved codes. The attention kernels read 16-bit K/V only;
the transient is O(S·D), as large as K and V themselves, and lives only inside one op call.

Every operand is one tile across the whole head dim ([rows, BLOCK_D], BLOCK_D the next power of two,
columns past D loaded as zero), so every product is one dot into one accumulator. Each program splits
its loop into the blocks that need no mask (fully visible) and the few that do (on the causal
diagonal, on the lower edge of a band, or past the end).

Bands (BAND, causal only): query row q sees keys [lo(q), q], lo(q) = max(q − window + 1, start of q's
document); key kv is seen by queries [kv, hi(kv)), hi(kv) = min(kv + window, end of kv's document).
The launcher writes both as one int32 tensor [B, 2, S] (`_bounds`, O(S) from the window and the
per-token document ids). A forward or dQ program visits only the key blocks from its first row's
lo, a dK/dV program only the query blocks below its last key's hi: tiles outside the band or across
documents are never loaded, so a window W costs S·W, not S², and D documents of S/D tokens S²/D.

Masks (MASK_KIND): 0 none; 1 the same for every query row (a key-padding mask, e.g. the [B, 1, 1, Sk]
term HF's causal + padding mask lowers to): one [BLOCK_N] vector a key block, broadcast over the
rows (a dK/dV program loads it once per query head and skips a key block masked whole); 2 any other
(the fallback): a [rows, cols] tile, which enters as the dot's accumulator and has its own configs.
Bool masks arrive as uint8, additive ones as floats; masks apply after the softcap (as Gemma 2 adds
its mask to the capped scores).

Kernels: `_fwd_kernel` (one program per query block and query head; it reads its KV head, so K/V
are never repeated), `_delta_kernel` (rowsum(dO ∘ O)), `_dkdv_kernel` (one program per key block and
KV head, looping over the query heads of its group: dK and dV summed over the group in registers, no
atomics; or over a share of them, see `dkdv_split`) and `_dq_kernel` (one program per query block
and query head).

Order of programs: causal programs differ in work (a query block sees the keys up to it, a key block
the queries from it on) and the GPU starts them in grid order, heads fastest here; forward and dQ
walk query blocks from the last, dK/dV key blocks from the first, so the longest start first and
the short ones fill the tail (a longest-first list schedule).

Accepts: q [B, Hq, S, D], k/v [B, Hkv, S, D], fp16 or bf16 (fp32 only under the interpreter, where
dots are exact), D in SUPPORTED_HEAD_DIMS (tiles per head dim: D = 256 has its own configs, which
fit the 227 KiB of shared memory a program may have on sm_90), any sequence length, causal
(Sq == Sk) or not, a mask (bool or additive) broadcastable to [B, Hq, Sq, Sk], any scale, a softcap,
and with causal a window and document ids.
"""

from __future__ import annotations

import inspect
import os

import torch
import triton
import triton.language as tl

from ..formats import kv4
from .kv_codes import dequantize, quantize

SUPPORTED_HEAD_DIMS = (32, 64, 80, 96, 128, 256)
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
def _tanh(x):
    """tanh(x) = sign(x) (1 − e) / (1 + e), e = exp(−2|x|): one exp2 (libdevice's tanh has no
    interpreter version); absolute error about 1e-7, ±1 at ±inf."""
    e = tl.math.exp2(-2.8853900817779268 * tl.abs(x))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(x < 0, -t, t)


@triton.jit
def _capped(x, sm_scale, cap, SOFTCAP: tl.constexpr):
    """Raw dots `x` to scores in log2 units, and t = tanh(x · scale / cap) for the backward's 1 − t²
    (`x` itself when not SOFTCAP: unused). A −inf dot (a masked entry) stays −inf."""
    if SOFTCAP:
        t = _tanh(x * (sm_scale / cap))
        return tl.where(x == float("-inf"), x, t * (cap * 1.4426950408889634)), t
    return x * (sm_scale * 1.4426950408889634), x


@triton.jit
def _logits(a, b, mask_base, rows, cols, ok, stride_r, stride_c, sm_scale, cap, MASK_KIND: tl.constexpr,
            SOFTCAP: tl.constexpr):
    """(scores a·b in log2 units, t of `_capped`) with a general mask tile applied (MASK_KIND 2, one
    pointer a score, 0 where not `ok`); other masks are the caller's. The tile's −inf entries enter as
    the dot's accumulator: that pins the tile to the dot's layout (applied only after the dot, the
    compiler kept the scores in two layouts at once and spilled 200-1000 bytes of registers); its
    additive values are applied after the cap."""
    if MASK_KIND == 2:
        m = tl.load(mask_base + rows[:, None] * stride_r + cols[None, :] * stride_c, mask=ok, other=0)
        if m.dtype == tl.uint8:
            s, t = _capped(tl.dot(a, b, tl.where(m != 0, 0.0, float("-inf"))), sm_scale, cap, SOFTCAP)
        else:
            add = m.to(tl.float32)
            s, t = _capped(tl.dot(a, b, tl.where(add == float("-inf"), add, 0.0)), sm_scale, cap, SOFTCAP)
            s = _masked(s, m)
    else:
        s, t = _capped(tl.dot(a, b), sm_scale, cap, SOFTCAP)
    return s, t


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
def _query_block(Q, K, V, Mask, Bounds, stride_qb, stride_qh, stride_qm, stride_qd, stride_kb, stride_kh,
                 stride_vb, stride_vh, stride_mb, stride_mh, stride_bb, HQ, SQ, SK, GQA: tl.constexpr,
                 D: tl.constexpr, BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr, BAND: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """What a forward and a dQ program share: its query block (grid axis 1, from the last block: the
    longest causal rows start first) and Q tile, the bases of its KV head and mask, its rows' band
    starts `lo_rows` (BAND), and its key range [lo, masked_end) split into the blocks on the band's
    lower edge [lo, band_end) (masked), those without masks [band_end, full_end) and the rest
    [full_end, masked_end) (masked: the diagonal, the end)."""
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
    if BAND:
        lo_rows = tl.load(Bounds + b * stride_bb + offs_m, mask=m_ok, other=0)
        lo = (tl.min(tl.where(m_ok, lo_rows, SK), axis=0) // BLOCK_N) * BLOCK_N
        band_end = tl.minimum(tl.cdiv(tl.max(lo_rows, axis=0), BLOCK_N) * BLOCK_N, full_end)
    else:
        lo_rows = offs_m  # a placeholder, read only with BAND
        lo = 0
        band_end = 0
    return (pid_bh, offs_m, m_ok, q, K + b * stride_kb + hk * stride_kh, V + b * stride_vb + hk * stride_vh,
            Mask + b * stride_mb + h * stride_mh, lo_rows, lo, band_end, full_end, masked_end)


@triton.jit
def _visible(offs_m, offs_n, n_ok, lo_rows, CAUSAL: tl.constexpr, BAND: tl.constexpr):
    """[rows, cols] of a masked block's query rows x keys (forward, dQ) that are seen: keys in range,
    not above the diagonal, not below the row's band start."""
    ok = n_ok[None, :]
    if CAUSAL:
        ok = ok & (offs_n[None, :] <= offs_m[:, None])
    if BAND:
        ok = ok & (offs_n[None, :] >= lo_rows[:, None])
    return ok


@triton.jit
def _fwd_blocks(acc, l_i, m_i, q, k_base, v_base, mask_base, offs_m, m_ok, lo_rows, lo, hi, SK, sm_scale, cap,
                stride_kn, stride_kd, stride_vn, stride_vd, stride_mm, stride_mn, D: tl.constexpr,
                BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr, BAND: tl.constexpr, SOFTCAP: tl.constexpr,
                MASK_KIND: tl.constexpr, MASKED: tl.constexpr, BLOCK_N: tl.constexpr):
    """Key blocks [lo, hi) into the online softmax; MASKED blocks apply causal, band and length bounds."""
    dtype = q.dtype
    FULL: tl.constexpr = BLOCK_D == D and not MASKED
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_ok = offs_n < SK
        k = _load_rows(k_base, offs_n, n_ok, stride_kn, stride_kd, D, BLOCK_D, FULL)
        s, _ = _logits(q, tl.trans(k), mask_base, offs_m, offs_n, m_ok[:, None] & n_ok[None, :], stride_mm, stride_mn,
                       sm_scale, cap, MASK_KIND, SOFTCAP)
        if MASK_KIND == 1:
            s = _masked(s, _key_mask(mask_base, offs_n, n_ok, stride_mn, not MASKED)[None, :])
        if MASKED:
            s = tl.where(_visible(offs_m, offs_n, n_ok, lo_rows, CAUSAL, BAND), s, float("-inf"))
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
def _fwd_kernel(Q, K, V, Mask, Bounds, Out, Lse,
                stride_qb, stride_qh, stride_qm, stride_qd, stride_kb, stride_kh, stride_kn, stride_kd,
                stride_vb, stride_vh, stride_vn, stride_vd, stride_mb, stride_mh, stride_mm, stride_mn, stride_bb,
                HQ, SQ, SK, sm_scale, cap,
                GQA: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr, BAND: tl.constexpr,
                SOFTCAP: tl.constexpr, MASK_KIND: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_bh, offs_m, m_ok, q, k_base, v_base, mask_base, lo_rows, lo, band_end, full_end, masked_end = _query_block(
        Q, K, V, Mask, Bounds, stride_qb, stride_qh, stride_qm, stride_qd, stride_kb, stride_kh, stride_vb, stride_vh,
        stride_mb, stride_mh, stride_bb, HQ, SQ, SK, GQA, D, BLOCK_D, CAUSAL, BAND, BLOCK_M, BLOCK_N)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    if BAND:
        acc, l_i, m_i = _fwd_blocks(
            acc, l_i, m_i, q, k_base, v_base, mask_base, offs_m, m_ok, lo_rows, lo, band_end, SK, sm_scale, cap,
            stride_kn, stride_kd, stride_vn, stride_vd, stride_mm, stride_mn, D, BLOCK_D, CAUSAL, BAND, SOFTCAP,
            MASK_KIND, True, BLOCK_N)
    acc, l_i, m_i = _fwd_blocks(
        acc, l_i, m_i, q, k_base, v_base, mask_base, offs_m, m_ok, lo_rows, band_end, full_end, SK, sm_scale, cap,
        stride_kn, stride_kd, stride_vn, stride_vd, stride_mm, stride_mn, D, BLOCK_D, CAUSAL, BAND, SOFTCAP,
        MASK_KIND, False, BLOCK_N)
    acc, l_i, m_i = _fwd_blocks(
        acc, l_i, m_i, q, k_base, v_base, mask_base, offs_m, m_ok, lo_rows, full_end, masked_end, SK, sm_scale, cap,
        stride_kn, stride_kd, stride_vn, stride_vd, stride_mm, stride_mn, D, BLOCK_D, CAUSAL, BAND, SOFTCAP,
        MASK_KIND, True, BLOCK_N)
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
def _dkdv_blocks(dk, dv, k, v, q_base, do_base, lse_base, delta_base, mask_base, key_mask, hi_keys, offs_n, n_ok, lo,
                 hi, SQ, sm_scale, cap, stride_qm, stride_qd, stride_mm, stride_mn, D: tl.constexpr,
                 BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr, BAND: tl.constexpr, SOFTCAP: tl.constexpr,
                 MASK_KIND: tl.constexpr, MASKED: tl.constexpr, BLOCK_M: tl.constexpr):
    """Query blocks [lo, hi) into the dK, dV accumulators of one key block (scores transposed);
    `key_mask`: the block's key-padding vector (MASK_KIND 1), `hi_keys` its keys' band ends (BAND),
    both loaded once by the caller."""
    dtype = k.dtype
    FULL: tl.constexpr = BLOCK_D == D and not MASKED
    for start_m in range(lo, hi, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        m_ok = offs_m < SQ
        q = _load_rows(q_base, offs_m, m_ok, stride_qm, stride_qd, D, BLOCK_D, FULL)
        do = _load_rows(do_base, offs_m, m_ok, D, 1, D, BLOCK_D, FULL)
        lse2 = tl.load(lse_base + offs_m, mask=m_ok, other=0.0) * 1.4426950408889634
        delta = tl.load(delta_base + offs_m, mask=m_ok, other=0.0)
        s_t, t_t = _logits(k, tl.trans(q), mask_base, offs_n, offs_m, n_ok[:, None] & m_ok[None, :], stride_mn, stride_mm,
                           sm_scale, cap, MASK_KIND, SOFTCAP)
        if MASK_KIND == 1:
            s_t = _masked(s_t, key_mask[:, None])
        p_t = tl.math.exp2(s_t - lse2[None, :])
        if MASKED:
            keep = m_ok[None, :]
            if CAUSAL:
                keep = keep & (offs_m[None, :] >= offs_n[:, None])
            if BAND:
                keep = keep & (offs_m[None, :] < hi_keys[:, None])
            p_t = tl.where(keep, p_t, 0.0)
        dv = tl.dot(p_t.to(dtype), do, dv)
        dp_t = tl.dot(v, tl.trans(do))
        ds_t = p_t * (dp_t - delta[None, :])
        if SOFTCAP:
            ds_t = ds_t * (1.0 - t_t * t_t)
        dk = tl.dot(ds_t.to(dtype), q, dk)
    return dk, dv


@triton.jit
def _dkdv_kernel(Q, K, V, Mask, Bounds, dO, Lse, Delta, dK, dV,
                 stride_qb, stride_qh, stride_qm, stride_qd, stride_kb, stride_kh, stride_kn, stride_kd,
                 stride_vb, stride_vh, stride_vn, stride_vd, stride_mb, stride_mh, stride_mm, stride_mn, stride_bb,
                 HKV, SQ, SK, sm_scale, cap,
                 GQA: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr, BAND: tl.constexpr,
                 SOFTCAP: tl.constexpr, MASK_KIND: tl.constexpr, SPLIT: tl.constexpr, BLOCK_M: tl.constexpr,
                 BLOCK_N: tl.constexpr):
    """Grid (SPLIT · B · Hkv, key blocks): program (part · B·Hkv + KV head, key block) sums the query
    heads [part, part + 1) · GQA/SPLIT of its group into slab `program_id(0)` of dK, dV (at SPLIT > 1
    fp32 partials, summed by the launcher). Key blocks from the first: the longest causal ones start
    first. Its query range: [start_n, hi) causal (hi the band end of its last key, else SQ), of which
    the blocks past its keys' diagonal and below every key's band end need no mask."""
    pid = tl.program_id(0)
    n_bh = tl.num_programs(0) // SPLIT
    part, pid_bh = pid // n_bh, pid % n_bh
    b, hk = pid_bh // HKV, pid_bh % HKV
    start_n = tl.program_id(1) * BLOCK_N
    offs_n = start_n + tl.arange(0, BLOCK_N)
    n_ok = offs_n < SK
    k = _load_rows(K + b * stride_kb + hk * stride_kh, offs_n, n_ok, stride_kn, stride_kd, D, BLOCK_D, False)
    v = _load_rows(V + b * stride_vb + hk * stride_vh, offs_n, n_ok, stride_vn, stride_vd, D, BLOCK_D, False)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    if CAUSAL:
        full_start = start_n + BLOCK_N
    else:
        full_start = 0
    full_end = tl.maximum(full_start, (SQ // BLOCK_M) * BLOCK_M)
    if BAND:
        hi_keys = tl.load(Bounds + b * stride_bb + SQ + offs_n, mask=n_ok, other=0)
        q_hi = tl.max(hi_keys, axis=0)
        full_end = tl.maximum(full_start, (tl.min(tl.where(n_ok, hi_keys, SQ), axis=0) // BLOCK_M) * BLOCK_M)
    else:
        hi_keys = offs_n  # a placeholder, read only with BAND
        q_hi = SQ
    HEADS: tl.constexpr = GQA // SPLIT
    for g in range(part * HEADS, part * HEADS + HEADS):
        h = hk * GQA + g
        bh = b * HKV * GQA + h
        q_base = Q + b * stride_qb + h * stride_qh
        do_base = dO + bh * SQ * D
        mask_base = Mask + b * stride_mb + h * stride_mh
        q_end = q_hi
        key_mask = n_ok  # a placeholder: read only at MASK_KIND 1
        if MASK_KIND == 1:
            # one vector for every query block; a block whose keys are all masked (-inf: padding)
            # has P = 0 in every row, so its dK, dV are exactly 0 and its query loop is skipped
            key_mask = _key_mask(mask_base, offs_n, n_ok, stride_mn, False)
            seen = tl.where(n_ok, _masked(tl.zeros([BLOCK_N], tl.float32), key_mask), float("-inf"))
            q_end = tl.where(tl.max(seen, axis=0) == float("-inf"), 0, q_hi)
        if CAUSAL:
            dk, dv = _dkdv_blocks(
                dk, dv, k, v, q_base, do_base, Lse + bh * SQ, Delta + bh * SQ, mask_base, key_mask, hi_keys, offs_n,
                n_ok, start_n, tl.minimum(full_start, q_end), SQ, sm_scale, cap, stride_qm, stride_qd, stride_mm,
                stride_mn, D, BLOCK_D, CAUSAL, BAND, SOFTCAP, MASK_KIND, True, BLOCK_M)
        dk, dv = _dkdv_blocks(
            dk, dv, k, v, q_base, do_base, Lse + bh * SQ, Delta + bh * SQ, mask_base, key_mask, hi_keys, offs_n, n_ok,
            full_start, tl.minimum(full_end, q_end), SQ, sm_scale, cap, stride_qm, stride_qd, stride_mm, stride_mn,
            D, BLOCK_D, CAUSAL, BAND, SOFTCAP, MASK_KIND, False, BLOCK_M)
        dk, dv = _dkdv_blocks(
            dk, dv, k, v, q_base, do_base, Lse + bh * SQ, Delta + bh * SQ, mask_base, key_mask, hi_keys, offs_n, n_ok,
            full_end, q_end, SQ, sm_scale, cap, stride_qm, stride_qd, stride_mm, stride_mn,
            D, BLOCK_D, CAUSAL, BAND, SOFTCAP, MASK_KIND, True, BLOCK_M)
    d = tl.arange(0, BLOCK_D)
    ptrs = pid * SK * D + offs_n[:, None] * D + d[None, :]
    ok = n_ok[:, None] & (d < D)[None, :]
    tl.store(dK + ptrs, (dk * sm_scale).to(dK.dtype.element_ty), mask=ok)
    tl.store(dV + ptrs, dv.to(dV.dtype.element_ty), mask=ok)


@triton.jit
def _dq_blocks(dq, q, do, lse2, delta, k_base, v_base, mask_base, offs_m, m_ok, lo_rows, lo, hi, SK, sm_scale, cap,
               stride_kn, stride_kd, stride_vn, stride_vd, stride_mm, stride_mn, D: tl.constexpr,
               BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr, BAND: tl.constexpr, SOFTCAP: tl.constexpr,
               MASK_KIND: tl.constexpr, MASKED: tl.constexpr, BLOCK_N: tl.constexpr):
    """Key blocks [lo, hi) into the dQ accumulator of one query block."""
    dtype = q.dtype
    FULL: tl.constexpr = BLOCK_D == D and not MASKED
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_ok = offs_n < SK
        k = _load_rows(k_base, offs_n, n_ok, stride_kn, stride_kd, D, BLOCK_D, FULL)
        v = _load_rows(v_base, offs_n, n_ok, stride_vn, stride_vd, D, BLOCK_D, FULL)
        s, t = _logits(q, tl.trans(k), mask_base, offs_m, offs_n, m_ok[:, None] & n_ok[None, :], stride_mm, stride_mn,
                       sm_scale, cap, MASK_KIND, SOFTCAP)
        if MASK_KIND == 1:
            s = _masked(s, _key_mask(mask_base, offs_n, n_ok, stride_mn, not MASKED)[None, :])
        p = tl.math.exp2(s - lse2[:, None])
        if MASKED:
            p = tl.where(_visible(offs_m, offs_n, n_ok, lo_rows, CAUSAL, BAND), p, 0.0)
        dp = tl.dot(do, tl.trans(v))
        ds = p * (dp - delta[:, None])
        if SOFTCAP:
            ds = ds * (1.0 - t * t)
        dq = tl.dot(ds.to(dtype), k, dq)
    return dq


@triton.jit
def _dq_kernel(Q, K, V, Mask, Bounds, dO, Lse, Delta, dQ,
               stride_qb, stride_qh, stride_qm, stride_qd, stride_kb, stride_kh, stride_kn, stride_kd,
               stride_vb, stride_vh, stride_vn, stride_vd, stride_mb, stride_mh, stride_mm, stride_mn, stride_bb,
               HQ, SQ, SK, sm_scale, cap,
               GQA: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr, BAND: tl.constexpr,
               SOFTCAP: tl.constexpr, MASK_KIND: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_bh, offs_m, m_ok, q, k_base, v_base, mask_base, lo_rows, lo, band_end, full_end, masked_end = _query_block(
        Q, K, V, Mask, Bounds, stride_qb, stride_qh, stride_qm, stride_qd, stride_kb, stride_kh, stride_vb, stride_vh,
        stride_mb, stride_mh, stride_bb, HQ, SQ, SK, GQA, D, BLOCK_D, CAUSAL, BAND, BLOCK_M, BLOCK_N)
    d = tl.arange(0, BLOCK_D)
    ptrs = pid_bh * SQ * D + offs_m[:, None] * D + d[None, :]
    ok = m_ok[:, None] & (d < D)[None, :]
    do = tl.load(dO + ptrs, mask=ok, other=0.0)
    lse2 = tl.load(Lse + pid_bh * SQ + offs_m, mask=m_ok, other=0.0) * 1.4426950408889634
    delta = tl.load(Delta + pid_bh * SQ + offs_m, mask=m_ok, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    if BAND:
        dq = _dq_blocks(
            dq, q, do, lse2, delta, k_base, v_base, mask_base, offs_m, m_ok, lo_rows, lo, band_end, SK, sm_scale, cap,
            stride_kn, stride_kd, stride_vn, stride_vd, stride_mm, stride_mn, D, BLOCK_D, CAUSAL, BAND, SOFTCAP,
            MASK_KIND, True, BLOCK_N)
    dq = _dq_blocks(
        dq, q, do, lse2, delta, k_base, v_base, mask_base, offs_m, m_ok, lo_rows, band_end, full_end, SK, sm_scale, cap,
        stride_kn, stride_kd, stride_vn, stride_vd, stride_mm, stride_mn, D, BLOCK_D, CAUSAL, BAND, SOFTCAP,
        MASK_KIND, False, BLOCK_N)
    dq = _dq_blocks(
        dq, q, do, lse2, delta, k_base, v_base, mask_base, offs_m, m_ok, lo_rows, full_end, masked_end, SK, sm_scale,
        cap, stride_kn, stride_kd, stride_vn, stride_vd, stride_mm, stride_mn, D, BLOCK_D, CAUSAL, BAND, SOFTCAP,
        MASK_KIND, True, BLOCK_N)
    tl.store(dQ + ptrs, (dq * sm_scale).to(dQ.dtype.element_ty), mask=ok)


# (BLOCK_M, BLOCK_N, num_warps, num_stages): those that compile for sm_90 (Triton 3.6) without register
# spills and fit in shared memory (docs/attention.md has the tables and the exceptions); each costs a
# compile on first use. Per head dim up to 128 (BLOCK_D <= 128) and at 256, where a [rows, 256] tile
# is twice as large: the fp32 accumulators leave room for a quarter of the rows (compiled with
# Triton 3.9: every 128-row D = 256 tile spills 240-1500 bytes; these spill 0-152, docs/attention.md). _CONFIGS serve no
# mask and key-padding masks, _TILE_MASK_CONFIGS general masks (a tile of mask pointers leaves room
# for smaller tiles only). The causal split needs BLOCK_M % BLOCK_N == 0 for fwd/dq and
# BLOCK_N % BLOCK_M == 0 for dkdv.
_CONFIGS = {
    128: {
        "fwd": [(128, 64, 8, 3), (128, 128, 8, 2), (64, 64, 4, 3)],
        "dq": [(128, 64, 8, 3), (128, 32, 8, 2), (64, 64, 4, 3)],
        "dkdv": [(16, 128, 8, 2), (16, 128, 8, 3), (16, 64, 8, 2)],
    },
    256: {
        "fwd": [(32, 32, 4, 2), (64, 32, 8, 2), (64, 64, 8, 2)],
        "dq": [(32, 32, 8, 2), (16, 16, 4, 2)],
        "dkdv": [(16, 32, 8, 2), (16, 16, 4, 2), (32, 32, 8, 2)],
    },
}
_TILE_MASK_CONFIGS = {
    128: {"fwd": [(128, 32, 8, 3), (128, 32, 8, 2)], "dq": [(128, 32, 8, 2)], "dkdv": [(16, 32, 8, 2)]},
    256: {"fwd": [(32, 32, 4, 2)], "dq": [(32, 32, 8, 2)], "dkdv": [(16, 32, 8, 2)]},
}
_INTERPRET_CONFIGS = {"fwd": [(32, 16, 4, 1)], "dq": [(32, 16, 4, 1)], "dkdv": [(16, 32, 4, 1)]}
_KEY = ["SQ", "SK", "D", "CAUSAL", "BAND", "SOFTCAP", "MASK_KIND", "GQA"]


def config_key(c: triton.Config) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages): a config's key in _CONFIGS."""
    return c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages


def tried(kind: str, mask_kind: int, head_dim: int) -> list[tuple[int, int, int, int]]:
    """The configs `kind`'s autotuner tries at this MASK_KIND (2: a general mask) and head dim."""
    if _INTERPRET:
        return list(_INTERPRET_CONFIGS[kind])
    table = _TILE_MASK_CONFIGS if mask_kind == 2 else _CONFIGS
    return list(table[128 if head_dim <= 128 else 256][kind])


#: What the autotuners picked on H100 and H200 (sm_90) in every attention bench run
#: (bench/results/attention/2026-11-29T04, T14, T23: kv16/kv8/kv4, causal with and without key
#: padding, 2048 / 8192 / 32768 tokens, 32 query / 8 KV heads of 128), for head dims up to 128 (other
#: GQA ratios and head dims below 128 take the same picks unmeasured), no window, no softcap: the launch
#: uses it without tuning. Each config the autotuner tries is a compile of its own on first use (the
#: largest part of a cold first step's kernel work), so tuning only where no pick was measured saves
#: six of the nine compiles there. `LOWMEM_AUTOTUNE=full` tunes over every config anyway.
_SM90_PICKS = {"dq": (128, 64, 8, 3), "dkdv": (16, 128, 8, 3)}
_SM90_FWD_PICKS = {"long_causal": (128, 64, 8, 3), "short_or_padded": (64, 64, 4, 3)}


def measured_pick(kind: str, meta: dict, device: torch.device) -> tuple[int, int, int, int] | None:
    """The config `kind` launches with untuned on this device and problem (see _SM90_PICKS), or None
    where the autotuner must choose."""
    if (_INTERPRET or os.environ.get("LOWMEM_AUTOTUNE") == "full" or device.type != "cuda"
            or torch.cuda.get_device_capability(device) != (9, 0)):
        return None
    if meta["D"] > 128 or meta["MASK_KIND"] == 2 or meta["BAND"] or meta["SOFTCAP"]:
        return None
    if kind != "fwd":
        return _SM90_PICKS[kind]
    if meta["MASK_KIND"] == 1 or meta["SQ"] <= 2048:
        return _SM90_FWD_PICKS["short_or_padded"]
    if meta["SQ"] >= 8192:
        return _SM90_FWD_PICKS["long_causal"]
    return None  # between the measured lengths: tune


def _autotune(kind: str, kernel):
    """`kernel` autotuned over its configs, each tried only at the mask kinds and head dims it is
    listed for, and not at all where a pick was measured (`measured_pick`)."""
    tables = [{0: _INTERPRET_CONFIGS}] if _INTERPRET else [_CONFIGS, _TILE_MASK_CONFIGS]
    keys = list(dict.fromkeys(c for t in tables for per_dim in t.values() for c in per_dim[kind]))
    if any((n % m if kind == "dkdv" else m % n) for m, n, _, _ in keys):
        raise ValueError(f"attention {kind} configs break the causal split's block divisibility: {keys}")
    configs = [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s) for m, n, w, s in keys]

    def prune(configs, named_args, **kwargs):
        keep = tried(kind, kwargs["MASK_KIND"], kwargs["D"])
        device = next(v.device for v in named_args.values() if isinstance(v, torch.Tensor))
        pick = measured_pick(kind, {**named_args, **kwargs}, device)
        if pick in keep:
            keep = [pick]
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
    block_n = max(n for _, n, _, _ in tried("dkdv", mask_kind, q.shape[-1]))
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



def _bounds(b: int, s: int, window: int, segments: torch.Tensor | None, device) -> torch.Tensor | None:
    """The band of a causal call as int32 [B, 2, S]: [:, 0, q] the first key row q sees, [:, 1, kv]
    one past the last query that sees key kv (module docstring); None when nothing bounds it (no
    documents, no window or one of at least S). `segments`: document ids [B or 1, S], nondecreasing
    along a row (documents contiguous), so a document's first and last index are searchsorted's."""
    if segments is None and not 0 < window < s:
        return None
    idx = torch.arange(s, device=device, dtype=torch.int32)
    w = window if window > 0 else s
    lo, hi = (idx - w + 1).clamp_min(0).expand(b, s), (idx + w).clamp_max(s).expand(b, s)
    if segments is not None:
        seg = segments.expand(b, s).contiguous()
        lo = torch.maximum(lo, torch.searchsorted(seg, seg, side="left", out_int32=True))
        hi = torch.minimum(hi, torch.searchsorted(seg, seg, side="right", out_int32=True))
    return torch.stack((lo, hi), 1).contiguous()


def _meta(q, hkv, causal, mask_kind, bounds, softcap):
    d = q.shape[-1]
    return dict(GQA=q.shape[1] // hkv, D=d, BLOCK_D=max(16, triton.next_power_of_2(d)), CAUSAL=causal,
                BAND=bounds is not None, SOFTCAP=softcap > 0, MASK_KIND=mask_kind)


def _band_args(q, causal, window, segments):
    """(bounds tensor or a placeholder, its batch stride, bounds or None) for the kernels."""
    if (window or segments is not None) and not causal:
        raise ValueError("attention kernels: a window or documents need causal=True")
    bounds = _bounds(q.shape[0], q.shape[2], window, segments, q.device) if causal else None
    return (q, 0, None) if bounds is None else (bounds, bounds.stride(0), bounds)


def forward(q, k, v, mask, causal: bool, scale: float, kv_bits: int, *, window: int = 0, softcap: float = 0.0,
            segments: torch.Tensor | None = None):
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
    bounds_t, stride_bb, bounds = _band_args(q, causal, window, segments)
    _fwd[lambda m: (b * hq, triton.cdiv(sq, m["BLOCK_M"]))](
        q, k, v, mask_t, bounds_t, out, lse, *q.stride(), *k.stride(), *v.stride(), *mask_strides, stride_bb,
        hq, sq, sk, scale, softcap or 1.0, **_meta(q, hkv, causal, mask_kind, bounds, softcap))
    return (out, lse, *packed)


def backward(grad_out, q, k_q, k_scale, v_q, v_scale, out, lse, mask, causal: bool, scale: float, kv_bits: int,
             split: int | None = None, *, window: int = 0, softcap: float = 0.0, segments: torch.Tensor | None = None):
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
    bounds_t, stride_bb, bounds = _band_args(q, causal, window, segments)
    meta = _meta(q, hkv, causal, mask_kind, bounds, softcap)
    split = split_for(q, hkv, sk, causal, mask_kind) if split is None else split
    if meta["GQA"] % split:
        raise ValueError(f"attention dK/dV: split {split} does not divide the {meta['GQA']} query heads of a KV head")
    args = (q, k, v, mask_t, bounds_t, grad_out, lse, delta)
    strides = (*q.stride(), *k.stride(), *v.stride(), *mask_strides, stride_bb)
    dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    # SPLIT > 1: one fp32 partial a share of the group's heads, summed below
    dk = torch.empty((split,) * (split > 1) + (b, hkv, sk, d), dtype=torch.float32 if split > 1 else q.dtype, device=q.device)
    dv = torch.empty_like(dk)
    cap = softcap or 1.0
    _dkdv[lambda m: (split * b * hkv, triton.cdiv(sk, m["BLOCK_N"]))](
        *args, dk, dv, *strides, hkv, sq, sk, scale, cap, SPLIT=split, **meta)
    _dq[lambda m: (b * hq, triton.cdiv(sq, m["BLOCK_M"]))](*args, dq, *strides, hq, sq, sk, scale, cap, **meta)
    if split > 1:
        dk, dv = dk.sum(0).to(q.dtype), dv.sum(0).to(q.dtype)
    return dq, dk, dv
