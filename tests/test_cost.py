"""The cost model alone: symbolic sizes, the op-time model, the liveness simulation on hand-built
graphs whose peaks are worked out by hand, and the longest-sequence solver at its boundary."""

from __future__ import annotations

import sympy
import torch
import torch.fx
from torch._dynamo.source import ConstantSource
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.experimental.symbolic_shapes import DimDynamic, ShapeEnv

from lowmem_compile.cost.liveness import longest_fitting, peak_at, shape_hints, simulate_step
from lowmem_compile.cost.sizes import storage_root, sym_bytes, tensor_bytes
from lowmem_compile.cost.timing import CPU, H200, is_fusible, node_flops, node_time

aten = torch.ops.aten


def _symbolic_mode(hint: int):
    env = ShapeEnv()
    sym = env.create_symbol(hint, source=ConstantSource("seq"), dynamic_dim=DimDynamic.DYNAMIC)
    return FakeTensorMode(shape_env=env), env.create_symintnode(sym, hint=hint), sym


def test_sizes_symbolic_and_concrete():
    mode, seq, sym = _symbolic_mode(37)
    with mode:
        t = torch.empty(3, seq, 5, dtype=torch.bfloat16)
        u = torch.empty(4, 6)
    assert sym_bytes(t) == 30 * sym
    assert tensor_bytes(t) == 3 * 37 * 5 * 2
    assert sym_bytes(u) == 96 and tensor_bytes(u) == 96


class _Builder:
    """A tiny FX graph with fake values, so the simulation reads real metadata."""

    def __init__(self, mode: FakeTensorMode) -> None:
        self.mode, self.graph = mode, torch.fx.Graph()

    def input(self, name: str, val: torch.Tensor) -> torch.fx.Node:
        node = self.graph.placeholder(name)
        node.meta["val"] = val
        return node

    def op(self, target, *args) -> torch.fx.Node:
        node = self.graph.call_function(target, args)
        vals = torch.fx.node.map_arg(args, lambda n: n.meta["val"])
        with self.mode:
            node.meta["val"] = target(*vals)
        return node

    def module(self, *outputs) -> torch.fx.GraphModule:
        self.graph.output(list(outputs))
        return torch.fx.GraphModule(torch.nn.Module(), self.graph)


def _step(mode, m, k):
    """fw: a = x*2; b = a+1; v = b.view(-1); c = v.sum() -> (c | saved b).  bw: d = t*b -> d."""
    with mode:
        x_val, t_val = torch.empty(m, k), torch.empty(())
    fwb = _Builder(mode)
    x = fwb.input("x", x_val)
    a = fwb.op(aten.mul.Tensor, x, 2.0)
    b = fwb.op(aten.add.Tensor, a, 1.0)
    v = fwb.op(aten.view.default, b, [-1])
    c = fwb.op(aten.sum.default, v)
    b.name = "b"
    fw = fwb.module(c, b)
    bwb = _Builder(mode)
    saved = bwb.input("b", b.meta["val"])
    tangent = bwb.input("tangents_1", t_val)
    d = bwb.op(aten.mul.Tensor, tangent, saved)
    bw = bwb.module(d)
    return fw, bw


def test_liveness_by_hand():
    m, k = 8, 16
    A = m * k * 4
    fw, bw = _step(FakeTensorMode(), m, k)
    eager = simulate_step(fw, bw, 1, fused=False)
    assert eager.resident == A
    assert eager.saved == A
    assert eager.forward_peak == 2 * A  # a and b live together while b is computed
    assert eager.backward_peak == 4 + A + 4 + A  # held loss, saved b, tangent, d
    assert eager.peak == A + 2 * A + 8
    fused = simulate_step(fw, bw, 1, fused=True)
    assert fused.forward_peak == A + 4  # a is fused into b; then b and the loss
    # the view shares b's storage
    view = [n for n in fw.graph.nodes if n.target is aten.view.default][0]
    assert storage_root(view).name == "b"


def test_liveness_symbolic_matches_concrete():
    mode, seq, sym = _symbolic_mode(24)
    fw, bw = _step(mode, seq, 16)
    symbolic = simulate_step(fw, bw, 1, fused=False, symbolic=True)
    hints = shape_hints(fw)
    assert hints == {sym: 24}
    assert peak_at(symbolic.peak_exprs, hints) == symbolic.peak
    assert symbolic.saved_expr == 64 * sym
    for n in (1, 7, 24, 1000):
        concrete = simulate_step(*_step(FakeTensorMode(), n, 16), 1, fused=False)
        assert peak_at(symbolic.peak_exprs, {sym: n}) == concrete.peak


def test_longest_fitting_boundary():
    s, b = sympy.symbols("s0 s1", positive=True, integer=True)
    exprs = [1000 + 8 * s * b, 4 * s**2 + 100, sympy.Integer(5000)]
    hints = {s: 512, b: 3}
    for budget in (5000, 6001, 10**6, 123_456_789):
        sym, n = longest_fitting(exprs, budget, hints)
        assert sym == s
        at = lambda length: peak_at(exprs, {s: length, b: 3})  # noqa: E731
        assert at(n) <= budget < at(n + 1)
    assert longest_fitting(exprs, 4999, hints) is None  # not even one token fits
    assert longest_fitting([sympy.Integer(10)], 100, {}) is None  # static shapes: nothing to solve


def test_time_model_orders_ops():
    from torch.fx.experimental.proxy_tensor import make_fx

    def f(x, w):
        return torch.relu(x @ w).sum()

    x, w = torch.randn(64, 128), torch.randn(128, 256)
    gm = make_fx(f, tracing_mode="fake")(x, w)
    nodes = {n.target: n for n in gm.graph.nodes if n.op == "call_function"}
    mm, relu, total = nodes[aten.mm.default], nodes[aten.relu.default], nodes[aten.sum.default]
    assert node_flops(mm) == 2 * 64 * 128 * 256
    assert node_flops(relu) == 0
    assert is_fusible(relu) and is_fusible(total) and not is_fusible(mm)
    for rates in (CPU, H200):
        assert node_time(mm, rates) > node_time(relu, rates) > 0
    # on the H200 an fp32 mm is bound by the fp32 matmul rate, not by its bytes
    assert node_time(mm, H200) == 2 * 64 * 128 * 256 / H200.matmul_flops_32bit
