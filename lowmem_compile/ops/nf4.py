"""NF4 ops: `nf4_dequantize` (packed NF4 -> 16-bit weight) and `nf4_linear` (y = x Wᵀ + b with W
stored in NF4) with its backward `nf4_linear_backward` (grad_x = grad_y W).

The absmax is either fp32 (one a block) or double-quantized: uint8 indices into `code2` with one fp32
`absmax2` per 256 blocks and an fp32 `offset`, exactly bitsandbytes' `gemm_4bit` arguments.
The reference implementations (through `formats/nf4.py`) are the specification; on CUDA the Triton
kernels of `codegen/nf4_matmul.py` run instead.

Memory contract of `nf4_linear`: the autograd formula saves only its inputs (the resident packed
weight and its absmax), never a dequantized copy; the backward dequantizes again.
"""

from __future__ import annotations

import math

import torch

from ..formats import nf4 as nf4_format
from .library import define_op

_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def _require(cond, message) -> None:
    """torch._check where `cond` is symbolic (fake tensors while tracing); a plain test otherwise, which
    costs ~0.1 µs instead of ~5 µs: these checks run on every eager call of the CUDA kernels."""
    if isinstance(cond, bool):
        if not cond:
            raise RuntimeError(message())
    else:
        torch._check(cond, message)


def _check_weight(op, packed, absmax, shape, blocksize, absmax2, code2, offset) -> None:
    nf4_format.check_blocksize(blocksize)
    numel = math.prod(shape)
    if packed.dtype != torch.uint8:
        raise ValueError(f"{op}: packed codes must be uint8, got {packed.dtype}")
    _require(packed.numel() == (numel + 1) // 2, lambda: f"{op}: {packed.numel()} packed bytes for shape {shape}")
    _require(
        absmax.numel() == nf4_format.num_blocks(numel, blocksize),
        lambda: f"{op}: {absmax.numel()} absmax values for {numel} elements at blocksize {blocksize}",
    )
    nested = absmax2 is not None
    if nested != (code2 is not None) or nested != (offset is not None):
        raise ValueError(f"{op}: absmax2, code2 and offset come together (double quantization) or not at all")
    if nested and absmax.dtype != torch.uint8:
        raise ValueError(f"{op}: a double-quantized absmax must be uint8, got {absmax.dtype}")
    if not nested and absmax.dtype != torch.float32:
        raise ValueError(f"{op}: absmax must be fp32 (or uint8 with absmax2/code2/offset), got {absmax.dtype}")


def _full_absmax(absmax, absmax2, code2, offset) -> torch.Tensor:
    return nf4_format.expand_absmax(absmax, absmax2, code2, offset)


# --- nf4_dequantize ------------------------------------------------------------------------------


def _dequantize_check(packed, absmax, shape, blocksize, dtype, absmax2, code2, offset) -> None:
    _check_weight("nf4_dequantize", packed, absmax, shape, blocksize, absmax2, code2, offset)
    if dtype not in _DTYPES:
        raise ValueError(f"nf4_dequantize: dtype must be bf16, fp16 or fp32, got {dtype}")


def _dequantize_reference(packed, absmax, shape, blocksize, dtype, absmax2=None, code2=None, offset=None):
    _dequantize_check(packed, absmax, shape, blocksize, dtype, absmax2, code2, offset)
    full = _full_absmax(absmax, absmax2, code2, offset)
    return nf4_format.dequantize(packed, full, tuple(shape), blocksize, dtype)


def _dequantize_fake(packed, absmax, shape, blocksize, dtype, absmax2=None, code2=None, offset=None):
    _dequantize_check(packed, absmax, shape, blocksize, dtype, absmax2, code2, offset)
    return packed.new_empty(shape, dtype=dtype)


def _dequantize_cuda(packed, absmax, shape, blocksize, dtype, absmax2=None, code2=None, offset=None):
    from ..codegen import nf4_matmul

    _dequantize_check(packed, absmax, shape, blocksize, dtype, absmax2, code2, offset)
    return nf4_matmul.dequantize(packed, absmax, tuple(shape), blocksize, dtype, absmax2, code2, offset)


nf4_dequantize = define_op(
    "nf4_dequantize",
    "(Tensor packed, Tensor absmax, SymInt[] shape, int blocksize, ScalarType dtype, "
    "Tensor? absmax2=None, Tensor? code2=None, Tensor? offset=None) -> Tensor",
    reference=_dequantize_reference,
    fake=_dequantize_fake,
    cuda=_dequantize_cuda,
)


# --- nf4_linear and its backward -----------------------------------------------------------------


def _linear_check(x, packed, absmax, shape, blocksize, bias, absmax2, code2, offset) -> None:
    _check_weight("nf4_linear", packed, absmax, shape, blocksize, absmax2, code2, offset)
    if len(shape) != 2:
        raise ValueError(f"nf4_linear: the weight shape must be [out_features, in_features], got {list(shape)}")
    if x.dtype not in _DTYPES:
        raise ValueError(f"nf4_linear: activations must be bf16, fp16 or fp32, got {x.dtype}")
    _require(x.shape[-1] == shape[1], lambda: f"nf4_linear: input has {x.shape[-1]} features, weight {list(shape)}")
    if bias is not None:
        _require(bias.numel() == shape[0], lambda: f"nf4_linear: bias of {bias.numel()} for {shape[0]} outputs")


def _linear_reference(x, packed, absmax, shape, blocksize, bias=None, absmax2=None, code2=None, offset=None):
    _linear_check(x, packed, absmax, shape, blocksize, bias, absmax2, code2, offset)
    weight = _dequantize_reference(packed, absmax, shape, blocksize, x.dtype, absmax2, code2, offset)
    return torch.nn.functional.linear(x, weight, None if bias is None else bias.to(x.dtype))


def _linear_fake(x, packed, absmax, shape, blocksize, bias=None, absmax2=None, code2=None, offset=None):
    _linear_check(x, packed, absmax, shape, blocksize, bias, absmax2, code2, offset)
    return x.new_empty((*x.shape[:-1], shape[0]))


def _linear_workspace(x, packed, absmax, shape, blocksize, bias=None, absmax2=None, code2=None, offset=None):
    """The weight dequantized into a transient 16-bit buffer for the matmul (the path of every token
    count above a few: the GEMV of <= 16 tokens needs less, and is counted as if it did the same)."""
    return [x.new_empty(shape)]


def _linear_cuda(x, packed, absmax, shape, blocksize, bias=None, absmax2=None, code2=None, offset=None):
    from ..codegen import nf4_matmul

    _linear_check(x, packed, absmax, shape, blocksize, bias, absmax2, code2, offset)
    return nf4_matmul.linear(x, packed, absmax, tuple(shape), blocksize, bias, absmax2, code2, offset)


def _backward_reference(grad_y, packed, absmax, shape, blocksize, absmax2=None, code2=None, offset=None):
    weight = _dequantize_reference(packed, absmax, shape, blocksize, grad_y.dtype, absmax2, code2, offset)
    return torch.matmul(grad_y, weight)


def _backward_fake(grad_y, packed, absmax, shape, blocksize, absmax2=None, code2=None, offset=None):
    _check_weight("nf4_linear_backward", packed, absmax, shape, blocksize, absmax2, code2, offset)
    return grad_y.new_empty((*grad_y.shape[:-1], shape[1]))


def _backward_workspace(grad_y, packed, absmax, shape, blocksize, absmax2=None, code2=None, offset=None):
    return [grad_y.new_empty(shape)]  # as the forward's


def _backward_cuda(grad_y, packed, absmax, shape, blocksize, absmax2=None, code2=None, offset=None):
    from ..codegen import nf4_matmul

    _check_weight("nf4_linear_backward", packed, absmax, shape, blocksize, absmax2, code2, offset)
    return nf4_matmul.linear_backward(grad_y, packed, absmax, tuple(shape), blocksize, absmax2, code2, offset)


nf4_linear_backward = define_op(
    "nf4_linear_backward",
    "(Tensor grad_y, Tensor packed, Tensor absmax, SymInt[] shape, int blocksize, "
    "Tensor? absmax2=None, Tensor? code2=None, Tensor? offset=None) -> Tensor",
    reference=_backward_reference,
    fake=_backward_fake,
    cuda=_backward_cuda,
    workspace=_backward_workspace,
)


def _setup_context(ctx, inputs, output) -> None:
    x, packed, absmax, shape, blocksize, bias, absmax2, code2, offset = inputs
    # Only the resident quantized weight is kept: no activation, no dequantized copy.
    ctx.save_for_backward(packed, absmax, absmax2, code2, offset)
    ctx.shape, ctx.blocksize = list(shape), blocksize
    ctx.bias_dtype = None if bias is None else bias.dtype


def _backward(ctx, grad_y):
    packed, absmax, absmax2, code2, offset = ctx.saved_tensors
    grad_x = grad_bias = None
    if ctx.needs_input_grad[0]:
        grad_x = nf4_linear_backward(grad_y, packed, absmax, ctx.shape, ctx.blocksize, absmax2, code2, offset)
    if ctx.bias_dtype is not None and ctx.needs_input_grad[5]:
        grad_bias = grad_y.reshape(-1, grad_y.shape[-1]).sum(0, dtype=torch.float32).to(ctx.bias_dtype)
    return grad_x, None, None, None, None, grad_bias, None, None, None


nf4_linear = define_op(
    "nf4_linear",
    "(Tensor x, Tensor packed, Tensor absmax, SymInt[] shape, int blocksize, Tensor? bias=None, "
    "Tensor? absmax2=None, Tensor? code2=None, Tensor? offset=None) -> Tensor",
    reference=_linear_reference,
    fake=_linear_fake,
    cuda=_linear_cuda,
    backward=_backward,
    setup_context=_setup_context,
    workspace=_linear_workspace,
)
