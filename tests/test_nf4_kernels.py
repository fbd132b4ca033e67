"""NF4 kernels (Triton interpreter on the CPU, real kernels on CUDA) and the `nf4_linear` op against
the reference op. The dequant kernel must be bit-identical; matmuls are compared with a float64
product of the same dequantized weight: relative error < 2e-3 in fp16, < 1e-5 in fp32 (accumulation
order only). bf16 matmuls through tl.dot run only on the GPU (the interpreter's bf16 dot is wrong); the
one-row GEMV has no dot, so its bf16 path is tested here too."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import lowmem_compile.ops  # noqa: F401
from lowmem_compile.codegen import nf4_matmul
from lowmem_compile.formats.nf4 import NF4Weight

from .models import rel_err

TOL = {torch.float16: 2e-3, torch.float32: 1e-5, torch.bfloat16: 1e-2}
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _weight(n, k, nested, blocksize=64, device=DEVICE):
    return NF4Weight.from_float(torch.randn(n, k, device=device), blocksize, nested)


def _args(q):
    return q.packed, q.absmax, q.shape, q.blocksize, q.absmax2, q.code2, q.offset


@pytest.mark.parametrize("nested", [False, True])
@pytest.mark.parametrize("shape,blocksize", [((24, 96), 64), ((7, 37), 32), ((16, 256), 128), ((64, 128), 64),
                                             ((128, 128), 64), ((96, 136), 32)])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_dequant_kernel_bit_exact(nested, shape, blocksize, dtype):
    """Odd element counts, partial and full programs (4096 packed bytes each: 128x128 fills two,
    96x136 ends inside the second). bf16 runs on the GPU (`test_bf16_on_gpu`): Triton's interpreter
    truncates fp32 -> bf16 instead of rounding to nearest."""
    q = _weight(*shape, nested, blocksize)
    p, a, s, b, a2, c2, off = _args(q)
    assert torch.equal(nf4_matmul.dequantize(p, a, s, b, dtype, a2, c2, off), q.dequantize(dtype))


@pytest.mark.parametrize("nested", [False, True])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("lead,n,k,bias", [((3, 5), 48, 192, True), ((1,), 40, 1024, True), ((2, 40), 24, 128, False),
                                           ((9,), 20, 100, True)])
def test_linear_forward_and_backward(nested, dtype, lead, n, k, bias):
    """The op's per-shape choice. Shapes cover: GEMV (15 rows: tl.dot), one-token GEMV with split
    reduction and bias (K=1024), dequant+matmul (80 tokens), K % 32 != 0 (dequant at 9 tokens). The
    dequant shapes above cover partial and full programs."""
    q = _weight(n, k, nested, 64 if k % 64 == 0 else 32)
    w64 = q.dequantize(dtype).double()
    x = torch.randn(*lead, k, device=DEVICE, dtype=dtype)
    b = torch.randn(n, device=DEVICE) if bias else None
    p, a, s, bs, a2, c2, off = _args(q)
    y = nf4_matmul.linear(x, p, a, s, bs, b, a2, c2, off)
    expected = torch.nn.functional.linear(x.double(), w64, None if b is None else b.to(dtype).double())
    assert y.dtype == dtype and y.shape == (*lead, n)
    assert rel_err(y, expected) < TOL[dtype]
    g = torch.randn(*lead, n, device=DEVICE, dtype=dtype)
    gx = nf4_matmul.linear_backward(g, p, a, s, bs, a2, c2, off)
    assert gx.dtype == dtype and gx.shape == (*lead, k)
    assert rel_err(gx, g.double() @ w64) < TOL[dtype]


def _gemv_splits(m, n, k):
    """(forward splits, backward splits) the GEMV launchers use for this shape."""
    return tuple(nf4_matmul._gemv_plan(m, n, k, d, torch.device(DEVICE))[7] for d in ("fwd", "bwd"))


GEMV_CASES = [  # dtype, leading dims, N, K, bias; what each adds
    (torch.float16, (1,), 37, 96, True),       # one token (FMA), odd N, K not a multiple of the step
    (torch.bfloat16, (1, 1), 45, 160, True),   # one token in bf16 (no dot), leading dims
    (torch.float32, (3,), 21, 224, False),     # 3 tokens (FMA, a 4th padded), fp32, K % 64 != 0 (blocksize 32)
    (torch.float32, (6,), 21, 224, False),     # 6 tokens (dot, fp32), K % 64 != 0
    (torch.float16, (16,), 50, 1088, True),    # 16 tokens, the whole mma tile
    (torch.float32, (1,), 3, 1024, True),      # one token, forward split into 8 + bias in the sum kernel
    (torch.float16, (4, 4), 20, 2048, True),   # 16 tokens, forward split + bias, batch dims
    (torch.float16, (1,), 130, 64, False),     # one token, backward on the dot (a small weight)
    (torch.float16, (6,), 2048, 64, False),    # 6 tokens, backward (dot) split over rows
]


@pytest.mark.parametrize("nested", [False, True])
@pytest.mark.parametrize("dtype,lead,n,k,bias", GEMV_CASES)
def test_gemv_matches_reference(monkeypatch, nested, dtype, lead, n, k, bias):
    """The GEMV kernels (M <= 16) in both directions against a float64 product of the dequantized W
    (in x's dtype where the kernel rounds W to it: the dot; fp32 for the FMA kernel)."""
    if dtype == torch.bfloat16 and DEVICE == "cpu":  # the interpreter's bf16 tl.dot is wrong: FMAs only
        monkeypatch.setattr(nf4_matmul, "FMA_MAX_M", 4)
    q = _weight(n, k, nested, 64 if k % 64 == 0 else 32)
    p, a, s, bs, a2, c2, off = _args(q)
    m = torch.Size(lead).numel()
    w64, g64 = (q.dequantize(torch.float32 if nf4_matmul.uses_fma(m, n, k, d) else dtype).double()
                for d in ("fwd", "bwd"))
    x = torch.randn(*lead, k, device=DEVICE, dtype=dtype)
    b = torch.randn(n, device=DEVICE) if bias else None
    y = nf4_matmul.linear(x, p, a, s, bs, b, a2, c2, off, strategy="gemv")
    expected = torch.nn.functional.linear(x.double(), w64, None if b is None else b.to(dtype).double())
    assert y.dtype == dtype and y.shape == (*lead, n)
    assert rel_err(y, expected) < TOL[dtype]
    g = torch.randn(*lead, n, device=DEVICE, dtype=dtype)
    gx = nf4_matmul.linear_backward(g, p, a, s, bs, a2, c2, off, strategy="gemv")
    assert gx.dtype == dtype and gx.shape == (*lead, k)
    assert rel_err(gx, g.double() @ g64) < TOL[dtype]


@pytest.mark.parametrize("m", [1, 2, 3])
def test_gemv_fma_forced_both_directions(monkeypatch, m):
    """The FMA kernels at 1, 2 and 3 (a 4th padded) tokens in both directions, forced where the
    per-shape choice takes the dot (a backward split over rows, nested absmax, fp16), against fp32 weights."""
    monkeypatch.setattr(nf4_matmul, "FMA_MAX_M", 4)
    n, k = 128, 64
    q = _weight(n, k, True)
    p, a, s, bs, a2, c2, off = _args(q)
    w64 = q.dequantize(torch.float32).double()
    assert _gemv_splits(m, n, k)[1] > 1
    x = torch.randn(m, k, device=DEVICE, dtype=torch.float16)
    y = nf4_matmul.linear(x, p, a, s, bs, None, a2, c2, off, strategy="gemv")
    assert rel_err(y, x.double() @ w64.T) < TOL[torch.float16]
    g = torch.randn(m, n, device=DEVICE, dtype=torch.float16)
    gx = nf4_matmul.linear_backward(g, p, a, s, bs, a2, c2, off, strategy="gemv")
    assert rel_err(gx, g.double() @ w64) < TOL[torch.float16]


def test_gemv_cases_cover_the_splits():
    """The cases above reach both split reductions of both kernels (the sum kernel, bias included)."""
    splits = {(torch.Size(lead).numel(), n, k): _gemv_splits(torch.Size(lead).numel(), n, k)
              for _, lead, n, k, _ in GEMV_CASES}
    assert splits[(1, 3, 1024)][0] > 1 and splits[(16, 20, 2048)][0] > 1
    assert splits[(6, 2048, 64)][1] > 1  # the FMA backward's split: test_gemv_fma_forced_both_directions


def test_per_shape_choice_and_bad_strategy():
    assert nf4_matmul.use_gemv(1, 4096, None) and nf4_matmul.use_gemv(16, 4096, None)
    assert not nf4_matmul.use_gemv(17, 4096, None) and not nf4_matmul.use_gemv(1, 4112, None)
    assert not nf4_matmul.use_gemv(4, 4096, "dequant")
    q = _weight(16, 64, False)
    with pytest.raises(ValueError, match="strategy"):
        nf4_matmul.linear(torch.randn(1, 64, device=DEVICE), q.packed, q.absmax, q.shape, 64, strategy="sliced")
    with pytest.raises(ValueError, match="K % 32"):
        nf4_matmul.linear(torch.randn(1, 48, device=DEVICE), *_weight(16, 48, False, 32).tensors().values(),
                          (16, 48), 32, strategy="gemv")


def test_fma_choice_and_bad_override(monkeypatch):
    """The GEMV's FMA / tl.dot choice per shape (forward to 2 tokens, to 4 on small weights; backward
    one token but on small weights, 2 on large ones) and a clear error for an override the kernels cannot hold."""
    assert nf4_matmul.uses_fma(2, 14336, 4096, "fwd") and not nf4_matmul.uses_fma(3, 14336, 4096, "fwd")
    assert nf4_matmul.uses_fma(4, 1024, 4096, "fwd") and not nf4_matmul.uses_fma(5, 1024, 4096, "fwd")
    assert nf4_matmul.uses_fma(2, 14336, 4096, "bwd") and not nf4_matmul.uses_fma(2, 1024, 4096, "bwd")
    assert nf4_matmul.uses_fma(1, 4096, 4096, "bwd") and not nf4_matmul.uses_fma(1, 1024, 4096, "bwd")
    monkeypatch.setattr(nf4_matmul, "FMA_MAX_M", 8)
    with pytest.raises(ValueError, match="LOWMEM_NF4_FMA_MAX_M must be 0..4"):
        nf4_matmul.uses_fma(2, 64, 64, "fwd")


def test_op_autograd_saves_only_the_packed_weight():
    q = _weight(32, 128, True)
    x = torch.randn(4, 6, 128, device=DEVICE, requires_grad=True)
    b = torch.randn(32, device=DEVICE, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = torch.ops.lowmem.nf4_linear(x, q.packed, q.absmax, [32, 128], 64, b, q.absmax2, q.code2, q.offset)
    assert {t.data_ptr() for t in saved} <= {t.data_ptr() for t in q.tensors().values()}
    gy = torch.randn_like(y)
    y.backward(gy)
    w = q.dequantize(torch.float32).double()
    assert rel_err(x.grad, gy.double() @ w) < 1e-5
    assert rel_err(b.grad, gy.double().sum((0, 1))) < 1e-6


def test_opcheck():
    q = _weight(16, 64, True, device="cpu")
    x = torch.randn(3, 64)
    args = (x, q.packed, q.absmax, [16, 64], 64, torch.randn(16), q.absmax2, q.code2, q.offset)
    torch.library.opcheck(torch.ops.lowmem.nf4_linear.default, args, test_utils=("test_schema", "test_faketensor"))


def test_bad_inputs_raise():
    q = _weight(16, 64, False, device="cpu")
    with pytest.raises(RuntimeError, match="features"):
        torch.ops.lowmem.nf4_linear(torch.randn(2, 32), q.packed, q.absmax, [16, 64], 64)
    with pytest.raises(ValueError, match="together"):
        torch.ops.lowmem.nf4_linear(torch.randn(2, 64), q.packed, q.absmax, [16, 64], 64, None, q.absmax)
    with pytest.raises(ValueError, match="bf16, fp16 or fp32"):
        torch.ops.lowmem.nf4_linear(torch.randn(2, 64).double(), q.packed, q.absmax, [16, 64], 64)


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 5, 16, 64, 300])
@pytest.mark.parametrize("nested", [False, True])
def test_bf16_on_gpu(m, nested):
    """The per-shape choice in bf16 (GEMV up to 16 tokens, dequant + cuBLAS above)."""
    q = _weight(1024, 4096, nested)
    p, a, s, bs, a2, c2, off = _args(q)
    assert torch.equal(nf4_matmul.dequantize(p, a, s, bs, torch.bfloat16, a2, c2, off), q.dequantize(torch.bfloat16))
    w64 = q.dequantize(torch.bfloat16).double()
    x = torch.randn(m, 4096, device="cuda", dtype=torch.bfloat16)
    assert rel_err(nf4_matmul.linear(x, p, a, s, bs, None, a2, c2, off), x.double() @ w64.T) < TOL[torch.bfloat16]
    g = torch.randn(m, 1024, device="cuda", dtype=torch.bfloat16)
    assert rel_err(nf4_matmul.linear_backward(g, p, a, s, bs, a2, c2, off), g.double() @ w64) < TOL[torch.bfloat16]


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 2, 3, 8, 16])
@pytest.mark.parametrize("n,k", [(4096, 4096), (1024, 4096), (4096, 14336), (1000, 4128)])
def test_gemv_bf16_on_gpu(m, n, k):
    """The GEMV kernels in bf16 at Llama shapes (and one with ragged N and K): the tl.dot path with
    its permuted reduction, the splits, nested absmax and bias."""
    q = _weight(n, k, True)
    p, a, s, bs, a2, c2, off = _args(q)
    w64, g64 = (q.dequantize(torch.float32 if nf4_matmul.uses_fma(m, n, k, d) else torch.bfloat16).double()
                for d in ("fwd", "bwd"))
    x = torch.randn(2, m, k, device="cuda", dtype=torch.bfloat16)[1]  # a view at an offset
    b = torch.randn(n, device="cuda")
    y = nf4_matmul.linear(x, p, a, s, bs, b, a2, c2, off, strategy="gemv")
    assert rel_err(y, x.double() @ w64.T + b.bfloat16().double()) < TOL[torch.bfloat16]
    g = torch.randn(m, n, device="cuda", dtype=torch.bfloat16)
    gx = nf4_matmul.linear_backward(g, p, a, s, bs, a2, c2, off, strategy="gemv")
    assert rel_err(gx, g.double() @ g64) < TOL[torch.bfloat16]


# --- properties over shapes (hypothesis): odd sizes, every block size, M from 1 to a few hundred ----

#: fp16 and fp32 only: the interpreter's bf16 x bf16 tl.dot is wrong (bf16 runs on the GPU above).
PROPERTY_DTYPES = st.sampled_from([torch.float16, torch.float32])


def _property_weight(n, k, blocksize, nested, seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * torch.rand(n, 1, generator=g) * 2
    return NF4Weight.from_float(w.to(DEVICE), blocksize, nested), g


@settings(max_examples=25)
@given(n=st.integers(1, 90), k=st.integers(1, 200), blocksize=st.sampled_from([32, 64, 128, 256]),
       nested=st.booleans(), dtype=PROPERTY_DTYPES, seed=st.integers(0, 2**16))
def test_property_dequant_kernel_bit_exact(n, k, blocksize, nested, dtype, seed):
    """Any shape (odd element counts, a partial last block) decodes bit for bit like the format."""
    q, _ = _property_weight(n, k, blocksize, nested, seed)
    p, a, s, b, a2, c2, off = _args(q)
    assert torch.equal(nf4_matmul.dequantize(p, a, s, b, dtype, a2, c2, off), q.dequantize(dtype))


@settings(max_examples=25)
@given(m=st.one_of(st.integers(1, 20), st.integers(17, 300)), n=st.integers(1, 80), k=st.integers(1, 160),
       blocksize=st.sampled_from([32, 64, 128]), nested=st.booleans(), bias=st.booleans(), dtype=PROPERTY_DTYPES,
       seed=st.integers(0, 2**16))
def test_property_linear_and_backward(m, n, k, blocksize, nested, bias, dtype, seed):
    """The per-shape choice (GEMV kernels up to 16 tokens where K % 32 == 0, dequant + matmul
    otherwise) against a float64 product of the dequantized weight: relative error < 2e-3 in
    fp16, < 1e-5 in fp32, forward and backward."""
    q, g = _property_weight(n, k, blocksize, nested, seed)
    p, a, s, bs, a2, c2, off = _args(q)
    gemv = nf4_matmul.use_gemv(m, k, None)
    w64, g64 = (q.dequantize(torch.float32 if gemv and nf4_matmul.uses_fma(m, n, k, d) else dtype).double()
                for d in ("fwd", "bwd"))
    x = torch.randn(m, k, generator=g).to(DEVICE, dtype)
    b = torch.randn(n, generator=g).to(DEVICE) if bias else None
    y = nf4_matmul.linear(x, p, a, s, bs, b, a2, c2, off)
    expected = x.double() @ w64.T + (0 if b is None else b.to(dtype).double())
    assert y.dtype == dtype and y.shape == (m, n) and rel_err(y, expected) < TOL[dtype]
    gy = torch.randn(m, n, generator=g).to(DEVICE, dtype)
    gx = nf4_matmul.linear_backward(gy, p, a, s, bs, a2, c2, off)
    assert gx.dtype == dtype and gx.shape == (m, k) and rel_err(gx, gy.double() @ g64) < TOL[dtype]


@settings(max_examples=20)
@given(m=st.integers(1, 16), n=st.integers(1, 150), k32=st.integers(1, 12), blocksize=st.sampled_from([32, 64, 128]),
       nested=st.booleans(), bias=st.booleans(), dtype=PROPERTY_DTYPES, fma_max=st.sampled_from([None, 0, 4]),
       seed=st.integers(0, 2**16))
def test_property_gemv_both_directions(m, n, k32, blocksize, nested, bias, dtype, fma_max, seed):
    """The GEMV kernels forced, at every M up to 16 and K a multiple of 32 (odd N, K not a multiple
    of the block size), with the FMA / tl.dot choice as shipped or overridden (0: the dot always;
    4: FMAs up to 4 tokens): against float64 of W in the dtype the kernel multiplies it in."""
    k = 32 * k32
    q, g = _property_weight(n, k, blocksize, nested, seed)
    p, a, s, bs, a2, c2, off = _args(q)
    with pytest.MonkeyPatch.context() as patch:
        if fma_max is not None:
            patch.setattr(nf4_matmul, "FMA_MAX_M", fma_max)
        w64, g64 = (q.dequantize(torch.float32 if nf4_matmul.uses_fma(m, n, k, d) else dtype).double()
                    for d in ("fwd", "bwd"))
        x = torch.randn(m, k, generator=g).to(DEVICE, dtype)
        b = torch.randn(n, generator=g).to(DEVICE) if bias else None
        y = nf4_matmul.linear(x, p, a, s, bs, b, a2, c2, off, strategy="gemv")
        gy = torch.randn(m, n, generator=g).to(DEVICE, dtype)
        gx = nf4_matmul.linear_backward(gy, p, a, s, bs, a2, c2, off, strategy="gemv")
    expected = x.double() @ w64.T + (0 if b is None else b.to(dtype).double())
    assert y.dtype == dtype and y.shape == (m, n) and rel_err(y, expected) < TOL[dtype]
    assert gx.dtype == dtype and gx.shape == (m, k) and rel_err(gx, gy.double() @ g64) < TOL[dtype]
