"""`lowmem::linear_cross_entropy`: the LM head projection fused with cross-entropy.

    (loss, logits, grad_hidden, grad_weight, grad_bias) = linear_cross_entropy(
        hidden [..., H], weight [V, H], bias [V]?, labels [N], ignore_index, reduction, softcap?,
        chunk_tokens, grad_hidden, grad_weight, grad_bias, return_logits)

computes `cross_entropy(softcap(hidden @ weight.T + bias).float().view(-1, V), labels)` with
`reduction` "mean" or "sum", chunk by chunk over the N tokens, so that only one [chunk_tokens, V]
block of logits exists at a time and nothing of size [N, V] is kept for the backward.

Autograd, decided by time: the forward computes the gradients too, chunk by chunk, while each
chunk's logits are at hand, and the op returns them (only those its flags ask for; the others are
empty). The backward only scales them by the incoming gradient. That is two matmuls over the
vocabulary per chunk (logits, then grad_hidden), the same as stock forward+backward, where
recomputing the logits in the backward would add a third. Memory kept from forward to backward:
grad_hidden ([N, H], the size of the hidden states) and, for a trained head, grad_weight ([V, H],
the size of the head, which its `.grad` will be anyway); never a [N, V] tensor.

`logits` (model dtype, softcapped like the model returns them) is filled only with `return_logits`;
it is not differentiable: a loss on the returned logits must not be fused (the pass checks that no
other in-graph user reads them). The flags come from what requires grad at trace time; asking the
backward for a gradient that the forward did not compute raises instead of returning a wrong one.

The reference below is the specification (fp32 per chunk); CUDA runs the Triton kernel of
`codegen/linear_cross_entropy.py`.
"""

from __future__ import annotations

import torch

from .library import define_op

#: Bytes of the one [chunk, V] logits block the op holds at a time; sets the chunk size.
LOGITS_CHUNK_BYTES = 128 * 2**20

_REDUCTIONS = ("mean", "sum")


def choose_chunk_tokens(vocab: int, itemsize: int, budget_bytes: int | None = None) -> int:
    """Tokens per chunk: the largest multiple of 16 (matmul tile friendly) whose logits fit the
    budget (default :data:`LOGITS_CHUNK_BYTES`); 512 for a 128256 vocabulary in bf16."""
    budget = LOGITS_CHUNK_BYTES if budget_bytes is None else budget_bytes
    return max(16, budget // (vocab * itemsize) // 16 * 16)


def _check(hidden, weight, bias, labels, ignore_index, reduction, softcap, chunk_tokens) -> None:
    name = "linear_cross_entropy"
    if weight.dim() != 2:
        raise ValueError(f"{name}: weight must be [vocab, hidden], got shape {tuple(weight.shape)}")
    if hidden.dim() < 1:
        raise ValueError(f"{name}: hidden must have a last dimension of size {weight.shape[1]}")
    torch._check(
        hidden.shape[-1] == weight.shape[1],
        lambda: f"{name}: hidden {tuple(hidden.shape)} does not match weight {tuple(weight.shape)}",
    )
    if hidden.dtype != weight.dtype or hidden.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"{name}: hidden and weight must share a dtype in fp16/bf16/fp32, got {hidden.dtype}, {weight.dtype}")
    if bias is not None:
        if bias.dim() != 1 or bias.dtype != weight.dtype:
            raise ValueError(f"{name}: bias must be [vocab] of the weight's dtype, got {tuple(bias.shape)} {bias.dtype}")
        torch._check(bias.shape[0] == weight.shape[0], lambda: f"{name}: bias {tuple(bias.shape)} vs vocab {weight.shape[0]}")
    if labels.dim() != 1 or labels.dtype != torch.int64:
        raise ValueError(f"{name}: labels must be 1-D int64, got shape {tuple(labels.shape)} {labels.dtype}")
    torch._check(
        labels.shape[0] == hidden.numel() // weight.shape[1],
        lambda: f"{name}: {labels.shape[0]} labels for {hidden.numel() // weight.shape[1]} tokens",
    )
    if reduction not in _REDUCTIONS:
        raise ValueError(f"{name}: reduction={reduction!r} is not supported; choose one of {list(_REDUCTIONS)}")
    if softcap is not None and not softcap > 0:
        raise ValueError(f"{name}: softcap={softcap!r} must be positive or None")
    if chunk_tokens < 1:
        raise ValueError(f"{name}: chunk_tokens={chunk_tokens} must be positive")


def _check_labels(labels: torch.Tensor, vocab: int, ignore_index: int) -> None:
    """Out-of-range labels: a clear error here rather than garbage. While a CUDA graph is captured
    the host cannot read the flag, so the check becomes a device-side assertion with the same message
    (it stops the process where a wrong label reaches a replay)."""
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= vocab))
    if labels.is_cuda and torch.cuda.is_current_stream_capturing():
        torch._assert_async(~bad.any(), f"linear_cross_entropy: a label is outside [0, {vocab}) and is not "
                                        f"ignore_index={ignore_index}")
        return
    if bool(bad.any()):
        value = labels[bad][0].item()
        raise ValueError(f"linear_cross_entropy: label {value} is outside [0, {vocab}) and is not ignore_index={ignore_index}")


def _reference(hidden, weight, bias, labels, ignore_index, reduction, softcap, chunk_tokens,
               grad_hidden, grad_weight, grad_bias, return_logits):  # fmt: skip
    _check(hidden, weight, bias, labels, ignore_index, reduction, softcap, chunk_tokens)
    vocab, width = weight.shape
    _check_labels(labels, vocab, ignore_index)
    h = hidden.reshape(-1, width)
    valid = labels != ignore_index
    safe = torch.where(valid, labels, 0)
    scale = 1.0 / valid.sum(dtype=torch.float32) if reduction == "mean" else torch.ones((), device=h.device)
    loss = torch.zeros((), dtype=torch.float32, device=h.device)
    logits, dh = [], []
    dw = torch.zeros_like(weight) if grad_weight else hidden.new_empty(0)
    db = torch.zeros(vocab, dtype=torch.float32, device=h.device) if grad_bias else hidden.new_empty(0)
    for start in range(0, h.shape[0], chunk_tokens):
        h_c, y, ok = h[start : start + chunk_tokens], safe[start : start + chunk_tokens], valid[start : start + chunk_tokens]
        z = torch.nn.functional.linear(h_c, weight, bias).float()  # logits rounded to the model dtype, as stock
        if softcap is not None:
            z = softcap * torch.tanh(z / softcap)
        if return_logits:
            logits.append(z.to(h.dtype))
        lse = torch.logsumexp(z, dim=-1)
        loss += torch.where(ok, lse - z.gather(1, y[:, None])[:, 0], 0.0).sum()
        if grad_hidden or grad_weight or grad_bias:
            g = torch.exp(z - lse[:, None])
            g[torch.arange(len(y), device=g.device), y] -= 1.0
            if softcap is not None:
                g *= 1.0 - (z / softcap) ** 2
            g = (g * (scale * ok)[:, None]).to(h.dtype)
            if grad_hidden:
                dh.append(g @ weight)
            if grad_weight:
                dw.addmm_(g.t(), h_c)
            if grad_bias:
                db += g.sum(0, dtype=torch.float32)
    out_logits = torch.cat(logits).view(*hidden.shape[:-1], vocab) if return_logits else hidden.new_empty(0)
    out_dh = torch.cat(dh).view(hidden.shape) if grad_hidden else hidden.new_empty(0)
    return loss * scale, out_logits, out_dh, dw, db.to(bias.dtype) if grad_bias else db


def _cuda(hidden, weight, bias, labels, ignore_index, reduction, softcap, chunk_tokens,
          grad_hidden, grad_weight, grad_bias, return_logits):  # fmt: skip
    from ..codegen.linear_cross_entropy import linear_cross_entropy as launch

    _check(hidden, weight, bias, labels, ignore_index, reduction, softcap, chunk_tokens)
    _check_labels(labels, weight.shape[0], ignore_index)
    return launch(hidden, weight, bias, labels, ignore_index, reduction, softcap, chunk_tokens,
                  grad_hidden, grad_weight, grad_bias, return_logits)  # fmt: skip


def _fake(hidden, weight, bias, labels, ignore_index, reduction, softcap, chunk_tokens,
          grad_hidden, grad_weight, grad_bias, return_logits):  # fmt: skip
    _check(hidden, weight, bias, labels, ignore_index, reduction, softcap, chunk_tokens)
    return (
        hidden.new_empty((), dtype=torch.float32),
        hidden.new_empty((*hidden.shape[:-1], weight.shape[0])) if return_logits else hidden.new_empty(0),
        torch.empty_like(hidden) if grad_hidden else hidden.new_empty(0),
        torch.empty_like(weight) if grad_weight else hidden.new_empty(0),
        torch.empty_like(bias) if grad_bias else hidden.new_empty(0),
    )


def _workspace(hidden, weight, bias, labels, ignore_index, reduction, softcap, chunk_tokens,
               grad_hidden, grad_weight, grad_bias, return_logits):  # fmt: skip
    """One chunk's logits (in the hidden dtype, overwritten by their gradient) and its row losses."""
    chunk = torch.sym_max(1, torch.sym_min(chunk_tokens, hidden.numel() // weight.shape[1]))
    return [hidden.new_empty((chunk, weight.shape[0])), hidden.new_empty((chunk,), dtype=torch.float32)]


def _setup_context(ctx, inputs, output):
    _, logits, dh, dw, db = output
    ctx.mark_non_differentiable(logits, dh, dw, db)
    ctx.save_for_backward(dh, dw, db)
    ctx.computed = inputs[8:11]


def _backward(ctx, grad_loss, *_):
    grads = []
    for name, needed, computed, g in zip(("hidden", "weight", "bias"), ctx.needs_input_grad[:3], ctx.computed, ctx.saved_tensors):
        if needed and not computed:
            raise RuntimeError(
                f"linear_cross_entropy: the gradient of {name} is needed but the forward ran with "
                f"grad_{name}=False; pass grad_{name}=True when {name} requires grad"
            )
        grads.append(g * grad_loss.to(g.dtype) if needed else None)
    return (*grads, *([None] * 9))


linear_cross_entropy = define_op(
    "linear_cross_entropy",
    "(Tensor hidden, Tensor weight, Tensor? bias, Tensor labels, int ignore_index, str reduction, "
    "float? softcap, int chunk_tokens, bool grad_hidden, bool grad_weight, bool grad_bias, bool return_logits) "
    "-> (Tensor, Tensor, Tensor, Tensor, Tensor)",
    reference=_reference,
    fake=_fake,
    cuda=_cuda,
    backward=_backward,
    setup_context=_setup_context,
    workspace=_workspace,
)


def fused_linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    ignore_index: int = -100,
    reduction: str = "mean",
    softcap: float | None = None,
    chunk_tokens: int | None = None,
) -> torch.Tensor:
    """`F.cross_entropy(F.linear(hidden, weight, bias).float().view(-1, V), labels.view(-1))` in
    bounded memory, differentiable in hidden, weight and bias (what requires grad now)."""
    grad = torch.is_grad_enabled()
    if chunk_tokens is None:
        chunk_tokens = choose_chunk_tokens(weight.shape[0], hidden.element_size())
    loss, *_ = linear_cross_entropy(
        hidden, weight, bias, labels.reshape(-1), ignore_index, reduction, softcap, chunk_tokens,
        grad and hidden.requires_grad, grad and weight.requires_grad,
        grad and bias is not None and bias.requires_grad, False,
    )  # fmt: skip
    return loss
