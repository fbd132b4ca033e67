"""`lowmem::linear_cross_entropy`: the reference against eager cross-entropy in float64, the Triton
kernel (interpreter on CPU, fp16/fp32) against the reference, autograd, and errors.

Tolerances: fp32 inputs, fp64 eager: 1e-5 relative (fp32 log-sum-exp over chunks). Kernel vs
reference: the loss and fp32 gradients 1e-5; fp16 gradients 2e-3 (one fp16 rounding of exp in a
different order)."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from lowmem_compile.ops.linear_cross_entropy import (
    choose_chunk_tokens,
    fused_linear_cross_entropy,
    linear_cross_entropy,
)

from .models import rel_err

SHAPES = st.tuples(st.integers(1, 40), st.integers(1, 24), st.integers(2, 300), st.integers(1, 48))


def _inputs(n, h, v, dtype=torch.float32, seed=0, ignore_every=5, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g).to(dtype=dtype, device=device)
    weight = (torch.randn(v, h, generator=g) / h**0.5).to(dtype=dtype, device=device)
    bias = torch.randn(v, generator=g).to(dtype=dtype, device=device)
    labels = torch.randint(0, v, (n,), generator=g)
    labels[::ignore_every] = -100
    labels[-1] = v - 1  # at least one labelled token, and the last class
    return hidden, weight, bias, labels.to(device)


def _eager64(hidden, weight, bias, labels, reduction, softcap):
    return _eager64_logits(F.linear(hidden, weight, bias).double(), labels, reduction, softcap)


def _summand_scales(hidden, weight, bias, labels, reduction, softcap):
    """Per gradient, the float64 sum of the magnitudes of the terms it adds up: |dL/dlogits| through
    |W| and |h|. An fp32 sum of V or N terms errs by ~1e-7 of that, whatever the sum itself: where
    the terms cancel (one token, one hidden unit) the gradient can be far smaller than its terms."""
    z = F.linear(hidden.detach(), weight.detach(), None if bias is None else bias.detach()).double().requires_grad_()
    _eager64_logits(z, labels, reduction, softcap).backward()
    dz = z.grad.abs()
    scales = [dz @ weight.detach().double().abs(), dz.T @ hidden.detach().double().abs()]
    return scales + ([dz.sum(0)] if bias is not None else [])


def _eager64_logits(z, labels, reduction, softcap):
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    return F.cross_entropy(z, labels, ignore_index=-100, reduction=reduction)


@settings(max_examples=25, deadline=None)
@given(shape=SHAPES, reduction=st.sampled_from(["mean", "sum"]), softcap=st.sampled_from([None, 3.0]), use_bias=st.booleans())
def test_reference_matches_eager_float64(shape, reduction, softcap, use_bias):
    n, h, v, chunk = shape
    hidden, weight, bias, labels = _inputs(n, h, v)
    bias = bias if use_bias else None
    leaves = [t.double().requires_grad_() for t in (hidden, weight) + ((bias,) if use_bias else ())]
    expected = _eager64(leaves[0], leaves[1], leaves[2] if use_bias else None, labels, reduction, softcap)
    expected.backward()
    params = [t.clone().requires_grad_() for t in (hidden, weight) + ((bias,) if use_bias else ())]
    got = fused_linear_cross_entropy(
        params[0], params[1], labels, params[2] if use_bias else None, reduction=reduction, softcap=softcap, chunk_tokens=chunk
    )
    got.backward()
    assert rel_err(got, expected) < 1e-5
    scales = _summand_scales(*leaves[:2], leaves[2] if use_bias else None, labels, reduction, softcap)
    for p, e, scale in zip(params, leaves, scales):
        # 1e-5 of the gradient, or 1e-6 of its summands where they cancel
        assert (p.grad.double() - e.grad).norm() <= 1e-5 * e.grad.norm() + 1e-6 * scale.norm()


@settings(max_examples=12, deadline=None)
@given(
    shape=SHAPES,
    dtype=st.sampled_from([torch.float32, torch.float16]),
    reduction=st.sampled_from(["mean", "sum"]),
    softcap=st.sampled_from([None, 3.0]),
    use_bias=st.booleans(),
    return_logits=st.booleans(),
)
def test_triton_kernel_matches_reference(shape, dtype, reduction, softcap, use_bias, return_logits):
    from lowmem_compile.codegen.linear_cross_entropy import linear_cross_entropy as launch

    n, h, v, chunk = shape
    hidden, weight, bias, labels = _inputs(n, h, v, dtype)
    args = (hidden, weight, bias if use_bias else None, labels, -100, reduction, softcap, chunk, True, True, use_bias, return_logits)
    expected = linear_cross_entropy(*args)
    got = launch(*args)
    grad_tol = 1e-5 if dtype == torch.float32 else 2e-3
    # logits: fp32 h·Wᵀ (+ b, softcap) in another summation order: 1e-6 in fp32; in fp16 one rounding
    # of the output (2^-11 relative at most, ~3e-4 RMS)
    logits_tol = 1e-6 if dtype == torch.float32 else 1e-3
    assert got[0].dtype == torch.float32 and rel_err(got[0], expected[0]) < 1e-5
    for name, a, b, tol in zip(("logits", "hidden", "weight", "bias"), got[1:], expected[1:], (logits_tol, *[grad_tol] * 3)):
        assert a.shape == b.shape and a.dtype == b.dtype, name
        if b.numel():
            assert rel_err(a, b) < tol, name


def test_autograd_scales_by_incoming_gradient_and_keeps_no_logits():
    hidden, weight, bias, labels = _inputs(33, 16, 97)
    hidden.requires_grad_(), weight.requires_grad_()
    (fused_linear_cross_entropy(hidden, weight, labels, chunk_tokens=8) * 3.0).backward()
    expected_h, expected_w = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    F.cross_entropy(F.linear(hidden, weight).double(), labels).mul(3.0).backward()
    assert rel_err(expected_h, hidden.grad) < 1e-5 and rel_err(expected_w, weight.grad) < 1e-5

    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.shape) or t, lambda t: t):
        fused_linear_cross_entropy(hidden, weight, labels, chunk_tokens=8)
    assert all(97 not in shape or shape == weight.shape for shape in saved), saved


def test_returned_logits_are_the_model_logits_and_not_differentiable():
    hidden, weight, bias, labels = _inputs(2 * 7, 8, 50)
    hidden = hidden.view(2, 7, 8).requires_grad_()
    out = linear_cross_entropy(hidden, weight, bias, labels, -100, "mean", 4.0, 5, True, False, False, True)
    assert out[1].shape == (2, 7, 50) and not out[1].requires_grad
    assert rel_err(out[1], 4.0 * torch.tanh(F.linear(hidden, weight, bias) / 4.0)) < 1e-6


def test_gradient_not_computed_in_forward_raises():
    hidden, weight, _, labels = _inputs(9, 8, 20)
    weight.requires_grad_()
    loss, *_ = linear_cross_entropy(hidden, weight, None, labels, -100, "mean", None, 4, False, False, False, False)
    with pytest.raises(RuntimeError, match="grad_weight=False"):
        loss.backward()


@pytest.mark.parametrize(
    "change, match",
    [
        (dict(labels=torch.tensor([0, 1, 20, 3, 4, 5, 6, 7, 8])), "label 20 is outside"),
        (dict(reduction="none"), "reduction='none'"),
        (dict(labels=torch.zeros(8, dtype=torch.long)), "8 labels for 9 tokens"),
        (dict(weight=torch.randn(20, 7)), "does not match weight"),
        (dict(softcap=-1.0), "softcap"),
        (dict(labels=torch.zeros(9, dtype=torch.int32)), "int64"),
    ],
)
def test_bad_inputs_raise_clear_errors(change, match):
    hidden, weight, _, labels = _inputs(9, 8, 20)
    args = dict(hidden=hidden, weight=weight, bias=None, labels=labels, ignore_index=-100, reduction="mean", softcap=None)
    args.update(change)
    with pytest.raises((ValueError, RuntimeError), match=match):
        linear_cross_entropy(*args.values(), 4, False, False, False, False)


def test_chunk_size_fits_the_budget():
    for vocab, itemsize in ((128256, 2), (151936, 2), (256000, 2), (32000, 4)):
        chunk = choose_chunk_tokens(vocab, itemsize)
        assert chunk % 16 == 0 and chunk * vocab * itemsize <= 128 * 2**20
    assert choose_chunk_tokens(128256, 2) == 512


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("softcap", [None, 30.0])
def test_cuda_kernel_matches_reference(dtype, softcap):
    from lowmem_compile.codegen.linear_cross_entropy import linear_cross_entropy as launch

    hidden, weight, bias, labels = _inputs(1000, 256, 32003, dtype, device="cuda")
    args = (hidden, weight, bias, labels, -100, "mean", softcap, 256, True, True, True, True)
    expected = linear_cross_entropy(*[a.cpu() if isinstance(a, torch.Tensor) else a for a in args])
    got = launch(*args)
    assert rel_err(got[0].cpu(), expected[0]) < 1e-4
    for a, b in zip(got[1:], expected[1:]):
        assert rel_err(a.cpu(), b) < 1e-2
