"""Offloading saved activations to host memory (`offload="layers"`): the ops copy exactly, the
rewritten step gives eager's gradients, and the cost model sees the offloaded bytes leave the device
(saved bytes and peak fall by what moved; the report says how much). Tiny models' activations are
far below the 1 MiB threshold, so the tests lower it. fp32 models: 1e-4 relative on gradients."""

from __future__ import annotations

import contextlib
import dataclasses

import pytest
import torch

import lowmem_compile
from lowmem_compile.cost import liveness, timing
from lowmem_compile.cost.timing import CPU, node_time
from lowmem_compile.ops import offload as offload_ops
from lowmem_compile.passes import offload, remat
from lowmem_compile.passes.remat import layer_of, saved_values

from .models import batch, rel_err, tiny_model, trainable_grads, twin
from .test_remat import PASSES_OFF, TOL, _check_grads, _compile, inductor_step_matches_eager


def test_ops_round_trip_on_the_cpu():
    x = torch.randn(5, 7, 3)[:, 1:]  # a non-contiguous view: the host copy is dense
    host = offload_ops.offload(x)
    assert host.device.type == "cpu" and host.is_contiguous() and host.untyped_storage().data_ptr() != x.untyped_storage().data_ptr()
    back = offload_ops.reload(host, torch.device("cpu"))
    assert torch.equal(back, x) and back.untyped_storage().data_ptr() != host.untyped_storage().data_ptr()
    ticket = offload_ops.prefetch(host, torch.device("cpu"))
    host.add_(1)  # the prefetched copy was taken before
    back = offload_ops.reload(host, torch.device("cpu"), ticket)
    assert torch.equal(back, x) and back.untyped_storage().data_ptr() != host.untyped_storage().data_ptr()
    assert torch.equal(offload_ops.reload(host, torch.device("cpu"), ticket), x + 1)  # used once: copies again
    offload_ops.prefetch(host, torch.device("cpu"))
    assert id(host) in offload_ops._PREFETCHED
    del host  # no reload came (a backward that raised): the device copy goes with the host tensor
    assert not offload_ops._PREFETCHED


@pytest.mark.gpu
def test_ops_round_trip_on_cuda_while_the_source_memory_is_reused():
    """The side-stream copy must read `x` before its memory goes to a new tensor, and the reload
    must be complete before the current stream reads it."""
    xs = [torch.randn(64, 1 << 14, device="cuda") for _ in range(8)]
    expected = [x.cpu() for x in xs]
    hosts = [offload_ops.offload(x) for x in xs]
    del xs
    noise = [torch.full((64, 1 << 14), 7.0, device="cuda") for _ in range(8)]  # reuses the freed blocks
    tickets = [offload_ops.prefetch(host, torch.device("cuda")) for host in hosts[::2]]
    del noise[::2]  # blocks the prefetched copies may be written into while queued work still runs
    torch.cuda._sleep(10_000_000)  # the current stream is busy while the copies are issued
    for i, (host, ref) in enumerate(zip(hosts, expected)):
        back = offload_ops.reload(host, torch.device("cuda"), tickets[i // 2] if i % 2 == 0 else None)
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
        # four layers: with a layer prefetched ahead, three would keep as many values on the device
        ref = tiny_model("llama", num_hidden_layers=4)
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
    assert stats.offloaded_bytes == plan.offloaded_bytes == moved == sum(plan.parked_sizes)
    assert plan.memory.saved == base.memory.saved - moved
    assert plan.peak < base.peak
    # nothing of the last layer moves: its values are the first the backward reads
    last_layer = list(dict.fromkeys(layer for n in base.fw.graph.nodes if (layer := layer_of(n))))[-1]
    assert all(layer_of(h.args[0]) != last_layer for h in hosts)
    # every reload has its ticket from a prefetch before it
    order = {n: i for i, n in enumerate(plan.bw.graph.nodes)}
    assert all(b.args[2].target is offload_ops.prefetch.default and order[b.args[2]] < order[b] for b in reloads)
    # the copies are free on a fast link and charged on a slow one
    fast, slow = (dataclasses.replace(CPU, host_link=link) for link in (1e18, 1e3))
    assert offload.exposed_seconds(plan.fw, plan.bw, fast) < 1e-12
    assert offload.exposed_seconds(plan.fw, plan.bw, slow) > 0.5 * moved / 1e3


def test_prefetches_hide_the_copies_on_the_time_model(monkeypatch):
    """With a link slow enough that a copy takes a good share of the backward, the prefetches start
    ahead of other reloads, every copy is done when it is read (nothing exposed on the model's
    clock), and the peak still falls below the plan without offloading."""
    monkeypatch.setattr(offload, "MIN_BYTES", 1)
    ref = tiny_model("llama", num_hidden_layers=4)
    ref(**batch()).loss.backward()
    base_compiled, base_part, _ = _compile(twin(ref), {"remat": "full", "offload": "off", **PASSES_OFF})
    base_compiled(**batch()).loss.backward()
    base = base_part.plans[-1]
    backward = sum(node_time(n, CPU) for n in base.bw.graph.nodes)
    largest = max(h.meta["val"].numel() * h.meta["val"].element_size() for h in saved_values(base.fw, base.num_fwd_outputs))
    rates = dataclasses.replace(CPU, host_link=largest / (0.15 * backward))  # one copy: 15% of the backward
    monkeypatch.setattr(timing, "CPU", rates)
    model = twin(ref)
    compiled, part, _ = _compile(model, {"remat": "full", "offload": "layers", **PASSES_OFF})
    compiled(**batch()).loss.backward()
    _check_grads(model, ref)
    plan = part.plans[-1]
    reloads = [n for n in plan.bw.graph.nodes if n.target is offload_ops.reload.default]
    order = {n: i for i, n in enumerate(plan.bw.graph.nodes)}
    assert len(reloads) >= 2
    assert any(order[b.args[2]] < order[other] < order[b] for b in reloads for other in reloads)
    assert offload.exposed_seconds(plan.fw, plan.bw, rates) < 1e-9 * backward + 1e-15
    assert plan.peak < base.peak


def test_a_prefetched_copy_counts_from_its_prefetch():
    """The device copy exists from the prefetch on, so work between the two carries it too."""
    g = torch.fx.Graph()
    host, a = g.placeholder("host"), g.placeholder("a")
    host.meta["val"], a.meta["val"] = torch.empty(1000), torch.empty(10)
    ticket = g.call_function(offload_ops.prefetch.default, (host, torch.device("cpu")))
    ticket.meta["val"] = torch.empty(0)
    big = g.call_function(torch.ops.aten.expand.default, (a, [1000, 10]))
    big.meta["val"] = torch.empty(1000, 10)
    big2 = g.call_function(torch.ops.aten.clone.default, (big,))
    big2.meta["val"] = torch.empty(1000, 10)
    small = g.call_function(torch.ops.aten.sum.default, (big2,))
    small.meta["val"] = torch.empty(())
    back = g.call_function(offload_ops.reload.default, (host, torch.device("cpu"), ticket))
    back.meta["val"] = torch.empty(1000)
    out = g.call_function(torch.ops.aten.add.Tensor, (back, small))
    out.meta["val"] = torch.empty(1000)
    g.output((out,))
    copy, work = 1000 * 4, 1000 * 10 * 4 + 4  # at the peak: the clone and the sum's scalar

    def peak(graph):
        return liveness._run(graph, liveness._Sizes(False), fused=False, preallocated={}, keep=set(), exprs=None,
                             base_expr=0)[0]

    assert peak(g) == copy + work
    back.args = (host, torch.device("cpu"), None)  # without a ticket the copy appears at the reload
    g.erase_node(ticket)
    assert peak(g) == work


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


def test_parked_plan_saves_what_is_dear_and_keeps_eager_gradients(monkeypatch):
    """`full+parked`: `full` plus, in every layer but the last, the backward-read outputs dearest to
    recompute per byte, parked in host memory. Gradients stay eager's; the backward recomputes fewer
    matmuls than under `full`, and more moves through host memory."""
    monkeypatch.setattr(offload, "MIN_BYTES", 1)
    ref = tiny_model("llama", num_hidden_layers=3)
    ref(**batch()).loss.backward()
    plans = {}
    for name in ("full", "full+parked"):
        if name == "full+parked":
            monkeypatch.setattr(remat._Planner, "layer_plan", lambda self, k: self.parked_plan())
        model = twin(ref)
        compiled, part, _ = _compile(model, {"remat": "full", "offload": "layers", **PASSES_OFF})
        compiled(**batch()).loss.backward()
        _check_grads(model, ref)
        plans[name] = part.plans[-1]
    full, parked = plans["full"], plans["full+parked"]
    assert parked.name == "full+parked"

    def matmuls(plan):
        nodes = {n.name: n for n in plan.bw.graph.nodes}
        return sum(nodes[name].target is torch.ops.aten.mm.default for name in plan.recomputed)

    assert matmuls(parked) < matmuls(full)
    assert parked.offloaded_bytes > full.offloaded_bytes


@pytest.mark.gpu
@pytest.mark.parametrize("plan", ["full", "full+parked"])
def test_inductor_offload_on_a_late_link_keeps_eager_gradients(monkeypatch, plan):
    """Every side-stream copy starts ~10 ms late, so a kernel that wrote over a value still being
    copied to host (Inductor reusing its memory, or writing in place over it) or read a copy back
    before it landed would change the gradients; they must stay eager's."""
    monkeypatch.setattr(offload, "MIN_BYTES", 1)
    real_stream = offload_ops._copy_stream

    def late_stream(device):
        stream = real_stream(device)
        with torch.cuda.stream(stream):
            torch.cuda._sleep(20_000_000)
        return stream

    monkeypatch.setattr(offload_ops, "_copy_stream", late_stream)
    if plan == "full+parked":
        monkeypatch.setattr(remat._Planner, "layer_plan", lambda self, k: self.parked_plan())
    ref = tiny_model("llama", num_hidden_layers=3).cuda()
    model = twin(ref)
    inputs = {k: v.cuda() for k, v in batch(seq=256).items()}
    ref(**inputs).loss.backward()
    compiled = torch.compile(model, backend="lowmem", options={"remat": "full", "offload": "layers", **PASSES_OFF})
    with torch._inductor.config.patch(force_disable_caches=True):
        compiled(**inputs).loss.backward()
    report = lowmem_compile.last_report().to_dict()["remat"]
    assert report["offloaded_bytes"] > 0
    ref_grads = trainable_grads(ref)
    for name, g in trainable_grads(model).items():
        assert rel_err(g, ref_grads[name]) < 1e-3, name


def test_parked_plan_is_a_candidate_only_when_asked(monkeypatch):
    """`full+parked` is opt-in (`offload="parked"`): under `offload="layers"` auto never scores it."""
    monkeypatch.setattr(offload, "MIN_BYTES", 1)
    evaluated = {}
    for setting in ("layers", "parked"):
        ref = tiny_model("llama", num_hidden_layers=2)
        compiled, part, _ = _compile(twin(ref), {"remat": "auto", "memory_budget": 1, "offload": setting, **PASSES_OFF})
        with pytest.warns(UserWarning, match="infeasible"):
            compiled(**batch()).loss.backward()
        note = next(n for n in part.report.stats["remat"].notes if " evaluated" in n)
        evaluated[setting] = int(note.split(" of ")[1].split()[0])
    assert evaluated["parked"] == evaluated["layers"] + 1


def test_parking_fits_the_host_largest_values_first():
    """`within_host`: per call the largest values that fit `limit / calls` are parked, in the graph's
    order; what does not fit is counted as staying on the device."""
    graph = torch.fx.Graph()
    sizes = [3, 10, 5, 2]  # float32 elements: 12, 40, 20 and 8 bytes
    values = []
    for i, n in enumerate(sizes):
        node = graph.placeholder(f"v{i}")
        node.meta["val"] = torch.empty(n)
        values.append(node)
    kept, left = offload.within_host(values, calls=2, limit=2 * 64)  # 64 bytes a call
    assert [v.name for v in kept] == ["v1", "v2"]  # 40, then 20: 60; 12 more would be 72, 8 more 68
    assert left == 12 + 8
    kept, left = offload.within_host(values, calls=4, limit=4 * 80)  # room for all 80
    assert kept == values and left == 0
    kept, left = offload.within_host(values, calls=1, limit=7)  # nothing fits
    assert kept == [] and left == 80



def _layered_report(options):
    lowmem_compile.reset()
    model = tiny_model("llama", num_hidden_layers=3)
    compiled = torch.compile(model, backend="lowmem", options=options)
    compiled(**batch()).loss.backward()
    return lowmem_compile.last_report().to_dict()


def test_a_compile_that_will_run_pins_its_parked_blocks_ahead(monkeypatch):
    """The chosen plan's host blocks (one per parked value, for every call of the layer body) are
    requested while the step compiles; a plan-only compile, or one with `warmup="off"`, requests none."""
    monkeypatch.setattr(offload, "MIN_BYTES", 1)
    asked = []
    monkeypatch.setattr(offload_ops, "pin_ahead", lambda sizes, device: asked.append(list(sizes)))
    options = {"remat": "full", "offload": "layers", "inner": "eager", **PASSES_OFF}
    lowmem_compile.plan(tiny_model("llama", num_hidden_layers=3), **batch(), options=options)
    _layered_report({**options, "warmup": "off"})
    assert asked == []
    report = _layered_report(options)
    assert report["layers"]["calls"] == 3 and len(asked) == report["layers"]["bodies"]
    assert sum(map(sum, asked)) == report["remat"]["offloaded_bytes"] > 0


@pytest.mark.gpu
def test_the_first_step_takes_its_pinned_blocks_from_the_ones_pinned_ahead(monkeypatch):
    """On CUDA the blocks pinned during the compile go to the host allocator's cache before the step
    runs, and the step's offloads take them: the step itself creates fewer pinned blocks than it
    parks values (without the reuse it would create one per value). Counted from the moment the
    backend settles the pinned blocks, so nothing the compile pins is counted as the step's (the
    first GPU run counted from before the compile: 13 blocks for 12 pinned ahead)."""
    monkeypatch.setattr(offload, "MIN_BYTES", 1)
    asked, settled, pin_ahead, settle = [], [], offload_ops.pin_ahead, offload_ops.settle_pinned
    monkeypatch.setattr(offload_ops, "pin_ahead", lambda sizes, device: (asked.append(list(sizes)), pin_ahead(sizes, device)))

    def settle_and_count():
        result = settle()
        settled.append(torch.cuda.host_memory_stats()["num_host_alloc"])
        return result

    monkeypatch.setattr(offload_ops, "settle_pinned", settle_and_count)
    model = tiny_model("llama", num_hidden_layers=3).cuda()
    inputs = {k: v.cuda() for k, v in batch().items()}
    compiled = torch.compile(model, backend="lowmem", options={"remat": "full", "offload": "layers", **PASSES_OFF})
    lowmem_compile.reset()
    torch.cuda.synchronize()
    torch._C._host_emptyCache()
    compiled(**inputs).loss.backward()
    torch.cuda.synchronize()
    in_step = torch.cuda.host_memory_stats()["num_host_alloc"] - settled[-1]
    report = lowmem_compile.last_report().to_dict()
    assert report["warmup"]["pinned_bytes"] == report["remat"]["offloaded_bytes"] == sum(map(sum, asked)) > 0
    assert in_step < sum(map(len, asked))
