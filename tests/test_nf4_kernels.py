"""NF4 kernels (Triton interpreter on the CPU, real kernels on CUDA) and the `nf4_linear` op against
the reference op. The dequant kernel must be bit-identical; matmuls are compared with a float64
product of the same dequantized weight: relative error < 2e-3 in fp16, < 1e-5 in fp32 (accumulation
order only). bf16 matmuls through tl.dot run only on the GPU (the interpreter's bf16 dot is wrong); the
one-row GEMV has no dot, so its bf16 path is tested here too."""

import pytest
import torch

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
@pytest.mark.parametrize("shape,blocksize", [((24, 96), 64), ((7, 37), 32), ((16, 256), 128), ((64, 128), 64)])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_dequant_kernel_bit_exact(nested, shape, blocksize, dtype):
    q = _weight(*shape, nested, blocksize)
    p, a, s, b, a2, c2, off = _args(q)
    assert torch.equal(nf4_matmul.dequantize(p, a, s, b, dtype, a2, c2, off), q.dequantize(dtype))


@pytest.mark.parametrize("nested", [False, True])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("lead,n,k,bias", [((3, 5), 48, 192, True), ((1,), 40, 1024, True), ((2, 40), 24, 128, False),
                                           ((9,), 20, 100, True)])
def test_linear_forward_and_backward(nested, dtype, lead, n, k, bias):
    """Shapes cover: GEMV (15 rows: tl.dot), GEMV with split reduction and bias (K=1024), dequant+matmul
    (80 tokens), K % 32 != 0 (dequant). The dequant shapes above cover partial and full programs."""
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


@pytest.mark.parametrize("decode", ["select", "table"])
@pytest.mark.parametrize("nested", [False, True])
@pytest.mark.parametrize("dtype,lead,n,k,bias", [
    (torch.float16, (1,), 37, 96, True),     # one row (FMA), odd N, K not a multiple of the K step
    (torch.bfloat16, (1, 1), 45, 160, True),  # one row in bf16 (no dot), leading dims
    (torch.float32, (2, 3), 21, 224, False),  # 6 rows (tl.dot), K % blocksize != 0
    (torch.float16, (16,), 50, 1088, True),   # 16 rows, split reduction + bias in the epilogue
    (torch.float32, (1,), 19, 2048, False),   # one row, many splits
])
def test_gemv_matches_reference(decode, nested, dtype, lead, n, k, bias, monkeypatch):
    """The GEMV kernels (M <= 16) in both directions against a float64 product of the dequantized W."""
    monkeypatch.setattr(nf4_matmul, "GEMV_MAX_M", 16)
    monkeypatch.setattr(nf4_matmul, "GEMV_BWD_MIN_NUMEL", 0)
    q = _weight(n, k, nested, 64 if k % 64 == 0 else 32)
    p, a, s, bs, a2, c2, off = _args(q)
    assert nf4_matmul._use_gemv(torch.Size(lead).numel(), k)
    w64 = q.dequantize(torch.float32).double()
    x = torch.randn(*lead, k, device=DEVICE, dtype=dtype)
    b = torch.randn(n, device=DEVICE) if bias else None
    y = nf4_matmul.linear(x, p, a, s, bs, b, a2, c2, off, decode=decode)
    expected = torch.nn.functional.linear(x.double(), w64, None if b is None else b.to(dtype).double())
    assert y.dtype == dtype and y.shape == (*lead, n)
    assert rel_err(y, expected) < TOL[dtype]
    g = torch.randn(*lead, n, device=DEVICE, dtype=dtype)
    gx = nf4_matmul.linear_backward(g, p, a, s, bs, a2, c2, off, decode=decode)
    assert gx.dtype == dtype and gx.shape == (*lead, k)
    assert rel_err(gx, g.double() @ w64) < TOL[dtype]


def test_gemv_bad_decode_raises():
    q = _weight(16, 64, False)
    with pytest.raises(ValueError, match="decode"):
        nf4_matmul.linear(torch.randn(1, 64, device=DEVICE), q.packed, q.absmax, q.shape, 64, decode="lut")


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
    q = _weight(1024, 4096, nested)
    p, a, s, bs, a2, c2, off = _args(q)
    assert torch.equal(nf4_matmul.dequantize(p, a, s, bs, torch.bfloat16, a2, c2, off), q.dequantize(torch.bfloat16))
    w64 = q.dequantize(torch.bfloat16).double()
    x = torch.randn(m, 4096, device="cuda", dtype=torch.bfloat16)
    assert rel_err(nf4_matmul.linear(x, p, a, s, bs, None, a2, c2, off), x.double() @ w64.T) < TOL[torch.bfloat16]
    g = torch.randn(m, 1024, device="cuda", dtype=torch.bfloat16)
    assert rel_err(nf4_matmul.linear_backward(g, p, a, s, bs, a2, c2, off), g.double() @ w64) < TOL[torch.bfloat16]
