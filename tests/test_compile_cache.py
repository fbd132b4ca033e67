"""A second compile of the same graph comes from AOTAutograd's cache: the partitioner does not run
again, the report still holds the plan (recorded by the first compile), and the step is the same."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch._dynamo.utils import counters
from torch._inductor.runtime.cache_dir_utils import cache_dir
from torch._inductor.utils import fresh_cache

import lowmem_compile
from lowmem_compile.options import Options
from lowmem_compile.passes import offload, remat
from lowmem_compile.report import STORE
from tests.models import batch, tiny_model, trainable_grads


def _compile_step(options):
    """One step of a one-layer tiny bf16 Llama with NF4 weights (our ops in the graph; one layer keeps
    Inductor's CPU compile short); its LoRA gradients and report."""
    lowmem_compile.reset()
    torch.manual_seed(0)
    model = tiny_model("llama", dtype=torch.bfloat16, num_hidden_layers=1)
    lowmem_compile.quantize_(model)
    torch.compile(model, backend="lowmem", options=options)(**batch()).loss.backward()
    return trainable_grads(model), lowmem_compile.last_report().to_dict()


def _compile_mlp(options):
    """One step of a two-layer MLP (quick to compile); its report."""
    lowmem_compile.reset()
    torch.manual_seed(0)
    mlp = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.GELU(), torch.nn.Linear(64, 16))
    torch.compile(mlp, backend="lowmem", options=options)(torch.randn(8, 16)).square().mean().backward()
    return lowmem_compile.last_report().to_dict()


@pytest.fixture
def aot_cache(tmp_path, monkeypatch):
    """AOTAutograd's cache on, in an empty cache folder: (the partitioner's calls, the plans' folder)."""
    calls = []
    original = remat.RematPartitioner.__call__

    def counted(self, *args, **kwargs):
        calls.append(self.options)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(remat.RematPartitioner, "__call__", counted)
    with fresh_cache(dir=str(tmp_path)), torch._functorch.config.patch(enable_autograd_cache=True):
        counters.clear()
        yield calls, Path(cache_dir()) / "lowmem_plans"


def test_second_compile_is_served_from_the_cache_with_its_plan(aot_cache):
    """With every graph-rewriting pass on, the graph is saved to the cache, not bypassed (AOTAutograd
    bypasses it for a whole graph with one node it cannot vet, e.g. a tensor method called on a node
    without a fake value: the chunked MLP's pieces were such nodes); the second compile is a hit."""
    calls, plans = aot_cache
    options = {"remat": "full", "attention": "kv8", "mlp_chunks": 2, "logits": "drop", "nf4_matmul": "graph"}
    first_grads, first = _compile_step(options)
    assert first["attention"]["replaced"] and first["mlp"]["chunked"] and first["loss"]["fused"]
    assert counters["aot_autograd"].get("autograd_cache_bypass", 0) == 0
    assert len(calls) == 1 and counters["aot_autograd"]["autograd_cache_saved"] == 1
    assert list(plans.glob("*.json")), "the partitioner recorded no plan"
    second_grads, second = _compile_step(options)
    assert counters["aot_autograd"]["autograd_cache_hit"] == 1
    assert len(calls) == 1, "a cache hit must not partition again"
    for name, grad in first_grads.items():
        assert torch.equal(second_grads[name], grad), name
    plan, cached = first["remat"], second["remat"]
    assert cached["predicted_peak_bytes"] == plan["predicted_peak_bytes"] > 0
    assert cached["recomputed"] == plan["recomputed"] > 0 and cached["policy"] == "full"
    assert cached["notes"][:-1] == plan["notes"] and "AOTAutograd's cache" in cached["notes"][-1]
    assert second["nf4"] == first["nf4"] and second["attention"] == first["attention"]


def test_other_options_partition_again(aot_cache):
    calls, _ = aot_cache
    _compile_mlp({"remat": "full"})
    _compile_mlp({"remat": "none"})
    assert len(calls) == 2 and counters["aot_autograd"].get("autograd_cache_hit", 0) == 0


def test_a_missing_record_is_said_so(aot_cache):
    _, plans = aot_cache
    _compile_mlp({"remat": "full"})
    for record in plans.glob("*.json"):
        record.unlink()
    report = _compile_mlp({"remat": "full"})
    assert counters["aot_autograd"]["autograd_cache_hit"] == 1
    assert report["remat"]["predicted_peak_bytes"] is None
    assert "record is missing" in report["remat"]["notes"][-1]


def test_uuid_follows_options_and_tunables(monkeypatch):
    part = remat.RematPartitioner(Options(), STORE.new_graph(nodes=0))
    base = part.uuid()
    assert remat.RematPartitioner(Options(), STORE.new_graph(nodes=0)).uuid() == base
    assert remat.RematPartitioner(Options(remat="full"), STORE.new_graph(nodes=0)).uuid() != base
    monkeypatch.setattr(offload, "MIN_BYTES", offload.MIN_BYTES + 1)
    assert part.uuid() != base, "a changed module tunable must change the cache key"


def test_recorded_stats_round_trip_and_unreadable_records(tmp_path):
    stats = lowmem_compile.report.RematStats(policy="auto", predicted_peak_bytes=123, notes=["a"])
    path = tmp_path / "p" / "x.json"
    remat._write_record(path, stats)
    assert remat.recorded_stats(path) == stats
    path.write_text("{not json")
    assert remat.recorded_stats(path) is None
    assert remat.recorded_stats(tmp_path / "absent.json") is None


def test_an_inference_compile_has_no_plan_to_report(aot_cache):
    """Without gradients AOTAutograd neither partitions nor serves a training entry: no remat entry,
    and no note claiming a cache hit."""
    calls, _ = aot_cache
    lowmem_compile.reset()
    mlp = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.GELU(), torch.nn.Linear(64, 16))
    with torch.no_grad():
        torch.compile(mlp, backend="lowmem")(torch.randn(8, 16))
    remat_entry = lowmem_compile.last_report().to_dict()["remat"]
    assert not calls
    assert not any("cache" in note for note in remat_entry["notes"]), remat_entry


def test_an_unwritable_record_folder_does_not_fail_the_compile(tmp_path, caplog):
    blocker = tmp_path / "file"
    blocker.write_text("")  # a file where the record's folder would go
    stats = lowmem_compile.report.RematStats(policy="full", notes=["a"])
    with caplog.at_level("WARNING", logger="lowmem_compile.passes.remat"):
        remat._write_record(blocker / "plans" / "x.json", stats)
    assert "could not record the plan" in caplog.text
    assert remat.recorded_stats(blocker / "plans" / "x.json") is None
