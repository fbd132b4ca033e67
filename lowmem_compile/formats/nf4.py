"""NF4 (4-bit NormalFloat), stored exactly as bitsandbytes stores it.

The weight [N, K] is flattened row-major and cut into blocks of `blocksize` (64) elements; each block
keeps one fp32 absmax, each element the index of the nearest of 16 code values (the quantiles of a
normal distribution, scaled to [-1, 1]) to x / absmax. Two indices share a byte, the first element in
the high nibble. A last, partial block gets its own absmax; an odd element count is padded by one
zero nibble. Dequantization is code[index] * absmax in fp32, then cast, as bitsandbytes does it, so
both libraries produce bit-identical 16-bit weights.

Bytes: N*K/2 for the codes plus 4*ceil(N*K/blocksize) for the absmax (0.5625 bytes an element
at block 64, against 2 in bf16: 3.56x less).
"""

from __future__ import annotations

import torch

#: The 16 NF4 code values, in index order (bitsandbytes' `nf4` table).
NF4_CODE = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)  # fmt: skip

DEFAULT_BLOCKSIZE = 64


def code_table(device: torch.device | str = "cpu") -> torch.Tensor:
    return torch.tensor(NF4_CODE, dtype=torch.float32, device=device)


def num_blocks(numel: int, blocksize: int) -> int:
    return -(-numel // blocksize)


def check_blocksize(blocksize: int) -> None:
    if blocksize not in (32, 64, 128, 256, 512, 1024, 2048, 4096):
        raise ValueError(f"NF4 blocksize must be a power of two in [32, 4096] (bitsandbytes' choices), got {blocksize}")


def quantize(weight: torch.Tensor, blocksize: int = DEFAULT_BLOCKSIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """`weight` (any shape, floating) -> (packed uint8 [ceil(numel/2)], absmax fp32 [blocks])."""
    check_blocksize(blocksize)
    if not weight.is_floating_point():
        raise ValueError(f"NF4 quantize needs a floating-point weight, got {weight.dtype}")
    flat = weight.detach().reshape(-1).float()
    n = flat.numel()
    blocks = num_blocks(n, blocksize)
    padded = torch.nn.functional.pad(flat, (0, blocks * blocksize - n)).view(blocks, blocksize)
    absmax = padded.abs().amax(dim=1)
    scaled = (padded * (1.0 / absmax.clamp(min=1e-38)).unsqueeze(1)).clamp(-1, 1).reshape(-1)[:n]
    code = code_table(flat.device)
    bounds = (code[:-1] + code[1:]) / 2
    index = torch.bucketize(scaled, bounds, out_int32=True).to(torch.uint8)
    if n % 2:
        index = torch.nn.functional.pad(index, (0, 1))
    return (index[0::2] << 4) | index[1::2], absmax


def unpack(packed: torch.Tensor, numel: int) -> torch.Tensor:
    """Packed bytes -> code indices (uint8, one an element)."""
    flat = packed.reshape(-1).view(torch.uint8)
    return torch.stack((flat >> 4, flat & 0xF), dim=1).reshape(-1)[:numel]


def dequantize(
    packed: torch.Tensor,
    absmax: torch.Tensor,
    shape: tuple[int, ...] | torch.Size,
    blocksize: int = DEFAULT_BLOCKSIZE,
    dtype: torch.dtype = torch.bfloat16,
) -> torch.Tensor:
    """The reference dequantization: code[index] * absmax[block] in fp32, cast to `dtype`."""
    numel = 1
    for s in shape:
        numel *= int(s)
    index = unpack(packed, numel).long()
    values = code_table(packed.device)[index]
    scale = absmax.float().repeat_interleave(blocksize)[:numel]
    return (values * scale).reshape(shape).to(dtype)
