"""Offloading saved activations to host memory (`offload="layers"`): the ops copy exactly, the
rewritten step gives eager's gradients, and the cost model sees the offloaded bytes leave the device
(saved bytes and peak fall by what moved; the report says how much). Tiny models' activations are
far below the 1 MiB threshold, so the tests lower it. fp32 models: 1e-4 relative on gradients."""

from __future__ import annotations

import contextlib

import pytest
import torch

from lowmem_compile.ops import offload as offload_ops
from lowmem_compile.passes import offload
from lowmem_compile.passes.remat import layer_of

from .models import batch, rel_err, tiny_model, twin
from .test_remat import PASSES_OFF, TOL, _check_grads, _compile, inductor_step_matches_eager


def test_ops_round_trip_on_the_cpu():
    x = torch.randn(5, 7, 3)[:, 1:]  # a non-contiguous view: the host copy is dense
    host = offload_ops.offload(x)
    assert host.device.type == "cpu" and host.is_contiguous() and host.untyped_storage().data_ptr() != x.untyped_storage().data_ptr()
    back = offload_ops.reload(host, torch.device("cpu"))
    assert torch.equal(back, x) and back.untyped_storage().data_ptr() != host.untyped_storage().data_ptr()


@pytest.mark.gpu
def test_ops_round_trip_on_cuda_while_the_source_memory_is_reused():
    """The side-stream copy must read `x` before its memory goes to a new tensor, and the reload
    must be complete before the current stream reads it."""
    xs = [torch.randn(64, 1 << 14, device="cuda") for _ in range(8)]
    expected = [x.cpu() for x in xs]
    hosts = [offload_ops.offload(x) for x in xs]
    del xs
    noise = [torch.full((64, 1 << 14), 7.0, device="cuda") for _ in range(8)]  # reuses the freed blocks
    for host, ref in zip(hosts, expected):
        back = offload_ops.reload(host, torch.device("cuda"))
        assert torch.equal((back * 1).cpu(), ref)
    assert all(bool((n == 7.0).all()) for n in noise)


def test_reload_rejects_a_device_tensor():
    with pytest.raises(ValueError, match="host tensor"):
        offload_ops.reload(torch.empty(2, device="meta"), torch.device("cpu"))


@pytest.mark.parametrize("remat", ["none", "full"])
def test_gradients_equal_eager_and_offloaded_bytes_leave_the_device(monkeypatch, remat):
    monkeypatch.setattr(offload, "MIN_BYTES", 1)
    plans = {}
    for setting in ("off", "layers"):
        ref = tiny_model("llama", num_hidden_layers=3)
        model = twin(ref)
        inputs = batch(padding=True)
        expected = ref(**inputs)
        expected.loss.backward()
        compiled, part, _ = _compile(model, {"remat": remat, "offload": setting, **PASSES_OFF})
        got = compiled(**inputs)
        got.loss.backward()
        assert rel_err(got.loss, expected.loss) < TOL
        _check_grads(model, ref)
        plans[setting] = (part.plans[-1], part.report.stats["remat"])

    plan, stats = plans["layers"]
    base, _ = plans["off"]
    hosts = [n for n in plan.fw.graph.nodes if n.target is offload_ops.offload.default]
    reloads = [n for n in plan.bw.graph.nodes if n.target is offload_ops.reload.default]
    assert hosts and len(reloads) == len(hosts)
    moved = sum(h.meta["val"].numel() * h.meta["val"].element_size() for h in hosts)
    assert stats.offloaded_bytes == plan.offloaded_bytes == moved
    assert plan.memory.saved == base.memory.saved - moved
    assert plan.peak < base.peak
    assert plan.added_seconds > base.added_seconds  # the reloads are charged
    # nothing of the last layer moves: its values are the first the backward reads
    last_layer = [layer for n in base.fw.graph.nodes if (layer := layer_of(n))][-1]
    assert all(layer_of(h.args[0]) != last_layer for h in hosts)


def test_auto_offloads_only_plans_that_do_not_fit(monkeypatch):
    """Offloading costs time: under `auto` a plan is offloaded only when its peak misses the budget."""
    monkeypatch.setattr(offload, "MIN_BYTES", 1)
    moved = {}
    for budget in (2**40, 1):
        ref = tiny_model("llama", num_hidden_layers=3)
        model = twin(ref)
        inputs = batch()
        ref(**inputs).loss.backward()
        compiled, part, _ = _compile(model, {"remat": "auto", "memory_budget": budget, "offload": "layers", **PASSES_OFF})
        with pytest.warns(UserWarning, match="infeasible") if budget == 1 else contextlib.nullcontext():
            compiled(**inputs).loss.backward()
        _check_grads(model, ref)
        moved[budget] = part.report.stats["remat"].offloaded_bytes
    assert moved[2**40] == 0 and moved[1] > 0


def test_offload_below_threshold_moves_nothing():
    ref = tiny_model("llama", num_hidden_layers=2)
    compiled, part, _ = _compile(twin(ref), {"remat": "full", "offload": "layers", **PASSES_OFF})
    compiled(**batch()).loss.backward()
    assert part.report.stats["remat"].offloaded_bytes == 0


@pytest.mark.slow
def test_inductor_compiles_the_offloaded_step(monkeypatch):
    """Inductor lowers the two ops as extern kernels (a host output in the forward, a host input in
    the backward); gradients still equal eager's."""
    monkeypatch.setattr(offload, "MIN_BYTES", 1)
    remat = inductor_step_matches_eager({"remat": "full", "offload": "layers"}, layers=3)
    assert remat["offloaded_bytes"] > 0
