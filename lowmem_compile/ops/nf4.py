"""NF4 ops. `nf4_dequantize` turns packed NF4 storage back into a 16-bit weight; the reference in
`formats/nf4.py` is its specification."""

from __future__ import annotations

import torch

from ..formats import nf4 as nf4_format
from .library import define_op


def _check(packed: torch.Tensor, absmax: torch.Tensor, shape: list[int], blocksize: int, dtype: torch.dtype) -> int:
    nf4_format.check_blocksize(blocksize)
    numel = 1
    for s in shape:
        numel *= s
    if packed.dtype != torch.uint8:
        raise ValueError(f"nf4_dequantize: packed codes must be uint8, got {packed.dtype}")
    torch._check(packed.numel() == (numel + 1) // 2, lambda: f"nf4_dequantize: {packed.numel()} packed bytes for shape {shape}")
    torch._check(
        absmax.numel() == nf4_format.num_blocks(numel, blocksize),
        lambda: f"nf4_dequantize: {absmax.numel()} absmax values for {numel} elements at blocksize {blocksize}",
    )
    if dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise ValueError(f"nf4_dequantize: dtype must be bf16, fp16 or fp32, got {dtype}")
    return numel


def _reference(packed, absmax, shape, blocksize, dtype):
    _check(packed, absmax, shape, blocksize, dtype)
    return nf4_format.dequantize(packed, absmax, tuple(shape), blocksize, dtype)


def _fake(packed, absmax, shape, blocksize, dtype):
    _check(packed, absmax, shape, blocksize, dtype)
    return packed.new_empty(shape, dtype=dtype)


nf4_dequantize = define_op(
    "nf4_dequantize",
    "(Tensor packed, Tensor absmax, SymInt[] shape, int blocksize, ScalarType dtype) -> Tensor",
    reference=_reference,
    fake=_fake,
)
