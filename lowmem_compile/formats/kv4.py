"""K/V quantization for the attention backward: 4 or 8 bits, per-group 16-bit scale and minimum.

What the backward of attention needs from K and V is kept in this format instead of 16 bits (each
pass of the attention op expands it once into a transient 16-bit K and V, the values below):

- K is *smoothed* first: its per-channel mean over the sequence is removed per (batch, KV head).
  Every query row's scores then shift by the same constant q·mean, which softmax ignores, so the
  attention (and its gradient) is unchanged while the outlier channels that RoPE'd keys carry
  mostly vanish and the groups quantize far better. V is not smoothed (a mean of V does reach O).
- Each row of D elements is cut into groups of `group_size(D)` (32, or D/2 when D/2 is no multiple
  of 32: 48 at D=96, 40 at D=80) along the head dim. A group keeps `scale = (max - min) / (2^bits - 1)`
  and `min`, both rounded to 16 bits (fp16 for fp16 data, else bf16, whose range cannot overflow);
  codes are `floor((x - min) / scale + 0.5)` clamped to [0, 2^bits - 1], computed with the rounded
  scale and min, so that dequantization `code * scale + min` is exactly what the kernels compute.
- 4-bit codes are packed two a byte, *split by halves*: byte j holds element j in the low nibble and
  element j + D/2 in the high nibble. Groups never straddle the halves (group_size divides D/2), so
  a group's codes are one nibble of a run of `group_size` bytes: the dequantization kernel reads
  group g of the second half from the high nibbles of group g's bytes. 8-bit codes are one byte an
  element, in order.

Bytes a row at head dim D, group G: D/2 + 4*D/G (4 bits) or D + 4*D/G (8 bits), against 2*D in
bf16: 0.3125x at D=128, G=32 for 4 bits (codes 0.25x + scales 0.0625x), 0.5625x for 8 bits.
"""

from __future__ import annotations

import torch

BITS = (4, 8, 16)


def group_size(head_dim: int) -> int:
    """Elements a scale covers: 32 where it divides D/2, else D/2 (so groups never straddle halves)."""
    if head_dim % 2 or head_dim < 2:
        raise ValueError(f"K/V quantization needs an even head dim, got {head_dim}")
    half = head_dim // 2
    return 32 if half % 32 == 0 else half


def check_bits(bits: int) -> None:
    if bits not in BITS:
        raise ValueError(f"kv_bits must be one of {BITS}, got {bits}")


def scale_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp16 scales for fp16 data (more mantissa), bf16 otherwise (no overflow for large keys)."""
    return torch.float16 if dtype == torch.float16 else torch.bfloat16


def code_cols(head_dim: int, bits: int) -> int:
    """Bytes of codes a row keeps."""
    return head_dim // 2 if bits == 4 else head_dim


def row_bytes(head_dim: int, bits: int, elem_bytes: int = 2) -> int:
    """Bytes a row of K or V keeps for the backward (codes + scale and min of every group)."""
    if bits == 16:
        return head_dim * elem_bytes
    return code_cols(head_dim, bits) + 4 * (head_dim // group_size(head_dim))


def no_codes(like: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The (codes, scales, codes, scales) of 16-bit K/V: four distinct empty tensors, because custom-op
    outputs may not alias each other, not even when empty."""
    return tuple(like.new_empty(0) for _ in range(4))


def smooth(k: torch.Tensor) -> torch.Tensor:
    """K minus its per-channel mean over the sequence ([B, H, S, D]; mean over S), in fp32."""
    k = k.float()
    return k - k.mean(dim=-2, keepdim=True)


def pack4(codes: torch.Tensor) -> torch.Tensor:
    """uint8 codes < 16, [..., D] -> [..., D/2]: byte j = codes[j] | codes[j + D/2] << 4."""
    half = codes.shape[-1] // 2
    return codes[..., :half] | (codes[..., half:] << 4)


def unpack4(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack4`: [..., D/2] uint8 -> [..., D] codes."""
    return torch.cat([packed & 15, packed >> 4], dim=-1)


def quantize(x: torch.Tensor, bits: int, scales_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., D] (already smoothed if it is K) -> (codes uint8 [..., code_cols], scales [..., D/G, 2]).

    `scales[..., 0]` is the step, `scales[..., 1]` the group minimum, in `scales_dtype`
    (:func:`scale_dtype` of the data's own dtype: x may be a smoothed fp32 copy).
    """
    if bits not in (4, 8):
        raise ValueError(f"quantize takes 4 or 8 bits, got {bits}")
    d = x.shape[-1]
    g = group_size(d)
    qmax = 2**bits - 1
    groups = x.float().reshape(*x.shape[:-1], d // g, g)
    lo, hi = groups.amin(dim=-1), groups.amax(dim=-1)
    step = ((hi - lo) / qmax).to(scales_dtype)
    low = lo.to(scales_dtype)
    step32, low32 = step.float().unsqueeze(-1), low.float().unsqueeze(-1)
    inv = torch.where(step32 > 0, 1.0 / step32, torch.zeros_like(step32))
    codes = torch.floor((groups - low32) * inv + 0.5).clamp(0, qmax).to(torch.uint8).reshape(x.shape)
    if bits == 4:
        codes = pack4(codes)
    return codes, torch.stack([step, low], dim=-1)


def dequantize(codes: torch.Tensor, scales: torch.Tensor, bits: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(codes, scales) -> [..., D] in `dtype`, computed as code * step + min in fp32."""
    if bits == 4:
        codes = unpack4(codes)
    ngroups = scales.shape[-2]
    d = codes.shape[-1]
    groups = codes.float().reshape(*codes.shape[:-1], ngroups, d // ngroups)
    step, low = scales[..., 0].float().unsqueeze(-1), scales[..., 1].float().unsqueeze(-1)
    return (groups * step + low).reshape(codes.shape).to(dtype)
