"""NF4 storage against bitsandbytes on the CPU, both directions, bit for bit: the 4-bit codes, the
absmax, its double quantization (8-bit dynamic map, blocks of 256, fp32 offset) and the dequantized
16-bit weights. Shapes include element counts the block size does not divide (a partial last block
with its own absmax, as bitsandbytes does) and odd counts (one padding nibble)."""

import copy

import bitsandbytes.functional as bnbf
import bitsandbytes.nn as bnn
import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from lowmem_compile.formats import nf4


@pytest.fixture(autouse=True)
def _bnb_eager():
    """bitsandbytes torch.compiles its generic CPU kernels per shape; run them eagerly instead."""
    with torch.compiler.set_stance("force_eager"):
        yield

DTYPES = [torch.bfloat16, torch.float16, torch.float32]
shapes = st.tuples(st.integers(1, 70), st.integers(1, 300))


def _bnb_dequantize(packed, state):
    """bitsandbytes' dequantization of (packed, state), on a flat view of the weight.

    bitsandbytes 0.50's native CPU kernel miscomputes a 2-D weight whose rows have an even length
    that the block size does not divide (a [3, 16] weight in blocks of 32, [40, 96] in blocks of
    64: errors of O(1)); its blocks run over the flat weight, and on a flat shape the same kernel
    (its generic path for odd lengths) is right. The flat call is still bitsandbytes' own decode."""
    flat = copy.copy(state)
    flat.shape = torch.Size([state.shape.numel()])
    return bnbf.dequantize_4bit(packed, flat).view(state.shape)


def _weight(shape, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * torch.rand(shape[0], 1, generator=g) * 3).to(dtype)


def test_dynamic_map_is_bnb_table():
    assert torch.equal(nf4.dynamic_map(), bnbf.create_dynamic_map())


@settings(max_examples=25, deadline=None)
@given(shape=shapes, dtype=st.sampled_from(DTYPES), blocksize=st.sampled_from([32, 64, 128]),
       double=st.booleans(), seed=st.integers(0, 2**16))
@example(shape=(3, 16), dtype=torch.bfloat16, blocksize=32, double=False, seed=0)  # a partial last block
@example(shape=(40, 96), dtype=torch.float16, blocksize=64, double=True, seed=1)  # blocks across rows
@example(shape=(70, 300), dtype=torch.float32, blocksize=32, double=True, seed=2)  # 329 blocks: 2 nested blocks
def test_ours_equals_bnb_quantize(shape, dtype, blocksize, double, seed):
    w = _weight(shape, dtype, seed)
    packed, state = bnbf.quantize_4bit(w, blocksize=blocksize, compress_statistics=double, quant_type="nf4")
    ours = nf4.NF4Weight.from_float(w, blocksize, double)
    assert torch.equal(ours.packed, packed.view(-1))
    if double:
        assert torch.equal(ours.absmax2, state.state2.absmax)
        assert torch.equal(ours.code2, state.state2.code)
        assert torch.equal(ours.offset, state.offset)
        # The 8-bit index is the exact nearest code; bnb's binary search (dQuantize) can pick the
        # neighbour for a value within float error of a midpoint, and writes 0 for an all-zero block.
        steps = (ours.absmax.int() - state.absmax.int()).abs()
        live = (state.state2.absmax != 0).repeat_interleave(256)[: state.absmax.numel()]
        assert steps[live].le(1).all() and steps[live].ne(0).sum() <= max(1, live.sum() // 50)
        # After dequantization: bit-identical in every 4-bit block whose 8-bit absmax index agrees,
        # and within one step of the 8-bit map (< 1.2% of the block's absmax) where it does not.
        ours_w, bnb_w = ours.dequantize(dtype).float().flatten(), _bnb_dequantize(packed, state).float().flatten()
        same = (steps == 0).repeat_interleave(blocksize)[: w.numel()]
        assert torch.equal(ours_w[same], bnb_w[same])
        block_absmax = ours.full_absmax().float().repeat_interleave(blocksize)[: w.numel()]
        assert ((ours_w - bnb_w).abs() <= 0.012 * block_absmax + 1e-6)[~same].all()
    else:
        assert torch.equal(ours.absmax, state.absmax)
        assert torch.equal(ours.dequantize(dtype), _bnb_dequantize(packed, state))


@settings(max_examples=10, deadline=None)
@given(shape=shapes, dtype=st.sampled_from(DTYPES), double=st.booleans(), seed=st.integers(0, 2**16))
def test_bnb_weights_through_ours_and_ours_through_bnb(shape, dtype, double, seed):
    w = _weight(shape, dtype, seed)
    packed, state = bnbf.quantize_4bit(w, blocksize=64, compress_statistics=double, quant_type="nf4")
    from_bnb = nf4.NF4Weight.from_bnb(packed, state)
    assert torch.equal(from_bnb.dequantize(), _bnb_dequantize(packed, state))
    ours = nf4.NF4Weight.from_float(w, 64, double)
    p2, s2 = ours.to_bnb()
    assert (s2.shape, s2.blocksize, s2.dtype, s2.quant_type, s2.nested) == (state.shape, 64, dtype, "nf4", double)
    assert torch.equal(_bnb_dequantize(p2, s2), ours.dequantize())


def test_params4bit_and_state_dict_interop():
    layer = bnn.Linear4bit(96, 40, bias=False, quant_type="nf4", compress_statistics=True, compute_dtype=torch.float32)
    layer.load_state_dict({"weight": _weight((40, 96), torch.float32, 1)})
    layer = layer.cpu()
    ours = nf4.NF4Weight.from_bnb(layer.weight, layer.weight.quant_state)
    assert torch.equal(ours.dequantize(torch.float32), _bnb_dequantize(layer.weight.data, layer.weight.quant_state))
    packed, state = ours.to_bnb()
    param = bnn.Params4bit.from_prequantized(packed, state.as_dict(packed=True), device="cpu")
    assert torch.equal(_bnb_dequantize(param.data, param.quant_state), ours.dequantize())


def test_double_quant_error_is_small():
    absmax = torch.rand(1000) * 2 + 0.1
    index, absmax2, code, offset = nf4.double_quantize(absmax)
    recovered = nf4.expand_absmax(index, absmax2, code, offset)
    assert (recovered - absmax).abs().max() < 0.01 * absmax.abs().max()


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="blocksize"):
        nf4.NF4Weight.from_float(torch.randn(4, 64), blocksize=48)
    with pytest.raises(ValueError, match="floating-point"):
        nf4.quantize(torch.ones(4, 64, dtype=torch.int32))
    w = nf4.NF4Weight.from_float(torch.randn(4, 64), double_quant=True)
    with pytest.raises(ValueError, match="packed"):
        nf4.NF4Weight(w.packed[:-1], w.absmax, (4, 64), 64, torch.float32, w.absmax2, w.code2, w.offset)
    with pytest.raises(ValueError, match="double quantization"):
        nf4.NF4Weight(w.packed, w.absmax, (4, 64), 64, torch.float32)
    packed, state = bnbf.quantize_4bit(torch.randn(4, 64), quant_type="fp4")
    with pytest.raises(ValueError, match="fp4"):
        nf4.NF4Weight.from_bnb(packed, state)
