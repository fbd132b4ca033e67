"""The custom-op seam, on its first real op: `lowmem::nf4_dequantize`."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import lowmem_compile.ops  # noqa: F401
from lowmem_compile.formats import nf4


@settings(max_examples=20, deadline=None)
@given(rows=st.integers(1, 70), cols=st.integers(1, 130), dtype=st.sampled_from([torch.bfloat16, torch.float16]))
def test_dequantize_op_matches_float64_math(rows, cols, dtype):
    w = torch.randn(rows, cols, dtype=torch.float64)
    packed, absmax = nf4.quantize(w)
    got = torch.ops.lowmem.nf4_dequantize(packed, absmax, [rows, cols], 64, dtype)
    # independent float64 decode: index -> code value -> times the block's absmax
    index = torch.stack((packed >> 4, packed & 15), 1).reshape(-1)[: rows * cols].long()
    expected = torch.tensor(nf4.NF4_CODE, dtype=torch.float64)[index] * absmax.double().repeat_interleave(64)[: rows * cols]
    torch.testing.assert_close(got, expected.reshape(rows, cols).to(dtype), rtol=0, atol=0)
    # and the quantization error is bounded by half the widest code gap times the block absmax
    assert ((got.double() - w).abs() <= 0.16 * absmax.double().max() + 1e-3).all()


def test_opcheck_fake_and_schema():
    w = torch.randn(16, 40)
    packed, absmax = nf4.quantize(w)
    torch.library.opcheck(torch.ops.lowmem.nf4_dequantize.default, (packed, absmax, [16, 40], 64, torch.bfloat16))


def test_bad_inputs_raise_clear_errors():
    packed, absmax = nf4.quantize(torch.randn(8, 8))
    with pytest.raises(ValueError, match="uint8"):
        torch.ops.lowmem.nf4_dequantize(packed.to(torch.int32), absmax, [8, 8], 64, torch.bfloat16)
    with pytest.raises(RuntimeError, match="packed bytes"):
        torch.ops.lowmem.nf4_dequantize(packed, absmax, [8, 16], 64, torch.bfloat16)
    with pytest.raises(ValueError, match="blocksize"):
        torch.ops.lowmem.nf4_dequantize(packed, absmax, [8, 8], 48, torch.bfloat16)


def test_op_is_one_node_under_compile():
    packed, absmax = nf4.quantize(torch.randn(32, 64))
    seen = []

    def spy(gm, inputs):
        seen.extend(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return gm

    f = torch.compile(lambda p, a: torch.ops.lowmem.nf4_dequantize(p, a, [32, 64], 64, torch.float16) + 1, backend=spy)
    f(packed, absmax)
    assert seen.count("lowmem.nf4_dequantize") == 1


def test_hypothesis_runs_the_ci_profile():
    """conftest loads a derandomized profile (the same examples every run) unless asked otherwise."""
    import os

    from hypothesis import settings as current

    if os.environ.get("HYPOTHESIS_PROFILE", "ci") == "ci":
        assert current.default.derandomize and current.default.deadline is None
        assert current.default.max_examples == 20
