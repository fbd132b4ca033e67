"""Fused LM head + cross-entropy on CUDA: loss and its gradients, chunk by chunk over tokens.

For each chunk of C tokens (rows of the flattened hidden states h [N, H], head W [V, H], bias b):

    z     = h_c @ W.T + b                        (cuBLAS, into one reused [C, V] buffer, model dtype)
    z'    = cap * tanh(z / cap)                  (only with logit softcapping)
    lse   = log sum_v exp(z'_v)                  (Triton, online over blocks of the vocabulary)
    loss += sum_rows (lse - z'_label)            (rows whose label is ignore_index add 0)
    g     = (softmax(z') - onehot(label)) * s * (1 - (z'/cap)^2)   (in place of z, model dtype)
    dh_c  = g @ W;  dW += g.T @ h_c;  db += sum_rows g            (cuBLAS)

with s = 1/(number of labelled tokens) for "mean" and 1 for "sum". The gradients are those of the
loss with respect to its output being 1; the autograd formula in `ops/linear_cross_entropy.py`
scales them by the incoming gradient. The matmuls stay in cuBLAS (they are compute-bound and cuBLAS
is at peak); the Triton kernel is the memory-bound part that stock PyTorch runs as several fp32
passes over [N, V]: it reads the bf16 logits chunk twice and writes the gradient over it once.

Bytes: stock keeps the [N, V] logits in the model dtype, their fp32 copy and the fp32 log-softmax
(2 + 4 + 4 bytes per logit; 10 GiB at N = 8192, V = 128256). This keeps one [C, V] buffer in the
model dtype (C * V * 2 bytes; 125 MiB at C = 512, V = 128256), the [N, H] gradient of the hidden
states, and the [V, H] gradient of the head only when the head is trained.

Shapes: hidden [N, H] and weight [V, H] of one floating dtype (fp16, bf16, fp32), labels [N] int64,
bias [V] or None. The launcher also runs on CPU tensors under TRITON_INTERPRET=1 (tests).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _capped(x, cap, SOFTCAP: tl.constexpr):
    """cap * tanh(x / cap), with tanh written through exp (overflow gives the right limit, +-cap)."""
    if SOFTCAP:
        x = cap * (1.0 - 2.0 / (tl.exp(2.0 * x / cap) + 1.0))
    return x


@triton.jit
def _ce_rows_kernel(
    z_ptr,
    stride_zn,
    labels_ptr,
    row_loss_ptr,
    logits_ptr,
    stride_ln,
    scale_ptr,
    V,
    ignore_index,
    cap,
    SOFTCAP: tl.constexpr,
    STORE_LOGITS: tl.constexpr,
    WRITE_GRAD: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    """One program per token: log-sum-exp over the vocabulary, the token's loss, and (WRITE_GRAD)
    the gradient of the logits written over the logits themselves."""
    row = tl.program_id(0).to(tl.int64)
    z_row = z_ptr + row * stride_zn
    label = tl.load(labels_ptr + row)
    ignored = label == ignore_index

    m = float("-inf")
    d = 0.0
    for start in range(0, V, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        mask = cols < V
        x = _capped(tl.load(z_row + cols, mask=mask, other=0.0).to(tl.float32), cap, SOFTCAP)
        if STORE_LOGITS:
            tl.store(logits_ptr + row * stride_ln + cols, x.to(logits_ptr.dtype.element_ty), mask=mask)
        x = tl.where(mask, x, float("-inf"))
        m_new = tl.maximum(m, tl.max(x, 0))
        d = d * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), 0)
        m = m_new
    lse = m + tl.log(d)

    safe_label = tl.where(ignored, 0, label)
    target = _capped(tl.load(z_row + safe_label).to(tl.float32), cap, SOFTCAP)
    tl.store(row_loss_ptr + row, tl.where(ignored, 0.0, lse - target))

    if WRITE_GRAD:
        scale = tl.where(ignored, 0.0, tl.load(scale_ptr))
        for start in range(0, V, BLOCK_V):
            cols = start + tl.arange(0, BLOCK_V)
            mask = cols < V
            x = _capped(tl.load(z_row + cols, mask=mask, other=0.0).to(tl.float32), cap, SOFTCAP)
            g = tl.exp(x - lse) - tl.where(cols == safe_label, 1.0, 0.0)
            if SOFTCAP:
                g = g * (1.0 - (x / cap) * (x / cap))
            tl.store(z_row + cols, (g * scale).to(z_ptr.dtype.element_ty), mask=mask)


def _block_v(vocab: int) -> int:
    """Wide enough to stream the row in few iterations, small enough for registers in fp32."""
    return min(4096, triton.next_power_of_2(vocab))


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    labels: torch.Tensor,
    ignore_index: int,
    reduction: str,
    softcap: float | None,
    chunk_tokens: int,
    grad_hidden: bool,
    grad_weight: bool,
    grad_bias: bool,
    return_logits: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Loss (fp32, 0-d), logits [..., V] or empty, and the requested gradients (the others empty).

    Arguments are checked by the op (`ops/linear_cross_entropy.py`) before this runs.
    """
    vocab, width = weight.shape
    h = hidden.reshape(-1, width)
    tokens = h.shape[0]
    if not h.is_contiguous():
        h = h.contiguous()
    labels = labels.contiguous()
    write_grad = grad_hidden or grad_weight or grad_bias

    if reduction == "mean":
        scale = 1.0 / (labels != ignore_index).sum(dtype=torch.float32)
    else:
        scale = torch.ones((), dtype=torch.float32, device=h.device)

    chunk = max(1, min(chunk_tokens, tokens))
    block_v = _block_v(vocab)
    z_buf = h.new_empty(chunk, vocab)
    row_loss = torch.empty(chunk, dtype=torch.float32, device=h.device)
    loss_sum = torch.zeros((), dtype=torch.float32, device=h.device)
    logits = h.new_empty(tokens, vocab) if return_logits else h.new_empty(0)
    dh = torch.empty_like(h) if grad_hidden else h.new_empty(0)
    dw = torch.zeros_like(weight) if grad_weight else h.new_empty(0)
    db = torch.zeros(vocab, dtype=torch.float32, device=h.device) if grad_bias else h.new_empty(0)

    for start in range(0, tokens, chunk):
        end = min(start + chunk, tokens)
        h_c, z = h[start:end], z_buf[: end - start]
        if bias is None:
            torch.mm(h_c, weight.t(), out=z)
        else:
            torch.addmm(bias, h_c, weight.t(), out=z)
        logits_c = logits[start:end] if return_logits else z
        _ce_rows_kernel[(end - start,)](
            z,
            z.stride(0),
            labels[start:end],
            row_loss,
            logits_c,
            logits_c.stride(0),
            scale,
            vocab,
            ignore_index,
            1.0 if softcap is None else float(softcap),
            SOFTCAP=softcap is not None,
            STORE_LOGITS=return_logits,
            WRITE_GRAD=write_grad,
            BLOCK_V=block_v,
            num_warps=8 if block_v >= 2048 else 4,
        )
        loss_sum += row_loss[: end - start].sum()
        if grad_hidden:
            torch.mm(z, weight, out=dh[start:end])
        if grad_weight:
            dw.addmm_(z.t(), h_c)
        if grad_bias:
            db += z.sum(0, dtype=torch.float32)

    loss = loss_sum * scale
    if return_logits:
        logits = logits.view(*hidden.shape[:-1], vocab)
    if grad_hidden:
        dh = dh.view(hidden.shape)
    if grad_bias:
        db = db.to(bias.dtype)
    return loss, logits, dh, dw, db
