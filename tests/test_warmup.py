"""The kernel warm-up (lowmem_compile/warmup.py): which sites it finds, that running one touches
nothing of the step's (parameters' gradients, random streams), that worker processes run every
site forward and backward and that a worker's failure only leaves its sites to first use, and on
CUDA that it leaves the first real call nothing to compile.

The worker tests run the process mechanism on the CPU (`warmup.DEVICE_TYPES` widened; Triton's
interpreter runs the kernels in the children). What a child did is seen through a probe it imports
at start-up (`sitecustomize` on PYTHONPATH, which the children inherit): it wraps
`torch.autograd.backward` to log the child's pid, environment and import path, and the gradients
the backward gave the site's leaves, or to fail or crash the child there."""

from __future__ import annotations

import inspect
import json
import os
import sys

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


def _leaf_grads(tensors):
    """The summed magnitudes of the gradients a backward from `tensors` gave the leaves they were
    computed from (magnitudes: a signed sum cancels, and float32 rounding that differs with the
    process's thread count then shows as a large relative difference)."""
    leaves = [fn.variable for t in tensors for fn, _ in t.grad_fn.next_functions if hasattr(fn, "variable")]
    return [float(x.grad.double().abs().sum()) for x in leaves if x.grad is not None]


#: The probe's module (besides `_leaf_grads`): `install` wraps `torch.autograd.backward` in this process.
_PROBE = """
import json, os, sys

import torch


def install():
    backward = torch.autograd.backward

    def probed(tensors, grad_tensors=None, **kwargs):
        mode = os.environ["LOWMEM_PROBE_MODE"]
        if mode == "exit":
            os._exit(3)
        if mode == "raise":
            raise RuntimeError("the probe fails this site")
        backward(tensors, grad_tensors, **kwargs)
        env = {name: os.environ.get(name) for name in ("TRITON_CACHE_DIR", "TRITON_INTERPRET", "CUDA_VISIBLE_DEVICES")}
        with open(os.environ["LOWMEM_PROBE"], "a") as f:
            record = {"pid": os.getpid(), "grads": _leaf_grads(tensors), "path": sys.path, "env": env}
            f.write(json.dumps(record) + "\\n")

    torch.autograd.backward = probed
"""


@pytest.fixture
def probe(tmp_path, monkeypatch):
    """Widens the warm-up to the CPU, and makes every Python process started from now on (the
    workers) import the probe; returns a function reading what the probes logged."""
    (tmp_path / "lowmem_probe.py").write_text(inspect.getsource(_leaf_grads) + _PROBE)
    (tmp_path / "sitecustomize.py").write_text("import os\nif 'LOWMEM_PROBE' in os.environ:\n"
                                               "    import lowmem_probe\n    lowmem_probe.install()\n")
    logged = tmp_path / "probe.jsonl"
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(p for p in (str(tmp_path), os.environ.get("PYTHONPATH")) if p))
    monkeypatch.setenv("LOWMEM_PROBE", str(logged))
    monkeypatch.setenv("LOWMEM_PROBE_MODE", "record")
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / "triton"))
    monkeypatch.setattr(warmup, "DEVICE_TYPES", ("cpu",))
    return lambda: [json.loads(line) for line in logged.read_text().splitlines()] if logged.exists() else []


def _attention(q, k, v):
    return torch.ops.lowmem.attention(q, k, v, None, None, causal=True, scale=0.25, kv_bits=8)[0].sin()


def _attention_inputs():
    return [torch.randn(1, heads, 32, 16, requires_grad=True) for heads in (2, 1, 1)]


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
                                          "pinned_bytes": 0, "pin_seconds": 0.0, "waited_seconds": 0.0,
                                          "mode": "thread", "workers": 0, "startup_seconds": 0.0}
    text = str(report)
    assert "2 of 3 sites (1.2 s;" in text and f"[warmup] left to compile on first use: {reason}" in text
    assert "pinned ahead" not in text
    # the parked plan's host blocks, pinned beside the compile, merge into the same section
    report.graphs[0].add("warmup", WarmupStats(pinned_bytes=3 * 2**30, pin_seconds=1.5))
    assert report.to_dict()["warmup"]["pinned_bytes"] == 3 * 2**30 and report.to_dict()["warmup"]["sites"] == 3
    assert report.to_dict()["warmup"]["mode"] == "thread"  # kept where the pinning's stats say nothing of it
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


def test_the_option_takes_processes_and_names_the_choices_for_anything_else():
    assert lowmem_compile.Options(warmup="processes").warmup == "processes"
    choices = r"warmup='process' is not allowed; choose one of \['thread', 'processes', 'off'\]"
    with pytest.raises(ValueError, match=choices):
        lowmem_compile.Options.from_user({"warmup": "process"})


def test_worker_processes_run_every_site_forward_and_backward_on_the_values_run_site_makes(probe, monkeypatch):
    """Each site runs in a child (another pid, the parent's import path and environment), whose
    backward gives the leaves the gradients the same described site gives in this process."""
    _, spy = _lowered_graph(layers=2)
    found = warmup.sites(spy.gm, spy.example_inputs)
    warm = warmup.start(spy.gm, spy.example_inputs, "processes")
    stats = warm.join()
    assert stats.mode == "processes" and stats.warmed == stats.sites == len(found) and not stats.skipped, stats
    assert stats.workers == min(len(found), warmup.MAX_WORKERS, warmup._cores()) >= 2
    assert all(w.process.returncode == 0 for w in warm.workers)  # exited: none left holding memory
    assert not os.path.exists(os.path.dirname(warm.workers[0].path))
    assert 0 < stats.startup_seconds <= stats.seconds
    children = probe()
    assert len({r["pid"] for r in children}) == stats.workers and os.getpid() not in {r["pid"] for r in children}
    assert all(r["path"] == sys.path and r["env"]["TRITON_INTERPRET"] == os.environ["TRITON_INTERPRET"]
               and r["env"]["TRITON_CACHE_DIR"] == os.environ["TRITON_CACHE_DIR"] for r in children)

    here = []
    backward = torch.autograd.backward

    def recorded(tensors, grad_tensors=None, **kwargs):
        backward(tensors, grad_tensors, **kwargs)
        here.append(_leaf_grads(tensors))

    monkeypatch.setattr(torch.autograd, "backward", recorded)
    for op, args, kwargs in found:
        warmup.run_site(op, *warmup.describe(args, kwargs), torch.device("cpu"), torch.Generator().manual_seed(0))
    assert len(children) == len(here) >= 3  # attention, the NF4 linears, the loss: each one backward
    flat = [g for grads in sorted(map(tuple, here)) for g in grads]
    assert all(g != 0.0 for g in flat)
    assert [g for grads in sorted(tuple(r["grads"]) for r in children) for g in grads] == pytest.approx(flat, rel=1e-4)


@pytest.mark.parametrize("failure, reason", [("raise", "RuntimeError: the probe fails this site"),
                                             ("exit", "not run: worker exited with code 3")])
def test_a_failing_or_crashing_worker_leaves_its_site_to_first_use_and_changes_no_result(probe, monkeypatch, failure,
                                                                                         reason):
    monkeypatch.setenv("LOWMEM_PROBE_MODE", failure)
    inputs, grad = _attention_inputs(), torch.randn(1, 2, 32, 16)
    results = {}
    for mode in ("processes", "off"):
        lowmem_compile.reset()
        torch._dynamo.reset()
        xs = [x.detach().clone().requires_grad_() for x in inputs]
        out = torch.compile(_attention, backend="lowmem", options={"warmup": mode})(*xs)
        out.backward(grad)
        results[mode] = [out.detach()] + [x.grad for x in xs]
        if mode == "processes":
            stats = lowmem_compile.last_report().to_dict()["warmup"]
    assert stats["mode"] == "processes" and stats["workers"] == 1 and stats["sites"] == 1 and stats["warmed"] == 0
    assert stats["skipped"] == [f"left to compile on first use: lowmem::attention: {reason}"]
    assert probe() == []
    assert all(torch.equal(a, b) for a, b in zip(results["processes"], results["off"]))
    out = _attention(*inputs)
    out.backward(grad)
    torch.testing.assert_close(results["processes"], [out.detach()] + [x.grad for x in inputs])


def _fake_attention_site():
    from torch._subclasses import FakeTensorMode

    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        q, k, v = (mode.from_tensor(x) for x in _attention_inputs())
    return [(torch.ops.lowmem.attention.default, (q, k, v, None, None), dict(causal=True, scale=0.25, kv_bits=8))]


@pytest.mark.parametrize("how, reason", [("timeout", "not run: worker timed out, 0.2 s after the warm-up began"),
                                         ("no interpreter", "worker did not start: FileNotFoundError")])
def test_a_worker_that_does_not_start_or_finish_in_time_leaves_its_sites_to_first_use(monkeypatch, how, reason):
    if how == "timeout":
        monkeypatch.setattr(warmup, "WORKER_TIMEOUT_S", 0.2)  # less than the child's imports take
    else:
        monkeypatch.setattr(sys, "executable", "/nonexistent/python")
    warm = warmup._start_workers(_fake_attention_site(), torch.device("cpu"), 2**40)
    directory = warm.directory
    stats = warm.join()
    assert stats.mode == "processes" and stats.sites == 1 and stats.warmed == 0
    assert len(stats.skipped) == 1
    assert stats.skipped[0].startswith(f"left to compile on first use: lowmem::attention: {reason}")
    assert [w.process.returncode for w in warm.workers] == ([-9] if how == "timeout" else [])  # killed: none left running
    assert not os.path.exists(directory)


def test_without_room_for_the_workers_contexts_the_thread_runs_instead(monkeypatch):
    monkeypatch.setattr(warmup, "DEVICE_TYPES", ("cpu",))
    monkeypatch.setattr(warmup, "_free_bytes", lambda device: 3 * warmup.CONTEXT_BYTES)  # a context: 1/3 of it
    inputs = _attention_inputs()
    gm = torch.fx.symbolic_trace(_attention)
    warm = warmup.start(gm, inputs, "processes")
    stats = warm.join()
    assert stats.mode == "thread" and stats.workers == 0 and stats.warmed == stats.sites == 1
    monkeypatch.setattr(warmup, "_free_bytes", lambda device: 5 * warmup.CONTEXT_BYTES)  # room for one
    assert warmup._start_workers(warmup.sites(gm, inputs), torch.device("cpu"), 5 * warmup.CONTEXT_BYTES).join().workers == 1


@pytest.mark.gpu
def test_after_the_worker_processes_the_first_step_loads_our_kernels_and_tunings_from_disk(tmp_path, monkeypatch):
    """A fresh attention form (window 80: used nowhere else in the tests, so no kernel of it is in
    this process's memory; a band, so the autotuners must choose) compiled with "processes" and
    TRITON_CACHE_DIR unset, as by default: the workers write where Inductor then points Triton
    (an empty directory here), and the first call's every launch of our kernels is a disk-cache
    load, with no config tried, and gives what a compile without the warm-up gives."""
    import triton

    from lowmem_compile.codegen import attention_kv4

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    monkeypatch.setenv("TRITON_CACHE_DIR", "")  # restored after the test: the warm-up sets it
    monkeypatch.delenv("TRITON_CACHE_DIR")
    q, k, v = (torch.randn(1, h, 1000, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True) for h in (4, 2, 2))
    grad = torch.randn_like(q)
    form = dict(causal=True, scale=128**-0.5, kv_bits=8, window=80, softcap=0.0)

    def attention(q, k, v):
        return torch.ops.lowmem.attention(q, k, v, None, None, **form)[0].sin()  # sin: a kernel of Inductor's

    tuners = (attention_kv4._fwd, attention_kv4._dq, attention_kv4._dkdv)
    for tuner in tuners:  # set where this process benchmarks configs
        tuner.__dict__.pop("bench_time", None)
    loads = []
    monkeypatch.setattr(triton.knobs.compilation, "listener",
                        lambda src, cache_hit, **_: loads.append((getattr(src, "name", "?"), cache_hit)))
    results = {}
    for mode in ("processes", "off"):
        lowmem_compile.reset()
        torch._dynamo.reset()
        xs = [x.detach().clone().requires_grad_() for x in (q, k, v)]
        y = torch.compile(attention, backend="lowmem", options={"warmup": mode})(*xs)
        y.backward(grad)
        torch.cuda.synchronize()
        results[mode] = [y.detach()] + [x.grad for x in xs]
        if mode == "processes":
            stats = lowmem_compile.last_report().to_dict()["warmup"]
            ours = [(name, hit) for name, hit in loads if not name.startswith("triton_")]  # Inductor's: triton_*
    assert stats["mode"] == "processes" and stats["warmed"] == 1 and not stats["skipped"], stats
    assert os.environ["TRITON_CACHE_DIR"].startswith(str(tmp_path / "inductor"))
    assert ours and all(hit for _, hit in ours), ours
    assert not any(hasattr(tuner, "bench_time") for tuner in tuners)
    assert all(torch.equal(a, b) for a, b in zip(results["processes"], results["off"]))
