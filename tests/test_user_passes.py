"""Passes and ops from outside the package: `options={"passes": [...]}`, `GraphPass`,
`CompileContext`, `define_op` with and without costs, and the worked example
(examples/fused_add_rmsnorm.py) against eager."""

from __future__ import annotations

import importlib
import operator
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

import lowmem_compile
from lowmem_compile import backend
from lowmem_compile.cost import liveness, timing
from lowmem_compile.options import Options
from lowmem_compile.passes.remat import RematPartitioner
from lowmem_compile.report import GraphReport

from .models import batch, rel_err, tiny_model, trainable_grads, twin

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1]))
from examples import fused_add_rmsnorm as example  # noqa: E402

EAGER = {"inner": "eager", "attention": "kv16"}


class _Block(torch.nn.Module):
    def __init__(self, op=None):
        super().__init__()
        self.up = torch.nn.Linear(16, 32)
        self.down = torch.nn.Linear(32, 16)
        self.op = op

    def forward(self, x):
        h = self.up(x)
        h = self.op(h) if self.op is not None else h.square()
        return x + self.down(h)


class _Stack(torch.nn.Module):
    def __init__(self, op=None, layers=2):
        super().__init__()
        self.layers = torch.nn.ModuleList(_Block(op) for _ in range(layers))

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x.pow(2).mean()


class SquareToMul(lowmem_compile.GraphPass):
    """`x.square()` -> `x * x`: the same values, another graph."""

    name = "square_to_mul"

    def __call__(self, gm, ctx):
        rewritten = 0
        for node in ctx.nodes(gm):
            if node.op == "call_method" and node.target == "square":
                with gm.graph.inserting_before(node):
                    mul = gm.graph.call_function(operator.mul, (node.args[0], node.args[0]))
                ctx.propagate(mul)
                ctx.inherit_provenance(node, mul)
                node.replace_all_uses_with(mul)
                gm.graph.erase_node(node)
                rewritten += 1
        return {"rewritten": rewritten, "skipped": ["nothing else to do"]}


class _Spy:
    """Not a GraphPass subclass, only its members: records the targets the graph calls."""

    def __init__(self, name="spy", before=None):
        self.name, self.before, self.seen = name, before, []

    def __call__(self, gm, ctx):
        self.seen.append([str(getattr(n.target, "__name__", n.target)) for n in gm.graph.nodes if n.op.startswith("call")])

    def uuid(self):
        return "spy-1"


def _train(model, x, options):
    compiled = torch.compile(model, backend="lowmem", options=options)
    loss = compiled(x)
    loss.backward()
    return loss


def test_user_pass_rewrites_matches_eager_and_reports(capsys):
    ref, model = _Stack(), _Stack()
    model.load_state_dict(ref.state_dict())
    x = torch.randn(4, 16)
    ref(x).backward()
    spy = _Spy()
    loss = _train(model, x, {**EAGER, "passes": [SquareToMul(), spy], "report": True})
    torch.testing.assert_close(loss, ref(x))
    for p, q in zip(ref.parameters(), model.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-6, atol=1e-7)
    assert "square" not in spy.seen[0] and spy.seen[0].count("mul") >= 2  # the spy ran after the rewrite
    d = lowmem_compile.last_report().to_dict()
    assert d["passes"] == {"square_to_mul": {"rewritten": 2, "skipped": ["nothing else to do"]}, "spy": {}}
    printed = capsys.readouterr().out
    assert "pass square_to_mul" in printed and "rewritten=2" in printed
    assert "[square_to_mul] nothing else to do" in printed


def test_inserted_nodes_get_fake_values_and_disabled_passes_do_not_run():
    """A pass that leaves its new node without `example_value` gets one by fake propagation (later
    passes and AOTAutograd's cache need it); `enabled(options)` False skips a pass and its entry."""

    class Lazy(SquareToMul):
        name = "lazy"

        def __call__(self, gm, ctx):
            node = next(n for n in gm.graph.nodes if n.op == "call_method" and n.target == "square")
            with gm.graph.inserting_before(node):
                mul = gm.graph.call_function(torch.mul, (node.args[0], node.args[0]))
            node.replace_all_uses_with(mul)
            gm.graph.erase_node(node)

    class Off(SquareToMul):
        name = "off"

        def enabled(self, options):
            return options.remat == "full"

    class Check(_Spy):
        def __call__(self, gm, ctx):
            self.seen.append([n.name for n in gm.graph.nodes if n.op.startswith("call") and "example_value" not in n.meta])

    check = Check("check")
    _train(_Stack(), torch.randn(4, 16), {**EAGER, "passes": [Lazy(), Off(), check]})
    assert check.seen == [[]]
    assert set(lowmem_compile.last_report().to_dict()["passes"]) == {"lazy", "check"}


def test_pass_runs_before_a_named_builtin_pass():
    """`before="fused_loss"` sees the cross-entropy the fused-loss pass then replaces; a pass placed
    after every built-in one sees the fused op."""
    head = torch.nn.Linear(16, 64, bias=False)
    labels = torch.randint(0, 64, (8,))
    early, late = _Spy("early", before="fused_loss"), _Spy("late")
    f = torch.compile(lambda h: F.cross_entropy(head(h).float(), labels), backend="lowmem",
                      options={"inner": "eager", "passes": [late, early]})
    f(torch.randn(8, 16, requires_grad=True)).backward()
    assert "cross_entropy" in early.seen[0] and "linear_cross_entropy" not in early.seen[0]
    assert "cross_entropy" not in late.seen[0] and any("linear_cross_entropy" in t for t in late.seen[0])
    assert lowmem_compile.last_report().to_dict()["loss"]["fused"] == 1


def test_passes_option_is_validated():
    contract = r"name.*__call__\(gm, ctx\).*uuid\(\)"
    with pytest.raises(ValueError, match=contract):
        Options.from_user({"passes": [object()]})
    with pytest.raises(ValueError, match="list of passes"):
        Options.from_user({"passes": SquareToMul()})
    with pytest.raises(ValueError, match="cannot import"):
        Options.from_user({"passes": ["no_such_module_xyz:P"]})
    with pytest.raises(ValueError, match="import string"):
        Options.from_user({"passes": ["examples.fused_add_rmsnorm"]})
    with pytest.raises(ValueError, match="before='nope'.*fused_loss"):
        Options.from_user({"passes": [_Spy(before="nope")]})
    with pytest.raises(ValueError, match="two passes are named"):
        Options.from_user({"passes": [_Spy(), _Spy()]})
    with pytest.raises(ValueError, match="built-in"):
        Options.from_user({"passes": [_Spy(name="attention")]})
    opts = Options.from_user({"passes": ["examples.fused_add_rmsnorm:FusedAddRMSNorm", SquareToMul()]})
    assert isinstance(opts.passes, tuple) and isinstance(opts.passes[0], example.FusedAddRMSNorm)
    hash(opts)  # still a frozen, hashable dataclass
    assert Options.from_user({"passes": []}).passes == ()


def test_failing_pass_names_the_pass_and_the_node():
    class Exploder(lowmem_compile.GraphPass):
        name = "exploder"

        def __call__(self, gm, ctx):
            for node in ctx.nodes(gm):
                if node.op == "call_method" and node.target == "square":
                    raise RuntimeError("boom")

    with pytest.raises(Exception, match=r"lowmem pass 'exploder' failed at node \w+ \(call_method square\) in layers\.0, File .*boom") as info:
        _train(_Stack(), torch.randn(4, 16), {**EAGER, "passes": [Exploder()]})
    cause = info.value
    while not isinstance(cause, lowmem_compile.PassError):
        cause = cause.__cause__ or cause.inner_exception
    assert cause.pass_name == "exploder" and f"node {cause.node} (call_method square)" in str(cause)
    assert "test_user_passes.py" in str(cause)  # the node's source line in the model


def test_failing_pass_without_ctx_nodes_is_found_in_the_traceback():
    class Sloppy(lowmem_compile.GraphPass):
        name = "sloppy"

        def __call__(self, gm, ctx):
            for node in gm.graph.nodes:
                if node.op == "call_method" and node.target == "square":
                    node.args[3]  # IndexError at this node

    with pytest.raises(Exception, match=r"lowmem pass 'sloppy' failed at node \w+ \(call_method square\).*IndexError"):
        _train(_Stack(), torch.randn(4, 16), {**EAGER, "passes": [Sloppy()]})


def test_a_pass_returning_junk_or_a_broken_graph_is_named():
    class Junk(lowmem_compile.GraphPass):
        name = "junk"

        def __call__(self, gm, ctx):
            return 3

    with pytest.raises(Exception, match="PassError: lowmem pass 'junk' returned int"):
        _train(_Stack(), torch.randn(4, 16), {**EAGER, "passes": [Junk()]})

    class Breaker(lowmem_compile.GraphPass):
        name = "breaker"

        def __call__(self, gm, ctx):
            node = next(n for n in gm.graph.nodes if n.op == "call_method" and n.target == "square")
            with gm.graph.inserting_before(node):
                gm.graph.call_function(torch.matmul, (node.args[0], node.args[0]))  # [4, 32] @ [4, 32]

    with pytest.raises(Exception, match="PassError: lowmem pass 'breaker' inserted node matmul.*example_value"):
        _train(_Stack(), torch.randn(4, 16), {**EAGER, "passes": [Breaker()]})


_EDITABLE = """
import lowmem_compile

class Edited(lowmem_compile.GraphPass):
    name = "edited"
    SCALE = {scale}

    def __call__(self, gm, ctx):
        return {{"scale": self.SCALE}}
"""


def test_editing_a_pass_changes_the_compile_cache_key(tmp_path, monkeypatch):
    """A pass's uuid (by default its file's hash) is in Options.cache_key, which the partitioner's
    uuid, AOTAutograd's cache key, holds: an edited pass misses the cache."""
    monkeypatch.syspath_prepend(str(tmp_path))
    module = tmp_path / "lowmem_edited_pass.py"
    module.write_text(textwrap.dedent(_EDITABLE.format(scale=1)))

    def partitioner_uuid(options):
        return RematPartitioner(Options.from_user(options), GraphReport(index=0, nodes=0)).uuid()

    spec = {"passes": ["lowmem_edited_pass:Edited"]}
    first = partitioner_uuid(spec)
    assert first == partitioner_uuid(spec)  # stable while nothing changes
    assert first != partitioner_uuid({})
    module.write_text(textwrap.dedent(_EDITABLE.format(scale=2)))
    importlib.reload(sys.modules["lowmem_edited_pass"])
    assert partitioner_uuid(spec) != first
    # a pass's place is part of the key too
    assert Options.from_user({"passes": [_Spy()]}).cache_key() != Options.from_user({"passes": [_Spy(before="fused_loss")]}).cache_key()


# ------------------------------------------------------------------------------------------ ops


def _tanh2_reference(x):
    return torch.tanh(x) * 2


def _tanh2_setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[0])


def _tanh2_backward(ctx, grad):
    (x,) = ctx.saved_tensors
    return grad * 2 * (1 - torch.tanh(x) ** 2)


def _define(name, **costs):
    return lowmem_compile.define_op(
        f"lowmem_tests::{name}", "(Tensor x) -> Tensor", reference=_tanh2_reference, fake=torch.empty_like,
        backward=_tanh2_backward, setup_context=_tanh2_setup, **costs,
    )  # fmt: skip


COSTED = _define("tanh2_costed", flops=lambda x: 7 * x.numel(), bytes_moved=lambda x: 3 * x.numel() * 4,
                 workspace=lambda x: [x.new_empty(x.shape[0], 128)])
PLAIN = _define("tanh2_plain")


class _Op(torch.nn.Module):
    def __init__(self, op):
        super().__init__()
        self.op = op

    def forward(self, x):
        return self.op(x)


def _plans(monkeypatch):
    made = []

    class Recording(RematPartitioner):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            made.append(self)

    monkeypatch.setattr(backend, "RematPartitioner", Recording)
    return made


@pytest.mark.parametrize("layers", ["off", "auto"])
def test_custom_op_with_costs_is_recomputed_and_without_is_not(monkeypatch, layers):
    """remat="full" recomputes everything inside a layer that the planner may recompute: the op that
    declares its cost is recomputed in the backward, the one that declares none is saved."""
    x = torch.randn(4, 16)
    for op, recomputed in ((COSTED, True), (PLAIN, False)):
        lowmem_compile.reset()
        made = _plans(monkeypatch)
        ref, model = _Stack(_Op(op)), _Stack(_Op(op))
        model.load_state_dict(ref.state_dict())
        ref(x).backward()
        _train(model, x, {"inner": "eager", "remat": "full", "layers": layers})
        for p, q in zip(ref.parameters(), model.parameters()):
            torch.testing.assert_close(q.grad, p.grad, rtol=1e-5, atol=1e-6)
        plans = [p for m in made for p in m.plans]
        in_bw = sum(n.target == op.default for p in plans for n in p.bw.graph.nodes)
        assert (in_bw > 0) == recomputed, (op, in_bw)
        saved_from_op = [n for p in plans for n in p.fw.graph.nodes
                         if n.target == op.default and n.name in p.saved_names]
        assert bool(saved_from_op) != recomputed
        d = lowmem_compile.last_report().to_dict()["custom_ops"]
        if recomputed:
            assert d == {"costed": 2, "conservative": 0, "notes": []}
        else:
            assert d["costed"] == 0 and d["conservative"] == 2
            assert d["notes"] == ["lowmem_tests::tanh2_plain: no cost declared (flops, bytes_moved): planned "
                                  "conservatively, never recomputed (saved where the backward needs it)"]
            assert "never recomputed" in str(lowmem_compile.last_report())


def test_declared_costs_reach_the_cost_model(monkeypatch):
    made = _plans(monkeypatch)
    _train(_Stack(_Op(COSTED), layers=1), torch.randn(4, 16), {"inner": "eager", "layers": "off"})
    node = next(n for n in made[0].plans[0].fw.graph.nodes if n.target == COSTED.default)
    assert timing.node_flops(node) == 7 * 4 * 32
    rates = timing.CPU
    assert timing.node_time(node, rates) == max(7 * 4 * 32 / rates.matmul_flops_32bit, 3 * 4 * 32 * 4 / rates.bandwidth)
    ws = liveness._workspace(node, liveness._Sizes(False))
    assert ws[0] == 4 * 128 * 4
    plain = [n for n in made[0].plans[0].fw.graph.nodes if n.target == PLAIN.default]
    assert not plain


def test_define_op_is_validated():
    with pytest.raises(ValueError, match="namespace::name"):
        lowmem_compile.define_op("nonamespace", "(Tensor x) -> Tensor", reference=_tanh2_reference, fake=torch.empty_like)
    with pytest.raises(ValueError, match="package's own"):
        lowmem_compile.define_op("lowmem::mine", "(Tensor x) -> Tensor", reference=_tanh2_reference, fake=torch.empty_like)
    with pytest.raises(ValueError, match="flops must be callable"):
        lowmem_compile.define_op("lowmem_tests::bad", "(Tensor x) -> Tensor", reference=_tanh2_reference,
                                 fake=torch.empty_like, flops=12)


# ------------------------------------------------------------------------------- the worked example


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape", [(3, 37), (2, 5, 64)])
def test_example_kernel_matches_its_reference(dtype, shape):
    """The Triton kernel (Triton's interpreter on the CPU) against the PyTorch reference."""
    g = torch.Generator().manual_seed(1)
    x, r = (torch.randn(shape, generator=g).to(dtype) for _ in range(2))
    w = (1 + 0.1 * torch.randn(shape[-1], generator=g)).to(dtype)
    y, s = example.add_rmsnorm_triton(x, r, w, 1e-6)
    y_ref, s_ref = example.add_rmsnorm_reference(x, r, w, 1e-6)
    torch.testing.assert_close(s, s_ref, rtol=0, atol=0)
    tol = {torch.float32: 1e-6, torch.float16: 2e-3}[dtype]
    torch.testing.assert_close(y, y_ref, rtol=tol, atol=tol)


def test_example_op_gradients_match_the_reference():
    """The op's backward (its own formula) against autograd through the reference (fp32 inside, as
    HF's norm: gradcheck's float64 differences would only measure fp32 rounding)."""
    g = torch.Generator().manual_seed(2)
    x, r = (torch.randn(2, 5, 24, generator=g, requires_grad=True) for _ in range(2))
    w = torch.randn(24, generator=g, requires_grad=True)
    grad_y, grad_s = torch.randn(2, 5, 24, generator=g), torch.randn(2, 5, 24, generator=g)

    def grads(fn):
        y, s = fn(x, r, w, 1e-6)
        return torch.autograd.grad((y * grad_y).sum() + (s * grad_s).sum(), (x, r, w))

    for got, want in zip(grads(example.add_rmsnorm), grads(example.add_rmsnorm_reference)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_ops_pass_opcheck():
    """Schema, fake impl and autograd registration of the example's op and the test ops."""
    g = torch.Generator().manual_seed(3)
    x, r = (torch.randn(3, 24, generator=g, requires_grad=True) for _ in range(2))
    w = torch.randn(24, generator=g, requires_grad=True)
    torch.library.opcheck(example.add_rmsnorm.default, (x, r, w, 1e-6))
    for op in (COSTED, PLAIN):
        torch.library.opcheck(op.default, (x,))


def test_example_pass_on_a_tiny_llama_matches_eager():
    model = tiny_model("llama")
    ref = twin(model)
    data = batch()
    expected = ref(**data).loss
    expected.backward()
    compiled = torch.compile(model, backend="lowmem", options={**EAGER, "passes": [example.FusedAddRMSNorm()]})
    loss = compiled(**data).loss
    loss.backward()
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    want = trainable_grads(ref)
    for name, grad in trainable_grads(model).items():
        assert rel_err(grad, want[name]) < 1e-4, name
    d = lowmem_compile.last_report().to_dict()
    entry = d["passes"]["fused_add_rmsnorm"]
    assert entry["fused"] == 2  # each layer's post-attention norm
    assert len(entry["skipped"]) == 3  # layer 0's input norm (no add), layer 1's (add in layer 0), the final norm
    assert any("the add is in model.layers.0, the norm in model.layers.1" in s for s in entry["skipped"])
    assert d["custom_ops"]["costed"] == 2 and d["layers"]["bodies"] == 1


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_example_kernel_on_cuda(dtype):
    """The example's kernel compiled for the GPU (bf16 too, which the interpreter cannot check) against
    the reference, and the pass through Inductor on a tiny Llama against eager."""
    g = torch.Generator().manual_seed(4)
    x, r = (torch.randn(4, 1000, 512, generator=g).to("cuda", dtype) for _ in range(2))
    w = (1 + 0.1 * torch.randn(512, generator=g)).to("cuda", dtype)
    y, s = example.add_rmsnorm_triton(x, r, w, 1e-6)
    y_ref, s_ref = example.add_rmsnorm_reference(x, r, w, 1e-6)
    torch.testing.assert_close(s, s_ref, rtol=0, atol=0)
    torch.testing.assert_close(y, y_ref, rtol=2e-2, atol=2e-2)
    model = tiny_model("llama").cuda()
    ref = twin(model)
    data = {k: v.cuda() for k, v in batch().items()}
    expected = ref(**data).loss
    compiled = torch.compile(model, backend="lowmem", options={"attention": "kv16", "passes": [example.FusedAddRMSNorm()]})
    loss = compiled(**data).loss
    torch.testing.assert_close(loss, expected, rtol=1e-4, atol=1e-4)
    assert lowmem_compile.last_report().to_dict()["passes"]["fused_add_rmsnorm"]["fused"] == 2


def test_bench_names_a_user_pass_by_import_string():
    from bench import e2e

    spec = '{"inner": "eager", "passes": ["examples.fused_add_rmsnorm:FusedAddRMSNorm"]}'
    args = e2e.parse_args(["--device", "cpu", "--model", "small", "--layers", "1", "--warmup", "1", "--steps", "1",
                           "--configs", "lowmem_rms", "--seqs", "32", "--lowmem", f"lowmem_rms={spec}"])
    assert e2e.lowmem_variants(args)["lowmem_rms"]["passes"] == ["examples.fused_add_rmsnorm:FusedAddRMSNorm"]
    bad = e2e.parse_args(["--device", "cpu", "--lowmem", 'lowmem_bad={"passes": ["nowhere_xyz:P"]}'])
    with pytest.raises(SystemExit, match="cannot import"):
        e2e.lowmem_variants(bad)


class _Versioned(SquareToMul):
    """A pass with a setting, which its uuid includes (as docs/writing_a_pass.md asks)."""

    def __init__(self, version):
        self.version = version

    def uuid(self):
        return super().uuid() + f"|{self.version}"


@pytest.mark.slow
def test_aot_cache_hits_for_the_same_pass_and_misses_after_an_edit(tmp_path):
    """Inductor on the CPU with AOTAutograd's cache on: the same pass again is a hit, a pass whose
    uuid changed is a miss (and its graph compiles with the new pass)."""
    from torch._dynamo.utils import counters
    from torch._inductor.utils import fresh_cache

    x = torch.randn(4, 16)
    with fresh_cache(dir=str(tmp_path)), torch._functorch.config.patch(enable_autograd_cache=True):
        counters.clear()
        for version, hits, misses in ((1, 0, 1), (1, 1, 1), (2, 1, 2)):
            lowmem_compile.reset()
            _train(_Stack(), x, {"passes": [_Versioned(version)], "layers": "off"})
            assert (counters["aot_autograd"]["autograd_cache_hit"], counters["aot_autograd"]["autograd_cache_miss"]) == (hits, misses)
            assert lowmem_compile.last_report().to_dict()["passes"]["square_to_mul"]["rewritten"] == 2
