"""The cost model alone: symbolic sizes, the op-time model, the liveness simulation on hand-built
graphs whose peaks are worked out by hand, and the longest-sequence solver at its boundary."""

from __future__ import annotations

import math

import sympy
import torch
import torch.fx
from torch._dynamo.source import ConstantSource
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.experimental.symbolic_shapes import DimDynamic, ShapeEnv

from lowmem_compile.cost.liveness import longest_fitting, peak_at, shape_hints, simulate_step
from lowmem_compile.cost.sizes import storage_root, sym_bytes, tensor_bytes
from lowmem_compile.cost.timing import CPU, H200, is_fusible, node_flops, node_time, recompute_time

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


def test_held_outputs_counted_and_freed():
    """A logits-like user output is held through the backward by default; `peak_outputs_freed` is the
    peak of a caller that keeps only the loss."""
    m, k = 8, 16
    A = m * k * 4
    mode = FakeTensorMode()
    with mode:
        x_val, t_val = torch.empty(m, k), torch.empty(())
    fwb = _Builder(mode)
    x = fwb.input("x", x_val)
    y = fwb.op(aten.mul.Tensor, x, 3.0)  # returned to the caller, not used by the loss
    b = fwb.op(aten.add.Tensor, x, 1.0)
    c = fwb.op(aten.sum.default, b)
    b.name = "b"
    fw = fwb.module(c, y, b)
    bwb = _Builder(mode)
    saved = bwb.input("b", b.meta["val"])
    tangent = bwb.input("tangents_1", t_val)
    bw = bwb.module(bwb.op(aten.mul.Tensor, tangent, saved))
    memory = simulate_step(fw, bw, 2, fused=False)
    assert memory.held == A + 4  # y and the loss
    assert memory.forward_peak == 2 * A + 4  # y, b, then the loss
    assert memory.backward_peak == (A + 4) + A + 4 + A  # held y and loss, saved b, tangent, grad
    assert memory.peak == A + 3 * A + 8
    assert memory.peak_outputs_freed == A + 2 * A + 4


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


def _bf16_chain_graph(mode, m, k, n, through_view):
    """x (bf16) -> fp32 -> *2 -> +1 -> bf16 [-> view] -> mm with w: an RMSNorm/LoRA-like prologue."""
    with mode:
        x_val, w_val = torch.empty(m, k, dtype=torch.bfloat16), torch.empty(k, n, dtype=torch.bfloat16)
    b = _Builder(mode)
    x, w = b.input("x", x_val), b.input("w", w_val)
    up = b.op(torch.ops.prims.convert_element_type.default, x, torch.float32)
    y = b.op(aten.add.Tensor, b.op(aten.mul.Tensor, up, 2.0), 1.0)
    down = b.op(torch.ops.prims.convert_element_type.default, y, torch.bfloat16)
    if through_view:
        down = b.op(aten.view.default, down, [m, k])
    return b, b.op(aten.mm.default, down, w)


def test_fused_pointwise_chain_adds_no_peak():
    """With Inductor a pointwise chain (dtype casts included) is one kernel: only its last value,
    which a matmul reads, exists; the fp32 intermediates (2x the input each) never do. Also through a
    view: a reshape between the chain and the matmul does not make the chain's output virtual."""
    m, k, n = 64, 32, 48
    mode = FakeTensorMode()
    for through_view in (False, True):
        b, mm = _bf16_chain_graph(mode, m, k, n, through_view)
        fw = b.module(mm)
        bwb = _Builder(mode)
        bw = bwb.module(bwb.input("tangents_1", mm.meta["val"]))
        fused = simulate_step(fw, bw, 1, fused=True)
        assert fused.forward_peak == m * k * 2 + m * n * 2  # the bf16 matmul input, then its output
        eager = simulate_step(fw, bw, 1, fused=False)
        assert eager.forward_peak == m * k * 4 * 2  # eagerly, two fp32 intermediates at once
    assert is_fusible(next(iter(mm.all_input_nodes)))  # the view


def _residual_stack(mode, layers: int, m: int, k: int) -> torch.fx.GraphModule:
    """h <- h + (h * 2) @ w_i for each layer, then sum(h): a residual stream whose adds each have two
    pointwise readers (the next layer's scaling and the next add), as in every decoder."""
    b = _Builder(mode)
    h = b.input("x", _fake(mode, m, k))
    for i in range(layers):
        w = b.input(f"w{i}", _fake(mode, k, k))
        h = b.op(aten.add.Tensor, h, b.op(aten.mm.default, b.op(aten.mul.Tensor, h, 2.0), w))
    return b.module(b.op(aten.sum.default, h))


def test_fused_residual_chain_is_stored_not_held():
    """Inductor stores a residual add once its inlined expression reads too many buffers, so the
    forward peak of a residual stack does not grow with depth. Inlining without that bound kept
    every layer's matmul output live to the last add (the cause of a 1.78x over-prediction at 32
    layers on the GPU)."""
    m, k = 64, 32
    mode = FakeTensorMode()
    with mode:
        t_val = torch.empty(())
    peaks = []
    for layers in (16, 32, 64):  # the first stored add reads the resident input: deeper ones read a stored add
        fw = _residual_stack(mode, layers, m, k)
        bwb = _Builder(mode)
        bw = bwb.module(bwb.op(aten.mul.Tensor, bwb.input("tangents_1", t_val), 2.0))
        peaks.append(simulate_step(fw, bw, 1, fused=True).forward_peak)
    activation = m * k * 4
    assert peaks[0] == peaks[1] == peaks[2], peaks  # constant in depth
    # bounded by the inlining limit: at most 8 stored inputs of the expression at once, plus outputs
    assert activation <= peaks[0] <= 10 * activation


def _silu_backward_kernel(mode, m, k, n):
    """The MLP piece's backward under LoRA in small: gate and up each the sum of two matmul outputs,
    h = silu(gate) * up (read by a matmul), the input gradient the sum of two more, and the gradients
    of up and gate. The graph interleaves h's matmul with the group, as the partitioner does."""
    b = _Builder(mode)
    x, g = b.input("x", _fake(mode, m, k)), b.input("g", _fake(mode, m, k))
    w = [b.input(f"w{i}", _fake(mode, k, n)) for i in range(6)]
    wo = b.input("wo", _fake(mode, n, k))
    gate = b.op(aten.add.Tensor, b.op(aten.mm.default, x, w[0]), b.op(aten.mm.default, x, w[1]))
    up = b.op(aten.add.Tensor, b.op(aten.mm.default, x, w[2]), b.op(aten.mm.default, x, w[3]))
    s = b.op(aten.sigmoid.default, gate)
    silu = b.op(aten.mul.Tensor, gate, s)
    h = b.op(aten.mul.Tensor, silu, up)
    out = b.op(aten.mm.default, h, wo)
    dh = b.op(aten.add.Tensor, b.op(aten.mm.default, g, w[4]), b.op(aten.mm.default, g, w[5]))
    d_up = b.op(aten.mul.Tensor, dh, silu)
    d_gate = b.op(aten.mul.Tensor, b.op(aten.mul.Tensor, dh, up), s)
    return b.module(out, d_up, d_gate)


def test_fused_kernel_holds_its_inputs_and_outputs_at_once():
    """One Inductor kernel reads the six matmul outputs and writes h, d_up and d_gate: nine
    [m, n] buffers live together, while h's matmul waits for the kernel. Walked node by node (h
    freed after its matmul, before d_up and d_gate exist) the peak was eight and the matmul's
    [m, k] output. Also with a symbolic m."""
    k, n = 4, 32
    for symbolic in (False, True):
        mode, m, sym = _symbolic_mode(64) if symbolic else (FakeTensorMode(), 64, None)
        fw = _silu_backward_kernel(mode, m, k, n)
        bwb = _Builder(mode)
        bw = bwb.module(bwb.op(aten.mul.Tensor, bwb.input("tangents_1", _fake(mode, m, k)), 2.0))
        memory = simulate_step(fw, bw, 3, fused=True, symbolic=symbolic)
        piece = 64 * n * 4
        assert memory.forward_peak == 9 * piece  # not 8 * piece + 64 * k * 4
        d_gate = list(fw.graph.nodes)[-2]
        assert memory.peak_values[0] == (f"@{d_gate.name}", 0)  # the kernel's last member
        if symbolic:
            assert peak_at(memory.peak_exprs, {sym: 64}) == memory.peak


def _gated(x, w0, w1, v0, v1):
    """g = silu-like gate product, read by a matmul (so stored) and by a pointwise scaling that a
    second matmul reads: the adapter's scaling of a gradient in the MLP piece's backward."""
    g = torch.sigmoid(x @ w0) * (x @ w1)
    s = g * 2.0
    return g.view(-1, g.shape[-1]) @ v0, s.view(-1, s.shape[-1]) @ v1


def test_fused_kernel_writes_a_stored_value_and_its_pointwise_reader_as_inductor_does():
    """Inductor writes g and its scaling s in one kernel (a reader of a stored loop node fuses into
    it), so both matmul outputs that g reads, g and s are live at once: the walk's forward peak is the
    peak of the buffers Inductor's CPU code holds (read as bench/inductor_live_buffers.py reads a
    log), within 1%. Joining only through inlined nodes, the walk ran s apart, after the matmul
    outputs were freed: 3 of the 4 [m, n] buffers. Also with g read through a view, as the MLP's is."""
    from torch._inductor.utils import run_and_get_code
    from torch.fx.experimental.proxy_tensor import make_fx

    from bench.inductor_live_buffers import live_most

    m, k, n = 256, 8, 512
    torch.manual_seed(0)
    for x in (torch.randn(m, k), torch.randn(1, m, k)):
        args = [x, torch.randn(k, n), torch.randn(k, n), torch.randn(n, k), torch.randn(n, k)]
        with torch._inductor.config.patch(allow_buffer_reuse=False, inplace_buffers=False):
            _, code = run_and_get_code(torch.compile(_gated, backend="inductor", fullgraph=True), *args)
        [(_, inductor)] = live_most(code[-1], lambda shape, dtype: math.prod(shape) * dtype.itemsize)
        assert inductor == 4 * m * n * 4  # the two matmul outputs, g and s
        fw = make_fx(_gated, tracing_mode="fake")(*args)
        mode = FakeTensorMode()
        bwb = _Builder(mode)
        bw = bwb.module(bwb.input("tangents_1", _fake(mode, 1)))
        walk = simulate_step(fw, bw, 2, fused=True).forward_peak
        assert abs(walk - inductor) <= 0.01 * inductor, (walk, inductor)


def test_recompute_time_of_fused_pointwise_is_one_read():
    """Twenty pointwise ops all reading one saved 64 MiB value (Llama-3-8B at 8192 tokens): fused
    into the backward's kernel they cost one read of it, ~16 us on the H200, not a read (or a
    write) per op."""
    mode = FakeTensorMode()
    with mode:
        saved_val = torch.empty(8192, 4096, dtype=torch.bfloat16)
    b = _Builder(mode)
    saved = b.input("saved", saved_val)
    chain = [b.op(torch.ops.prims.convert_element_type.default, saved, torch.float32)]
    for i in range(19):
        chain.append(b.op(aten.mul.Tensor if i % 2 else aten.add.Tensor, chain[-1], saved))
    seconds = recompute_time(chain, H200)
    assert seconds == 8192 * 4096 * 2 / H200.bandwidth
    assert 1e-6 < seconds < 1e-4
    # a matmul among them is charged as a matmul; its output is one more read for the fused ops
    w = b.input("w", _fake(mode, 4096, 4096))
    mm = b.op(aten.mm.default, chain[-1], w)
    tail = b.op(aten.mul.Tensor, mm, 2.0)
    flops = 2 * 8192 * 4096 * 4096
    expected = flops / H200.flops_rate(torch.float32) + (8192 * 4096 * 2 + 8192 * 4096 * 4) / H200.bandwidth
    assert abs(recompute_time(chain + [mm, tail], H200) - expected) < 1e-12
    # the old per-op charge would have moved 20 * (read + write) of the chain
    assert node_time(chain[1], H200) == (8192 * 4096 * 4 + 8192 * 4096 * 2) / H200.bandwidth


def _fake(mode, *shape):
    with mode:
        return torch.empty(*shape, dtype=torch.float32)


def test_fusible_covers_casts_fills_and_gathers():
    """On graphs decomposed as the partitioner sees them (Inductor's table: casts are prims ops)."""
    from torch._inductor.decomposition import select_decomp_table
    from torch.fx.experimental.proxy_tensor import make_fx

    def f(x, idx):
        z = torch.zeros_like(x)
        return torch.log_softmax(x.float(), -1).gather(1, idx) + z[:, :1]

    trace = make_fx(f, decomposition_table=select_decomp_table(), tracing_mode="fake")
    gm = trace(torch.randn(4, 8, dtype=torch.bfloat16), torch.zeros(4, 1, dtype=torch.long))
    by_target = {n.target: n for n in gm.graph.nodes if n.op == "call_function"}
    for target in (torch.ops.prims.convert_element_type.default, aten.gather.default):
        assert is_fusible(by_target[target]), target
    fills = [n for t, n in by_target.items() if t.overloadpacket in (aten.zeros_like, aten.full, aten.full_like)]
    assert fills and all(is_fusible(n) for n in fills)


def test_host_inputs_are_not_resident_on_an_accelerator():
    """A step on a device does not hold its host-memory inputs (an embedding table kept on the host);
    a CPU step holds all of them."""
    mode = FakeTensorMode()
    m, k = 8, 16
    for device, expected in (("cuda", m * k * 4), ("cpu", 2 * m * k * 4)):
        with mode:
            x_val, table_val = torch.empty(m, k, device=device), torch.empty(m, k)
        b = _Builder(mode)
        x, table = b.input("x", x_val), b.input("table", table_val)
        s = b.op(aten.sum.default, b.op(aten.mul.Tensor, x, 2.0))
        fw = b.module(s, x)
        bwb = _Builder(mode)
        bwb.input("tangents_1", s.meta["val"])
        bw = bwb.module(bwb.op(aten.mul.Tensor, bwb.graph.find_nodes(op="placeholder")[0], 1.0))
        assert table.op == "placeholder"
        assert simulate_step(fw, bw, 1, fused=False).resident == expected, device


def _one_op_step(mode, target, args, kwargs):
    """fw: the op on fresh inputs, every output returned (held by the caller); bw: empty."""
    fwb = _Builder(mode)
    nodes = [fwb.input(f"in{i}", a) if isinstance(a, torch.Tensor) else a for i, a in enumerate(args)]
    node = fwb.graph.call_function(target, tuple(nodes), kwargs)
    with mode:
        node.meta["val"] = target(*args, **kwargs)
    fw = fwb.module(node)
    bwb = _Builder(mode)
    bw = bwb.module(bwb.input("tangents_1", torch.empty(())))
    return simulate_step(fw, bw, 1, fused=False), node


def _bytes(val) -> int:
    return sum(tensor_bytes(v) for v in val) if isinstance(val, (tuple, list)) else tensor_bytes(val)


def test_op_workspace_counts_at_its_step():
    """Our ops' own buffers, which the graph cannot show, count at the op beside its outputs:
    nf4_linear's dequantized weight, attention's 16-bit K/V at 4/8 bits (none at 16)."""
    import lowmem_compile.ops  # noqa: F401  (declares the ops and their workspaces)

    mode = FakeTensorMode()
    m, n, k = 8, 48, 64
    with mode:
        x = torch.empty(m, k, dtype=torch.bfloat16)
        packed, absmax = torch.empty(n * k // 2, dtype=torch.uint8), torch.empty(n * k // 64)
    memory, node = _one_op_step(mode, torch.ops.lowmem.nf4_linear.default, (x, packed, absmax, [n, k], 64), {})
    assert memory.forward_peak == _bytes(node.meta["val"]) + n * k * 2
    assert any(name.endswith("(workspace)") and b == n * k * 2 for name, b in memory.peak_values)

    b, hq, hkv, s, d = 1, 4, 2, 40, 64
    with mode:
        q = torch.empty(b, hq, s, d, dtype=torch.bfloat16)
        kv = [torch.empty(b, hkv, s, d, dtype=torch.bfloat16) for _ in range(2)]
    for bits, buffers in ((8, 2 * b * hkv * s * d * 2), (4, 2 * b * hkv * s * d * 2), (16, 0)):
        kwargs = {"causal": True, "scale": 0.125, "kv_bits": bits}
        memory, node = _one_op_step(mode, torch.ops.lowmem.attention.default, (q, *kv), kwargs)
        assert memory.forward_peak == _bytes(node.meta["val"]) + buffers, bits


# --- properties (hypothesis) ------------------------------------------------------------------------

from types import SimpleNamespace  # noqa: E402

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.uint8, torch.int64, torch.float64, torch.bool]


@given(shape=st.lists(st.integers(0, 9), min_size=0, max_size=4), dtype=st.sampled_from(DTYPES),
       dim=st.integers(0, 3), hint=st.integers(2, 50), other=st.integers(1, 10**6))
def test_property_sizes(shape, dtype, dim, hint, other):
    """tensor_bytes is numel x itemsize; sym_bytes is the same product with a symbolic dimension,
    so it evaluates to tensor_bytes at the hint and scales linearly in that dimension."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    with FakeTensorMode():
        t = torch.empty(shape, dtype=dtype)
    assert tensor_bytes(t) == math.prod(shape) * itemsize == sym_bytes(t)
    if not shape:
        return
    dim = dim % len(shape)
    mode, seq, sym = _symbolic_mode(hint)
    with mode:
        u = torch.empty([seq if i == dim else s for i, s in enumerate(shape)], dtype=dtype)
    rest = math.prod(s for i, s in enumerate(shape) if i != dim) * itemsize
    assert tensor_bytes(u) == hint * rest
    assert sympy.expand(sym_bytes(u) - sym * rest) == 0
    assert sym_bytes(u).subs(sym, other) == other * rest


@given(m=st.integers(1, 300), k=st.integers(1, 64), hint=st.integers(2, 300))
def test_property_symbolic_liveness_is_the_concrete_one(m, k, hint):
    """The peak expressions of a graph traced with a symbolic length give, at any length, the peak
    of the same graph traced at that length (fused and not). Hints from 2: a size-1 hint is
    specialized, as Dynamo does."""
    mode, seq, sym = _symbolic_mode(hint)
    fw, bw = _step(mode, seq, k)
    for fused in (False, True):
        symbolic = simulate_step(fw, bw, 1, fused=fused, symbolic=True)
        concrete = simulate_step(*_step(FakeTensorMode(), m, k), 1, fused=fused)
        assert peak_at(symbolic.peak_exprs, {sym: m}) == concrete.peak
        assert symbolic.saved_expr.subs(sym, m) == concrete.saved


@given(a=st.integers(0, 10**4), b=st.integers(0, 64), c=st.integers(0, 4), batch=st.integers(1, 8),
       budget=st.integers(1, 10**9))
def test_property_longest_fitting_is_the_boundary(a, b, c, batch, budget):
    """For peaks polynomial in the length with non-negative coefficients (what a step's memory is),
    the answer n fits and n + 1 does not; None exactly when one token does not fit."""
    s, bs = sympy.symbols("s0 s1", positive=True, integer=True)
    exprs = [a + b * s * bs, c * s**2 + a // 2, sympy.Integer(a)]
    at = lambda length: peak_at(exprs, {s: length, bs: batch})  # noqa: E731
    assume_growing = b * batch > 0 or c > 0
    answer = longest_fitting(exprs, budget, {s: 64, bs: batch})
    if at(1) > budget:
        assert answer is None
    elif assume_growing:
        sym, n = answer
        assert sym == s and at(n) <= budget < at(n + 1)


@settings(max_examples=200)
@given(peaks=st.lists(st.tuples(st.integers(100, 1000), st.integers(0, 20)), min_size=1, max_size=8),
       budgets=st.tuples(st.integers(1, 1100), st.integers(1, 1100)))
def test_property_lower_budget_never_chooses_a_higher_peak(peaks, budgets):
    """The planner's choice among any candidate plans: it fits the budget whenever one does, at the
    least added time; a lower budget never chooses a plan with a higher predicted peak."""
    from lowmem_compile.passes.remat import choose

    plans = [SimpleNamespace(name=f"p{i}", peak=p, added_seconds=t / 1000) for i, (p, t) in enumerate(peaks)]
    low, high = sorted(budgets)
    chosen = {}
    for budget in (low, high):
        plan, miss = choose(plans, budget)
        fitting = [p for p in plans if p.peak <= budget]
        if fitting:
            assert miss is None and plan.peak <= budget
            assert plan.added_seconds == min(p.added_seconds for p in fitting)
        else:
            assert "infeasible" in miss and plan.peak == min(p.peak for p in plans)
        chosen[budget] = plan
    assert chosen[low].peak <= chosen[high].peak
