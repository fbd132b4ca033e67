"""NF4 (4-bit NormalFloat), stored exactly as bitsandbytes stores it.

The weight [N, K] is flattened row-major and cut into blocks of `blocksize` (64) elements; each block
keeps one fp32 absmax, each element the index of the nearest of 16 code values (the quantiles of a
normal distribution, scaled to [-1, 1]) to x / absmax. Two indices share a byte, the first element in
the high nibble. A last, partial block gets its own absmax; an odd element count is padded by one
nibble (the code of 0.0). Dequantization is code[index] * absmax in fp32, then cast, as bitsandbytes
does it, so both libraries produce bit-identical 16-bit weights.

Bytes: N*K/2 for the codes plus 4*ceil(N*K/blocksize) for the absmax (0.5625 bytes an element
at block 64, against 2 in bf16: 3.56x less).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

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
    if n % 2:  # the spare low nibble holds the code of 0.0 (index 7), as bitsandbytes writes it
        scaled = torch.nn.functional.pad(scaled, (0, 1))
    index = torch.bucketize(scaled, bounds, out_int32=True).to(torch.uint8)
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


# --- double quantization of the absmax -------------------------------------------------------------
#
# bitsandbytes' `compress_statistics=True`: subtract the mean of the absmax (the fp32 `offset`), then
# quantize the centred values to 8 bits with its signed dynamic map in blocks of 256, each block with
# its own fp32 absmax. Dequantization is code8[q] * absmax2[i // 256] (fp32) then + offset (fp32),
# two roundings, never a fused multiply-add, so the recovered absmax is bit-identical to bnb's.

NESTED_BLOCKSIZE = 256


def dynamic_map() -> torch.Tensor:
    """bitsandbytes' signed 8-bit dynamic map (`create_dynamic_map()`): 256 sorted fp32 values.

    Exponent e in 0..6 gives 2**e fraction steps: the midpoints of a linspace(0.1, 1) grid with
    2**e + 1 points, scaled by 10**(e - 6), with both signs; plus 0 and 1.
    """
    parts = [torch.tensor([0.0, 1.0])]
    for e in range(7):
        edges = torch.linspace(0.1, 1.0, 2**e + 1, dtype=torch.float32)
        steps = 10.0 ** (e - 6) * ((edges[:-1] + edges[1:]) / 2)  # fp32 arithmetic, as bnb's table
        parts += [steps, -steps]
    return torch.cat(parts).sort().values


def quantize_blockwise_8bit(
    values: torch.Tensor, code: torch.Tensor, blocksize: int = NESTED_BLOCKSIZE
) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 `values` -> (uint8 index of the nearest `code` entry to v / absmax, fp32 absmax a block)."""
    flat = values.reshape(-1).float()
    n = flat.numel()
    blocks = num_blocks(n, blocksize)
    padded = torch.nn.functional.pad(flat, (0, blocks * blocksize - n)).view(blocks, blocksize)
    absmax = padded.abs().amax(dim=1)
    scaled = (padded * (1.0 / absmax.clamp(min=1e-38)).unsqueeze(1)).clamp(-1, 1).reshape(-1)[:n]
    code = code.to(flat.device)
    index = torch.bucketize(scaled, (code[:-1] + code[1:]) / 2, out_int32=True)
    return index.to(torch.uint8), absmax


def dequantize_blockwise_8bit(
    index: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, blocksize: int = NESTED_BLOCKSIZE
) -> torch.Tensor:
    """code[index] * absmax[block], fp32."""
    flat = index.reshape(-1)
    scale = absmax.float().repeat_interleave(blocksize)[: flat.numel()]
    return code.to(flat.device)[flat.long()] * scale


def double_quantize(absmax: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """fp32 absmax -> (uint8 nested index, fp32 nested absmax, fp32 code [256], fp32 offset [])."""
    offset = absmax.float().mean()
    code = dynamic_map().to(absmax.device)
    index, absmax2 = quantize_blockwise_8bit(absmax.float() - offset, code)
    return index, absmax2, code, offset


def expand_absmax(
    absmax: torch.Tensor,
    absmax2: torch.Tensor | None = None,
    code2: torch.Tensor | None = None,
    offset: torch.Tensor | None = None,
) -> torch.Tensor:
    """The fp32 absmax of every block: `absmax` itself, or recovered from its double quantization."""
    if absmax2 is None:
        return absmax.float()
    if code2 is None or offset is None:
        raise ValueError("a nested (uint8) absmax needs absmax2, code2 and offset")
    return dequantize_blockwise_8bit(absmax, absmax2, code2) + offset.float()


# --- the quantized weight ----------------------------------------------------------------------------


@dataclass
class NF4Weight:
    """One NF4 weight, as stored: packed codes, absmax (fp32, or uint8 when double-quantized with its
    `absmax2` / `code2` / `offset`), the original `shape`, `blocksize` and 16-bit `dtype`.

    A partial last block (numel not a multiple of `blocksize`) has its own absmax over the elements
    it holds, as bitsandbytes does; nothing is padded but the odd last nibble.
    """

    packed: torch.Tensor
    absmax: torch.Tensor
    shape: tuple[int, ...]
    blocksize: int = DEFAULT_BLOCKSIZE
    dtype: torch.dtype = torch.bfloat16
    absmax2: torch.Tensor | None = None
    code2: torch.Tensor | None = None
    offset: torch.Tensor | None = None

    def __post_init__(self) -> None:
        check_blocksize(self.blocksize)
        numel = math.prod(self.shape)
        if self.packed.dtype != torch.uint8 or self.packed.numel() != (numel + 1) // 2:
            raise ValueError(f"NF4 packed codes must be {(numel + 1) // 2} uint8 bytes for shape {self.shape}, "
                             f"got {self.packed.numel()} of {self.packed.dtype}")
        if self.absmax.numel() != num_blocks(numel, self.blocksize):
            raise ValueError(f"NF4 absmax needs {num_blocks(numel, self.blocksize)} values, got {self.absmax.numel()}")
        nested = self.absmax2 is not None
        if nested != (self.absmax.dtype == torch.uint8) or nested != (self.code2 is not None) or nested != (self.offset is not None):
            raise ValueError("NF4 absmax is either fp32, or uint8 with absmax2, code2 and offset (double quantization)")

    @property
    def nested(self) -> bool:
        return self.absmax2 is not None

    @classmethod
    def from_float(
        cls, weight: torch.Tensor, blocksize: int = DEFAULT_BLOCKSIZE, double_quant: bool = True
    ) -> NF4Weight:
        packed, absmax = quantize(weight, blocksize)
        extra: dict = {}
        if double_quant:
            absmax, extra["absmax2"], extra["code2"], extra["offset"] = double_quantize(absmax)
        return cls(packed, absmax, tuple(weight.shape), blocksize, weight.dtype, **extra)

    def full_absmax(self) -> torch.Tensor:
        return expand_absmax(self.absmax, self.absmax2, self.code2, self.offset)

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        return dequantize(self.packed, self.full_absmax(), self.shape, self.blocksize, dtype or self.dtype)

    def tensors(self) -> dict[str, torch.Tensor]:
        """The stored tensors by name (those that exist)."""
        names = ("packed", "absmax", "absmax2", "code2", "offset")
        return {n: getattr(self, n) for n in names if getattr(self, n) is not None}

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors().values())

    @classmethod
    def from_bnb(cls, packed: torch.Tensor, quant_state) -> NF4Weight:
        """From a bitsandbytes `Params4bit` (or its packed data) and its `QuantState`."""
        if quant_state.quant_type != "nf4":
            raise ValueError(f"only NF4 is supported, this weight is {quant_state.quant_type!r}")
        if getattr(quant_state, "packing_format_for_cpu", False):
            raise ValueError("this bitsandbytes weight is repacked for CPU inference; move it off the CPU "
                             "format first (bitsandbytes converts back when saving or moving it)")
        packed = packed.data.reshape(-1).view(torch.uint8) if isinstance(packed, torch.nn.Parameter) else packed.reshape(-1).view(torch.uint8)
        extra: dict = {}
        if quant_state.nested:
            if quant_state.state2.blocksize != NESTED_BLOCKSIZE:
                raise ValueError(f"nested absmax blocksize {quant_state.state2.blocksize}, only {NESTED_BLOCKSIZE} is supported")
            extra = dict(absmax2=quant_state.state2.absmax, code2=quant_state.state2.code,
                         offset=quant_state.offset.reshape(()).float())
        return cls(packed, quant_state.absmax, tuple(quant_state.shape), quant_state.blocksize, quant_state.dtype, **extra)

    def to_bnb(self):
        """(packed [numel/2, 1] uint8, `bitsandbytes.functional.QuantState`), as `quantize_4bit` returns them."""
        from bitsandbytes.functional import QuantState, get_4bit_type

        device = self.packed.device
        state2 = None
        if self.nested:
            state2 = QuantState(absmax=self.absmax2, code=self.code2, blocksize=NESTED_BLOCKSIZE, dtype=torch.float32)
        state = QuantState(
            absmax=self.absmax, shape=torch.Size(self.shape), code=get_4bit_type("nf4", device=device),
            blocksize=self.blocksize, quant_type="nf4", dtype=self.dtype, offset=self.offset, state2=state2,
        )
        return self.packed.reshape(-1, 1), state
