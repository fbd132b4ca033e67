"""`plan()`: the report a real compile produces (same predicted peak and saved bytes, same pass
counts), with nothing run: no gradient appears, and an infeasible budget is reported the same way."""

from __future__ import annotations

import pytest
import torch

import lowmem_compile

from .models import batch, tiny_model, twin


@pytest.mark.parametrize("options", [{"remat": "full"}, {"remat": "none", "attention": "kv4"}])
def test_plan_predicts_what_a_compile_reports_and_runs_nothing(options):
    options = {"inner": "eager", **options}
    model = tiny_model("llama")
    inputs = batch(padding=True)
    planned = lowmem_compile.plan(model, **inputs, options=options).to_dict()
    assert all(p.grad is None for p in model.parameters())

    lowmem_compile.reset()
    compiled = torch.compile(twin(model), backend="lowmem", options=options)
    compiled(**inputs).loss.backward()
    real = lowmem_compile.last_report().to_dict()
    for key in ("predicted_peak_bytes", "saved_bytes", "recomputed", "policy"):
        assert planned["remat"][key] == real["remat"][key], key
    assert planned["remat"]["predicted_peak_bytes"] > 0
    for section in ("attention", "nf4", "loss", "mlp"):
        assert planned[section] == real[section], section


def test_plan_reports_an_infeasible_budget():
    model = tiny_model("qwen2")
    with pytest.warns(UserWarning, match="infeasible"):
        report = lowmem_compile.plan(model, **batch(), options={"inner": "eager", "memory_budget": 1000})
    assert any("GiB over" in n for n in report.to_dict()["remat"]["notes"])


def test_plan_raises_what_is_not_its_own():
    with pytest.raises(ValueError, match="mlp_chunks"):
        lowmem_compile.plan(tiny_model("llama"), **batch(), options={"mlp_chunks": 1})
