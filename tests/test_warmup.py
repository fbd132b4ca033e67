"""The kernel warm-up (lowmem_compile/warmup.py): which sites it finds, that running one touches
nothing of the step's (parameters' gradients, random streams), and on CUDA that it leaves the
first real call nothing to compile."""

from __future__ import annotations

import pytest
import torch

import lowmem_compile
from lowmem_compile import warmup

from .models import batch, tiny_model


class _Spy(lowmem_compile.GraphPass):
    """Keeps the graph as the built-in passes left it, and its example inputs."""

    name = "spy"

    def __call__(self, gm, ctx):
        self.gm, self.example_inputs = gm, list(ctx.example_inputs)


def _lowered_graph(layers: int = 3):
    model = tiny_model("llama", num_hidden_layers=layers)
    lowmem_compile.quantize_(model)
    spy = _Spy()
    compiled = torch.compile(model, backend="lowmem", options={"inner": "eager", "passes": [spy]})
    compiled(**batch()).loss.backward()
    return model, spy


def _count(gm, name):
    return sum(1 for n in gm.graph.nodes if n.op == "call_function" and warmup.op_name(n.target) == f"lowmem::{name}")


def test_each_distinct_site_once_with_graph_inputs_real_and_the_rest_fake():
    model, spy = _lowered_graph(layers=3)
    found = warmup.sites(spy.gm, spy.example_inputs)
    names = [warmup.op_name(op) for op, _, _ in found]
    assert _count(spy.gm, "attention") == 3 and names.count("lowmem::attention") == 1  # three layers alike: one site
    linears = _count(spy.gm, "nf4_linear") + _count(spy.gm, "nf4_dequantize")
    nf4_sites = sum(name in ("lowmem::nf4_linear", "lowmem::nf4_dequantize") for name in names)
    assert linears == 3 * 7 and 1 <= nf4_sites < 7  # per layer: q/o, k/v, gate/up alike; down apart
    assert names.count("lowmem::linear_cross_entropy") == 1
    params = {id(p) for p in model.parameters()} | {id(b) for b in model.buffers()}
    for _, args, kwargs in found:
        tensors = [x for x in torch.utils._pytree.tree_leaves((args, kwargs)) if isinstance(x, torch.Tensor)]
        assert tensors
        for x in tensors:  # a weight is the model's own tensor; an activation a fake one
            assert isinstance(x, torch._subclasses.FakeTensor) or id(x) in params or not x.requires_grad


def test_running_a_site_leaves_the_steps_gradients_and_random_streams_alone():
    model, spy = _lowered_graph(layers=2)
    model.zero_grad(set_to_none=True)
    before = torch.random.get_rng_state()
    generator = torch.Generator("cpu").manual_seed(0)
    found = warmup.sites(spy.gm, spy.example_inputs)
    for op, args, kwargs in found:
        warmup.run_site(op, args, kwargs, torch.device("cpu"), generator)
    assert torch.equal(torch.random.get_rng_state(), before)
    assert all(p.grad is None for p in model.parameters())
    assert generator.initial_seed() == 0 and len(found) >= 3


def test_a_symbolic_site_is_refused_not_guessed():
    from torch._subclasses import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import ShapeEnv

    mode = FakeTensorMode(shape_env=ShapeEnv())
    x = mode.from_tensor(torch.randn(4, 8), symbolic_context=None)
    sym = mode.shape_env.create_unbacked_symint()
    with mode:
        y = torch.empty(sym, 8)
    with pytest.raises(ValueError, match="symbolic sizes"):
        warmup.run_site(torch.ops.aten.add.Tensor, (y, x), {}, torch.device("cpu"), torch.Generator())


def test_the_report_says_what_was_warmed_and_what_was_left():
    from lowmem_compile.report import GraphReport, Report, WarmupStats

    reason = "lowmem::attention: 3.00 GiB of example values, over 25% of the free memory"
    stats = warmup.Warmup(sites=3, warmed=2, seconds=1.234, skipped=[reason]).join()
    report = Report(graphs=[GraphReport(index=0, nodes=1)])
    report.graphs[0].add("warmup", stats)
    assert report.to_dict()["warmup"] == {"sites": 3, "warmed": 2, "seconds": 1.23,
                                          "skipped": [f"left to compile on first use: {reason}"],
                                          "pinned_bytes": 0, "pin_seconds": 0.0, "waited_seconds": 0.0}
    text = str(report)
    assert "2 of 3 sites (1.2 s;" in text and f"[warmup] left to compile on first use: {reason}" in text
    assert "pinned ahead" not in text
    # the parked plan's host blocks, pinned beside the compile, merge into the same section
    report.graphs[0].add("warmup", WarmupStats(pinned_bytes=3 * 2**30, pin_seconds=1.5))
    assert report.to_dict()["warmup"]["pinned_bytes"] == 3 * 2**30 and report.to_dict()["warmup"]["sites"] == 3
    assert "host memory pinned ahead" in str(report) and "(1.5 s beside the compile)" in str(report)


@pytest.mark.gpu
def test_after_the_warmup_the_first_real_call_compiles_nothing(monkeypatch):
    """A fresh attention form (window 96: not used elsewhere in the tests) warmed through the
    thread; the same call made for real afterwards finds every kernel compiled."""
    import triton.compiler

    compiles = []
    original = triton.compiler.compile

    def counted(src, *args, **kwargs):
        compiles.append(getattr(src, "name", "?"))
        return original(src, *args, **kwargs)

    monkeypatch.setattr(triton.compiler, "compile", counted)
    from torch._subclasses import FakeTensorMode

    q = torch.randn(1, 4, 1000, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(1, 2, 1000, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(1, 2, 1000, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    form = dict(causal=True, scale=128**-0.5, kv_bits=8, window=96, softcap=0.0)
    op = torch.ops.lowmem.attention.default
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        fakes = tuple(mode.from_tensor(t) for t in (q, k, v))
    done = warmup.Warmup(sites=1)
    warmup._warm(done, [(op, (*fakes, None, None), form)], torch.device("cuda"))
    assert done.warmed == 1 and not done.skipped and compiles, (done, compiles)
    compiles.clear()
    out = op(q, k, v, None, None, **form)[0]
    out.backward(torch.randn_like(out))
    torch.cuda.synchronize()
    assert compiles == []
