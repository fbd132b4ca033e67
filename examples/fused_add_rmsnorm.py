"""A user pass, worked end to end: the residual add fused with the RMSNorm that reads it.

A Llama-style decoder layer computes, after attention,

    s = residual + attn_out                                      (the new residual stream)
    y = w * (s / sqrt(mean(s², -1) + eps)).to(dtype)             (RMSNorm, in fp32, as HF does)

as seven graph nodes around a reduction. `lowmem_examples::add_rmsnorm(x, residual, w, eps) -> (y, s)`
computes both in one pass over each row: one read of x, residual and w, one write of y and s, where
the unfused chain writes s and reads it back (2·T·H·itemsize bytes less traffic at T tokens, hidden
H). Its backward is plain PyTorch, traced into the graph, where Inductor fuses it; it keeps only s
and w (s is the residual stream, live anyway), recomputing the row's 1/rms from s.

The pieces, in the order a researcher writes them:

1. the Triton kernel and its launcher (CUDA; on the CPU Triton's interpreter runs it in tests);
2. the reference in PyTorch: the specification, and the implementation off CUDA;
3. the op, through `lowmem_compile.define_op`, with the cost the memory planner reads (without
   `flops`/`bytes_moved` the planner would never recompute it);
4. the pass, a `lowmem_compile.GraphPass` that finds the pattern in the Dynamo graph;
5. a check against eager (`python examples/fused_add_rmsnorm.py`), and its tests in
   tests/test_user_passes.py.

Use it:

    model = torch.compile(model, backend="lowmem", options={"passes": [FusedAddRMSNorm()]})
    # or by import string, e.g. from the benchmark (the repository root on sys.path):
    python bench/e2e.py --configs lowmem,lowmem_rms \\
        --lowmem 'lowmem_rms={"passes": ["examples.fused_add_rmsnorm:FusedAddRMSNorm"]}'

Where it applies: an add of two same-shaped tensors feeding HF's Llama RMSNorm (Llama, Mistral,
Qwen 2: `.to(float32)`, `pow(2).mean(-1, keepdim=True)`, `+ eps`, `rsqrt`, `*`, `.to(dtype)`,
`weight *`) inside one decoder layer: the post-attention norm. The add before a layer's input norm
is the previous layer's last node, and fusing across layers would move a layer boundary (the layer
split compiles one body for all layers); those sites, the final norm and Gemma's `(1 + w)` norm are
skipped, with the reason, in the report.
"""

from __future__ import annotations

import operator
import os
import sys

import torch
import triton
import triton.language as tl

import lowmem_compile

# ------------------------------------------------------------------------------------------ kernel


@triton.jit
def _add_rmsnorm_kernel(X, R, W, Y, S, stride_x, stride_r, stride_y, stride_s, N, eps, BLOCK_N: tl.constexpr):
    """One row per program: s = x + r (rounded to the input dtype, as the eager add is), then
    y = w · (s · rsqrt(mean(s²) + eps)) with the statistics in fp32."""
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
    ok = cols < N
    x = tl.load(X + row * stride_x + cols, mask=ok, other=0.0).to(tl.float32)
    r = tl.load(R + row * stride_r + cols, mask=ok, other=0.0).to(tl.float32)
    s = (x + r).to(S.dtype.element_ty)
    tl.store(S + row * stride_s + cols, s, mask=ok)
    sf = s.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(sf * sf, axis=0) / N + eps)
    normed = (sf * rstd).to(S.dtype.element_ty).to(tl.float32)
    w = tl.load(W + cols, mask=ok, other=0.0).to(tl.float32)
    tl.store(Y + row * stride_y + cols, (w * normed).to(Y.dtype.element_ty), mask=ok)


def add_rmsnorm_triton(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float):
    """Launch the kernel on [..., N] inputs of one dtype and a [N] weight; returns fresh (y, s)."""
    if x.shape != residual.shape or x.dtype != residual.dtype or weight.shape != x.shape[-1:]:
        raise ValueError(f"add_rmsnorm: x {tuple(x.shape)} {x.dtype}, residual {tuple(residual.shape)} "
                         f"{residual.dtype} and weight {tuple(weight.shape)} do not fit")
    n = x.shape[-1]
    x2, r2 = x.reshape(-1, n).contiguous(), residual.reshape(-1, n).contiguous()
    y = torch.empty(x2.shape, dtype=torch.promote_types(weight.dtype, x.dtype), device=x.device)
    s = torch.empty_like(x2)
    if x2.shape[0]:
        _add_rmsnorm_kernel[(x2.shape[0],)](
            x2, r2, weight.contiguous(), y, s, x2.stride(0), r2.stride(0), y.stride(0), s.stride(0),
            n, eps, BLOCK_N=triton.next_power_of_2(n),
        )  # fmt: skip
    return y.view(x.shape), s.view(x.shape)


# --------------------------------------------------------------------------------------- reference


def add_rmsnorm_reference(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float):
    """The specification: what HF's `residual + h` then `LlamaRMSNorm` compute, op for op."""
    s = x + residual
    sf = s.to(torch.float32)
    normed = sf * torch.rsqrt(sf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * normed.to(x.dtype), s


# -------------------------------------------------------------------------------------------- op


def _fake(x, residual, weight, eps):
    return x.new_empty(x.shape, dtype=torch.promote_types(weight.dtype, x.dtype)), torch.empty_like(x)


def _setup_context(ctx, inputs, output):
    _, _, weight, eps = inputs
    ctx.save_for_backward(output[1], weight)
    ctx.eps = eps


def _backward(ctx, grad_y, grad_s):
    """d/ds of the norm (fp32), plus the gradient reaching s from its other readers; x and the
    residual both get it. Plain PyTorch: traced into the backward graph and fused there."""
    s, weight = ctx.saved_tensors
    sf = s.to(torch.float32)
    rstd = torch.rsqrt(sf.pow(2).mean(-1, keepdim=True) + ctx.eps)
    normed = sf * rstd
    grad_w = None
    if ctx.needs_input_grad[2]:
        grad_w = (grad_y * normed.to(s.dtype)).reshape(-1, s.shape[-1]).sum(0).to(weight.dtype)
    g = (grad_y * weight).to(torch.float32)
    grad = (rstd * (g - normed * (g * normed).mean(-1, keepdim=True))).to(s.dtype)
    if grad_s is not None:
        grad = grad + grad_s
    return grad, grad, grad_w, None


def _bytes_moved(x, residual, weight, eps):
    """One read of x, residual and w; one write of y and s."""
    return 4 * x.numel() * x.element_size() + weight.numel() * weight.element_size()


add_rmsnorm = lowmem_compile.define_op(
    "lowmem_examples::add_rmsnorm",
    "(Tensor x, Tensor residual, Tensor weight, float eps) -> (Tensor, Tensor)",
    reference=add_rmsnorm_reference,
    fake=_fake,
    cuda=add_rmsnorm_triton,
    backward=_backward,
    setup_context=_setup_context,
    flops=lambda x, residual, weight, eps: 6 * x.numel(),  # add, square, sum, scale, cast, weight
    bytes_moved=_bytes_moved,
)


# ------------------------------------------------------------------------------------------ pass


class _Skip(Exception):
    """A norm site the op does not compute exactly; the message is the report's reason."""


def _is(node, function=None, method=None) -> bool:
    return isinstance(node, torch.fx.Node) and (
        (node.op == "call_function" and node.target in function if function else False)
        or (node.op == "call_method" and node.target == method)
    )


def _only_user(node) -> torch.fx.Node:
    if len(node.users) != 1:
        raise _Skip(f"{node.name} has {len(node.users)} readers (the fused op would drop them)")
    return next(iter(node.users))


def _other(node, one) -> object:
    """The operand of binary `node` that is not `one`."""
    a, b = node.args
    return b if a is one else a


class FusedAddRMSNorm(lowmem_compile.GraphPass):
    """Rewrite `y = rmsnorm(a + b)` (HF's Llama RMSNorm) into one `add_rmsnorm` call per site.

    Walks from each `rsqrt` outwards; every node of the norm's chain must have the one reader the
    pattern gives it (the add may have more: the residual stream). Counts the sites fused and the
    ones skipped, with their reason."""

    name = "fused_add_rmsnorm"

    def __call__(self, gm: torch.fx.GraphModule, ctx: lowmem_compile.CompileContext) -> dict:
        fused, skipped = 0, []
        for node in ctx.nodes(gm):
            if not _is(node, (torch.rsqrt,), "rsqrt"):
                continue
            try:
                site = self._match(node, ctx)
            except _Skip as why:
                skipped.append(f"norm at {node.name}: {why}")
                continue
            self._rewrite(gm.graph, site, ctx)
            fused += 1
        return {"fused": fused, "skipped": skipped}

    def _match(self, rsqrt: torch.fx.Node, ctx) -> dict:
        eps_add = rsqrt.args[0]
        if not _is(eps_add, (operator.add, torch.add), "add") or not isinstance(eps_add.args[1], float):
            raise _Skip("rsqrt does not read mean + eps")
        mean = eps_add.args[0]
        if not _is(mean, (torch.mean,), "mean") or not mean.kwargs.get("keepdim") \
                or tuple(mean.args[1:] or (mean.kwargs.get("dim"),)) not in ((-1,), ([-1],)):
            raise _Skip("not a mean over the last dimension with keepdim")
        square = mean.args[0]
        if not _is(square, (torch.pow, operator.pow), "pow") or square.args[1] != 2:
            raise _Skip("not a mean of squares")
        upcast = square.args[0]
        scale = _only_user(rsqrt)
        if not _is(scale, (operator.mul, torch.mul), "mul") or _other(scale, rsqrt) is not upcast:
            raise _Skip("the rsqrt does not scale the norm's input")
        if not _is(upcast, None, "to") or upcast.args[1:] != (torch.float32,) or set(upcast.users) != {square, scale}:
            raise _Skip("the norm's input is not upcast to fp32 for the mean and the scale alone")
        for node in (square, mean, eps_add):
            _only_user(node)
        total = upcast.args[0]
        downcast = _only_user(scale)
        value = ctx.example_value(total)
        if not _is(downcast, None, "to") or downcast.args[1:] != (value.dtype,):
            raise _Skip("the normalized value is not cast back to the input's dtype")
        out = _only_user(downcast)
        weight = _other(out, downcast) if _is(out, (operator.mul, torch.mul), "mul") else None
        w = ctx.example_value(weight)
        if w is None or tuple(w.shape) != tuple(value.shape[-1:]):
            raise _Skip("not `weight * normalized` with a weight of the hidden size (Gemma's 1 + w is not this op)")
        if not _is(total, (operator.add, torch.add), "add") or len(total.args) != 2 or total.kwargs:
            raise _Skip("the norm's input is not an add")
        parts = [ctx.example_value(a) for a in total.args]
        if any(p is None or p.shape != value.shape or p.dtype != value.dtype for p in parts):
            raise _Skip("the add broadcasts or mixes dtypes")
        if ctx.layer_of(total) is None or ctx.layer_of(total) != ctx.layer_of(rsqrt):
            raise _Skip(f"the add is in {ctx.layer_of(total) or 'no layer'}, the norm in "
                        f"{ctx.layer_of(rsqrt) or 'no layer'}: fusing across layers would move a layer boundary")
        order = {n: i for i, n in enumerate(total.graph.nodes)}
        if order[weight] > order[total]:
            raise _Skip("the weight is computed after the add")
        chain = [out, downcast, scale, rsqrt, eps_add, mean, square, upcast]
        return dict(total=total, out=out, weight=weight, eps=eps_add.args[1], chain=chain, norm=rsqrt)

    def _rewrite(self, graph: torch.fx.Graph, site: dict, ctx) -> None:
        total = site["total"]
        with graph.inserting_after(total):
            op = graph.call_function(add_rmsnorm.default, (*total.args, site["weight"], site["eps"]))
        with graph.inserting_after(op):
            new_total = graph.call_function(operator.getitem, (op, 1))
            new_out = graph.call_function(operator.getitem, (op, 0))
        for node in (op, new_total, new_out):
            ctx.propagate(node)  # fake example values, as Dynamo's own nodes carry
        ctx.inherit_provenance(site["norm"], op, new_out)
        ctx.inherit_provenance(total, new_total)
        site["out"].replace_all_uses_with(new_out)
        total.replace_all_uses_with(new_total)
        for node in site["chain"]:
            graph.erase_node(node)
        graph.erase_node(total)


# ----------------------------------------------------------------------------------------- check


def _check() -> None:
    """A tiny random Llama with LoRA, compiled with the pass, against eager: loss and gradients."""
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
    from tests.models import batch, rel_err, tiny_model, trainable_grads, twin

    model = tiny_model("llama")
    ref = twin(model)
    data = batch()
    ref(**data).loss.backward()
    compiled = torch.compile(model, backend="lowmem", options={"inner": "eager", "passes": [FusedAddRMSNorm()]})
    loss = compiled(**data).loss
    loss.backward()
    errors = {k: rel_err(g, trainable_grads(ref)[k]) for k, g in trainable_grads(model).items()}
    print(lowmem_compile.last_report())
    print(f"loss {loss.item():.6f} (eager {ref(**data).loss.item():.6f}); worst gradient error "
          f"{max(errors.values()):.2e} ({max(errors, key=errors.get)})")


if __name__ == "__main__":
    _check()
