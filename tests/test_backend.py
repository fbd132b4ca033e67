"""The backend's seams: registration, the pass list, both inner compilers, the report contract."""

import subprocess
import sys
import textwrap

import pytest
import torch

import lowmem_compile
from lowmem_compile import backend
from lowmem_compile.report import SECTIONS, AttentionStats, NF4Stats

from .models import batch, tiny_model


class _MLP(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.up = torch.nn.Linear(16, 64)
        self.down = torch.nn.Linear(64, 16)

    def forward(self, x):
        return self.down(torch.nn.functional.gelu(self.up(x))).square().mean()


@pytest.mark.parametrize("inner", ["eager", "inductor"])
def test_gradients_match_eager(inner):
    ref = _MLP()
    model = _MLP()
    model.load_state_dict(ref.state_dict())
    x = torch.randn(8, 16)
    ref(x).backward()
    torch.compile(model, backend="lowmem", options={"inner": inner})(x).backward()
    for (name, p), q in zip(ref.named_parameters(), model.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-5, atol=1e-6, msg=name)


def test_registered_by_entry_point_without_import():
    """An installed package lets `backend="lowmem"` work before anything imports lowmem_compile."""
    from importlib.metadata import entry_points

    if not any(ep.name == "lowmem" for ep in entry_points(group="torch_dynamo_backends")):
        pytest.skip("package not installed (pip install -e .): no entry point to test")
    code = textwrap.dedent(
        """
        import sys, torch
        f = torch.compile(lambda x: x.sin() * 2, backend="lowmem", options={"inner": "eager"})
        x = torch.randn(5)
        assert torch.allclose(f(x), x.sin() * 2)
        assert "lowmem_compile" in sys.modules
        import lowmem_compile, importlib
        importlib.reload(lowmem_compile)  # importing again must not fail
        print("ok")
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


def test_pass_order_and_report_sections():
    names = [p.name for p in backend.PRE_AUTOGRAD_PASSES]
    assert names == ["attention", "linear_nf4", "fused_loss", "chunk_mlp"]  # chunk_mlp sees the NF4 ops
    assert {p.section for p in backend.PRE_AUTOGRAD_PASSES} <= set(SECTIONS)
    assert len({p.uuid() for p in backend.PRE_AUTOGRAD_PASSES}) == len(names)


def test_report_contract_and_print(capsys):
    compiled = torch.compile(_MLP(), backend="lowmem", options={"inner": "eager", "report": True})
    compiled(torch.randn(4, 16)).backward()
    printed = capsys.readouterr().out
    assert "lowmem report" in printed and "saved for backward" in printed
    d = lowmem_compile.last_report().to_dict()
    assert d["graphs"] == 1
    assert set(d["attention"]) >= {"replaced", "skipped"}
    assert set(d["nf4"]) >= {"lowered", "bytes_before", "bytes_after"}
    assert set(d["remat"]) >= {"policy", "saved_bytes", "predicted_peak_bytes", "recomputed"}
    assert set(d["loss"]) >= {"fused", "chunk_tokens"}
    assert set(d["mlp"]) >= {"chunked", "chunks", "skipped"}
    assert d["cudagraphs"] == {"requested": 0, "skipped": []}
    # the forward saves at least the GELU input (8x64 fp32 here would be 2 KiB at batch 8; batch 4 -> 1 KiB)
    assert d["remat"]["saved_bytes"] >= 4 * 64 * 4


def test_report_sums_graphs_across_a_graph_break():
    def f(x):
        y = (x * 2).sin()
        torch._dynamo.graph_break()
        return (y + 1).cos().sum()

    x = torch.randn(6, requires_grad=True)
    torch.compile(f, backend="lowmem", options={"inner": "eager"})(x).backward()
    report = lowmem_compile.last_report()
    assert report.to_dict()["graphs"] == 2
    lowmem_compile.reset()
    assert lowmem_compile.last_report().to_dict()["graphs"] == 0


def test_report_merge_rules():
    graph = lowmem_compile.report.STORE.new_graph(nodes=1)
    graph.add("attention", AttentionStats(replaced=2, skipped=["a"]))
    graph.add("attention", AttentionStats(replaced=3, skipped=["b"]))
    graph.add("nf4", NF4Stats(lowered=1, bytes_before=10, bytes_after=3))
    d = lowmem_compile.last_report().to_dict()
    assert d["attention"] == {"replaced": 5, "causal_masks": 0, "general_masks": 0, "window_masks": 0,
                              "packed_masks": 0, "skipped": ["a", "b"]}
    assert d["nf4"]["bytes_before"] == 10
    with pytest.raises(TypeError, match="report section"):
        graph.add("nf4", AttentionStats())


def test_compile_progress_is_logged(caplog):
    """A large model's compile takes minutes: each pass, each scored plan and the total are logged."""
    lowmem_compile.reset()
    model = tiny_model("llama", num_hidden_layers=2)
    with caplog.at_level("INFO", logger="lowmem_compile"):
        torch.compile(model, backend="lowmem", options={"inner": "eager", "remat": "full"})(**batch()).loss.backward()
    messages = [r.getMessage() for r in caplog.records if r.name.startswith("lowmem_compile")]
    assert any(m.startswith("compiling a graph of") for m in messages), messages
    assert any(m.startswith("pass attention: AttentionStats(replaced=2") for m in messages), messages
    assert any(m.startswith("remat plan full: predicted peak") for m in messages), messages
    assert any(m.startswith("remat: chose plan full") for m in messages), messages
    assert messages[-1].startswith("graph compiled in"), messages
