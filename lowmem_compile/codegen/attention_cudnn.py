"""Attention at head dim 256 through cuDNN's fused kernels, on K/V kept in 4, 8 or 16 bits.

Why not our Triton kernels there: a [rows, 256] fp32 accumulator leaves room for tiles of 16-64
rows (codegen/attention_kv4.py, docs/attention.md), and at those tiles they ran at 0.24-0.35x of
cuDNN's time, causal, 16 heads, 2048-32768 tokens on an H100 (flash, the other SDPA backend, at
0.61-0.62x of cuDNN's; bench/results/layers/2026-12-07T15/attention_forms.md). What is ours is
the storage: the forward quantizes K and V to the codes the backward keeps, as the Triton path does,
and both passes run cuDNN on the same dequantized values (so lse and P agree and the gradients are
those of the function computed); only the math is cuDNN's.

Served: CUDA, fp16/bf16, head dim 256, no mask or a causal one (Sq == Sk), no window, softcap or
packed documents (cuDNN's fused kernel, as PyTorch exposes it, takes none of those without a
materialized bias). Query heads a multiple of the KV heads: cuDNN reads one KV head per query
head, so K and V are repeated for it (a transient of Hq heads) and dK, dV summed back over each
group. Everything else goes to codegen/attention_kv4.py, and so does every call in a process started
with `LOWMEM_CUDNN_ATTENTION=0` (the Triton kernels measured against it); `LOWMEM_CUDNN_ATTENTION=all`
sends head dims 64-128 too (`HEAD_DIMS`). The switch is read once, at import: a forward and its
backward must take the same route (the lse between them is the route's own), so it cannot change
between them.

The lse handed between the passes is cuDNN's softmax statistics ([B, Hq, S, 1] in fp32, kept as
[B, Hq, S]); it goes back to cuDNN only, never to the Triton backward (the same case takes the
same route both ways).
"""

from __future__ import annotations

import os

import torch

from ..formats import kv4
from .kv_codes import dequantize, quantize

#: The head dims sent to cuDNN by default (the Triton kernels' tiles are too small there: module
#: docstring), and those `LOWMEM_CUDNN_ATTENTION=all` sends: at head dim 128, causal, cuDNN ran at
#: 1.43-1.56x our kernels' speed alone (H200, bench/results/attention/2026-11-29T23/), but under GQA
#: the route repeats K and V for the call (Llama-3-8B at 8192 tokens: 128 MiB in the forward, 256 in
#: the backward), so it waits for an end-to-end measurement before it is the default there.
HEAD_DIMS = {"1": (256,), "all": (64, 80, 96, 128, 256), "0": ()}
#: The head dims this process sends to cuDNN, from `LOWMEM_CUDNN_ATTENTION` at import ("1", the
#: default; "all"; "0": none, every call takes the Triton kernels).
SERVED_HEAD_DIMS = HEAD_DIMS.get(os.environ.get("LOWMEM_CUDNN_ATTENTION", "1"), HEAD_DIMS["1"])


def serves(q: torch.Tensor, mask: torch.Tensor | None, causal: bool, window: int, softcap: float,
           segments: torch.Tensor | None) -> bool:
    """Whether this call takes the cuDNN route (module docstring); decided from metadata only, so a
    fake tensor's answer is its real tensor's."""
    return (
        q.device.type == "cuda"
        and q.shape[-1] in SERVED_HEAD_DIMS
        and q.dtype in (torch.float16, torch.bfloat16)
        and mask is None
        and not window
        and not softcap
        and segments is None
        and torch.backends.cudnn.is_available()
    )


def repeated_heads(q: torch.Tensor, k: torch.Tensor) -> int:
    """How many times each KV head is repeated for cuDNN (1: none, the heads match)."""
    return q.shape[1] // k.shape[1]


def _for_cudnn(x: torch.Tensor, groups: int) -> torch.Tensor:
    return x if groups == 1 else x.repeat_interleave(groups, dim=1)


def forward(q, k, v, causal: bool, scale: float, kv_bits: int):
    """(out, lse, k_q, k_scale, v_q, v_scale), as `lowmem::attention` defines them."""
    b, hq, sq, _ = q.shape
    if kv_bits == 16:
        packed = kv4.no_codes(k)
    else:
        packed = (*quantize(k, kv_bits, True), *quantize(v, kv_bits, False))
        k, v = dequantize(*packed[:2], kv_bits, q.dtype), dequantize(*packed[2:], kv_bits, q.dtype)
    groups = repeated_heads(q, k)
    out, lse = torch.ops.aten._scaled_dot_product_cudnn_attention(
        q, _for_cudnn(k, groups), _for_cudnn(v, groups), None, True, 0.0, causal, False, scale=scale)[:2]
    return (out.contiguous(), lse.reshape(b, hq, sq), *packed)


def backward(grad_out, q, k_q, k_scale, v_q, v_scale, out, lse, causal: bool, scale: float, kv_bits: int):
    """(dq, dk, dv) from what the forward saved, dk and dv at the KV-head count."""
    b, hq, sq, d = q.shape
    if kv_bits == 16:
        k, v = k_q, v_q
    else:
        k, v = dequantize(k_q, k_scale, kv_bits, q.dtype), dequantize(v_q, v_scale, kv_bits, q.dtype)
    hkv, groups = k.shape[1], repeated_heads(q, k)
    # dropout is off: the seed and offset are read by nothing, but the op takes them
    seed = offset = torch.zeros((), dtype=torch.int64, device=q.device)
    dq, dk, dv = torch.ops.aten._scaled_dot_product_cudnn_attention_backward(
        grad_out.contiguous(), q, _for_cudnn(k, groups), _for_cudnn(v, groups), out, lse.reshape(b, hq, sq, 1),
        seed, offset, None, None, None, sq, k.shape[2], 0.0, causal, scale=scale)
    if groups > 1:  # summed in fp32, as the Triton kernels sum a group in registers
        dk = dk.reshape(b, hkv, groups, k.shape[2], d).sum(2, dtype=torch.float32).to(q.dtype)
        dv = dv.reshape(b, hkv, groups, k.shape[2], d).sum(2, dtype=torch.float32).to(q.dtype)
    return dq.contiguous(), dk.contiguous(), dv.contiguous()
