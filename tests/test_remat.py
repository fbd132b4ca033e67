"""The recomputation planner on tiny LoRA models: gradients equal eager under every policy, the
predicted saved bytes equal what the compiled forward really returns for the backward, budgets
behave (lower budget → no higher predicted peak; infeasible → lowest peak and a warning), user
checkpoint regions still work, and the symbolic sequence answer is exact at its boundary.
Tolerance: fp32 models, so 1e-4 relative on gradients (reassociation only)."""

from __future__ import annotations

import re
import warnings

import pytest
import torch
from torch._dynamo.backends.common import aot_autograd
from torch._dynamo.backends.debugging import boxed_nop
from torch._inductor.decomposition import select_decomp_table

import lowmem_compile
from lowmem_compile.cost.liveness import peak_at, shape_hints, simulate_step
from lowmem_compile.cost.sizes import storage_root
from lowmem_compile.options import Options
from lowmem_compile.passes.remat import RematPartitioner, _Planner, choose
from lowmem_compile.cost.timing import CPU
from lowmem_compile.report import STORE

from .models import batch, rel_err, tiny_model, trainable_grads, twin

TOL = 1e-4


class _Recorder:
    """An eager inner compiler that keeps what the forward graph returned on its last run."""

    def __init__(self) -> None:
        self.inputs: list = []
        self.outputs: list = []
        self.fw: torch.fx.GraphModule | None = None

    def __call__(self, gm: torch.fx.GraphModule, example_inputs):
        self.fw = gm

        def run(args):
            self.inputs = [a for a in args if isinstance(a, torch.Tensor)]
            out = torch.fx.Interpreter(gm).boxed_run(args)
            self.outputs = list(out)
            return out

        run._boxed_call = True
        return run


def _compile(model, options: dict):
    """torch.compile with the backend's eager wiring, exposing the partitioner and the forward's outputs."""
    opts = Options.from_user({"inner": "eager", **options})
    partitioner = RematPartitioner(opts, STORE.new_graph(nodes=0))
    recorder = _Recorder()
    backend = aot_autograd(
        fw_compiler=recorder,
        bw_compiler=boxed_nop,
        partition_fn=partitioner,
        decompositions=select_decomp_table(),
        keep_inference_input_mutations=True,
    )
    return torch.compile(model, backend=backend), partitioner, recorder


def _check_grads(model, ref):
    ref_grads, grads = trainable_grads(ref), trainable_grads(model)
    assert ref_grads.keys() == grads.keys() and grads
    for name, g in grads.items():
        assert g is not None, name
        assert rel_err(g, ref_grads[name]) < TOL, name


PASSES_OFF = {"attention": "off", "fused_loss": "off", "nf4": "off"}
"""Only the partitioner differs from eager, so gradients must match to reassociation error."""


@pytest.mark.parametrize(
    "family,options",
    [
        ("llama", {"remat": "none"}),
        ("mistral", {"remat": "full"}),
        ("qwen2", {"remat": "auto", "memory_budget": 1}),
    ],
)
def test_gradients_equal_eager_and_saved_bytes_are_predicted(family, options):
    """Every trainable gradient against eager; then the bytes of the storages the forward returned
    for the backward (not aliasing its inputs or the user outputs), measured on the real run,
    against the plan's prediction."""
    ref = tiny_model(family, num_hidden_layers=1)
    model = twin(ref)
    inputs = batch(padding=True)
    expected = ref(**inputs)
    expected.loss.backward()
    compiled, part, rec = _compile(model, options)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got = compiled(**inputs)
    got.loss.backward()
    assert rel_err(got.loss, expected.loss) < TOL
    _check_grads(model, ref)

    plan = part.plans[-1]
    stats = part.report.stats["remat"]
    assert stats.policy == options["remat"]
    assert stats.predicted_peak_bytes == plan.peak > stats.saved_bytes == plan.memory.saved > 0
    if options["remat"] != "none":
        assert stats.recomputed > 0 and stats.added_flops > 0
    out_nodes = rec.fw.graph.find_nodes(op="output")[0].args[0]
    user_idx = range(plan.num_fwd_outputs)
    saved_idx = [i for i, n in enumerate(out_nodes) if i >= plan.num_fwd_outputs and isinstance(n, torch.fx.Node)]
    saved_idx = [i for i in saved_idx if isinstance(rec.outputs[i], torch.Tensor)]
    assert [out_nodes[i].name for i in saved_idx] == plan.saved_names
    skip = {t.untyped_storage().data_ptr() for t in rec.inputs}
    skip |= {rec.outputs[i].untyped_storage().data_ptr() for i in user_idx if isinstance(rec.outputs[i], torch.Tensor)}
    storages = {}
    for i in saved_idx:
        storage = rec.outputs[i].untyped_storage()
        if storage.data_ptr() not in skip:
            storages[storage.data_ptr()] = storage.nbytes()
    assert saved_idx
    assert sum(storages.values()) == plan.memory.saved


def test_with_other_passes_custom_ops():
    """The backend's own passes on (their `lowmem::` ops in the joint graph): a forced-recompute
    plan gives the same gradients as the stock plan."""
    ref = tiny_model("llama", num_hidden_layers=1)
    inputs = batch()
    grads = []
    for options in ({"remat": "none"}, {"remat": "auto", "memory_budget": 1}):
        lowmem_compile.reset()
        model = twin(ref)
        compiled = torch.compile(model, backend="lowmem", options={"inner": "eager", **options})
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            compiled(**inputs).loss.backward()
        grads.append(trainable_grads(model))
    assert lowmem_compile.last_report().to_dict()["remat"]["recomputed"] > 0
    for name, g in grads[1].items():
        assert rel_err(g, grads[0][name]) < TOL, name


def _joint_graph(family="llama", seq=24):
    """The joint graph AOTAutograd hands the partitioner, with its keyword arguments."""
    return _joint_graph_of(tiny_model(family), seq)


def _joint_graph_of(model, seq=24):
    captured = {}

    def grab(gm, joint_inputs, **kwargs):
        captured.update(gm=gm, joint_inputs=joint_inputs, kwargs=kwargs)
        from torch._functorch.partitioners import min_cut_rematerialization_partition

        return min_cut_rematerialization_partition(gm, joint_inputs, **kwargs)

    backend = aot_autograd(fw_compiler=boxed_nop, bw_compiler=boxed_nop, partition_fn=grab, decompositions=select_decomp_table())
    torch.compile(model, backend=backend)(**batch(seq=seq)).loss.backward()
    return captured


@pytest.fixture(scope="module")
def joint():
    return _joint_graph()


def test_lower_budget_never_gives_higher_peak(joint):
    planner = _Planner(joint["gm"], joint["joint_inputs"], dict(joint["kwargs"], compiler="inductor"), fused=False, rates=CPU)
    stock = planner.partition("none", {})
    plans = [stock] + planner.greedy_family(stock) + [planner.layer_plan(k) for k in range(1, len(planner.layers) + 1)]
    peaks = sorted({p.peak for p in plans})
    assert len(peaks) >= 3, "the plan family should offer several peaks"
    assert min(p.peak for p in plans) < stock.peak
    budgets = sorted({b + d for b in peaks for d in (-1, 0, 1)} | {1, stock.peak * 2})
    chosen = [choose(plans, b)[0] for b in budgets]
    for b, plan in zip(budgets, chosen):
        assert plan.peak <= b or plan.peak == peaks[0]
    for lo, hi in zip(chosen, chosen[1:]):
        assert lo.peak <= hi.peak
        assert lo.added_seconds >= hi.added_seconds
    # end to end through the partitioner: two budgets, the lower never peaks higher
    results = []
    for budget in (peaks[-1] - 1, peaks[1]):
        part = RematPartitioner(Options(inner="eager", memory_budget=budget), STORE.new_graph(nodes=0))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            part(joint["gm"], joint["joint_inputs"], **joint["kwargs"])
        results.append(part.plans[-1].peak)
    assert results[1] <= results[0] <= peaks[-1] - 1


def test_layer_search_finds_the_fewest_layers_that_fit():
    """The interpolating search returns what enumerating every layer count would: the smallest k
    whose plan fits. Four layers, so that the search has an inside to bracket."""
    captured = _joint_graph_of(tiny_model("llama", num_hidden_layers=4))
    planner = _Planner(captured["gm"], captured["joint_inputs"], dict(captured["kwargs"], compiler="inductor"), fused=False, rates=CPU)
    assert len(planner.layers) == 4
    stock = planner.partition("none", {})
    every = [stock] + [planner.layer_plan(k) for k in range(1, 5)]
    planner.layer_plan = every.__getitem__  # the search's choices, without partitioning each plan again
    peaks = [p.peak for p in every]
    assert peaks == sorted(peaks, reverse=True) and peaks[-1] < peaks[0], peaks
    for k in range(1, 5):
        budget = peaks[k]  # the plan with k layers just fits, k - 1 does not (when their peaks differ)
        found = [p for p in planner.layer_search(stock, budget) if p.peak <= budget]
        smallest = min(j for j in range(5) if peaks[j] <= budget)
        if smallest == 0:
            continue  # the search starts where the stock plan does not fit
        assert min(found, key=lambda p: p.added_seconds).name == every[smallest].name


def test_infeasible_budget_gives_lowest_peak_and_warns(joint):
    part = RematPartitioner(Options(inner="eager", memory_budget=1000), STORE.new_graph(nodes=0))
    with pytest.warns(UserWarning, match="infeasible"):
        part(joint["gm"], joint["joint_inputs"], **joint["kwargs"])
    stats = part.report.stats["remat"]
    assert any("GiB over" in n for n in stats.notes)
    assert stats.predicted_peak_bytes == part.plans[-1].peak > 1000


def test_peak_note_accounts_for_the_whole_peak(joint):
    """The values the report names at the predicted peak add up to it: resident + live (+ the outputs
    held through the backward when the peak is there), listed largest first."""
    part = RematPartitioner(Options(inner="eager", remat="none"), STORE.new_graph(nodes=0))
    part(joint["gm"], joint["joint_inputs"], **joint["kwargs"])
    memory = part.plans[-1].memory
    where, *values = memory.peak_values
    assert where[0].startswith("@") and values
    assert memory.resident + sum(size for _, size in values) == memory.peak
    note = next(n for n in part.report.stats["remat"].notes if n.startswith("peak in the"))
    named = re.findall(r"(\S+) (\d+) MiB", note.split(": ", 1)[1])
    sizes = [int(mib) for name, mib in named if name != "more"]
    assert sizes == sorted(sizes, reverse=True) and sizes[0] == round(max(v for _, v in values) / 2**20)


def test_user_checkpoint_regions():
    """HF gradient checkpointing (non-reentrant torch.utils.checkpoint) with a forced-recompute plan."""
    ref = tiny_model("llama")
    ref.train()
    inputs = batch()
    ref(**inputs).loss.backward()
    model = twin(ref)
    model.zero_grad(set_to_none=True)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    compiled, part, _ = _compile(model, {"remat": "auto", "memory_budget": 1})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        compiled(**inputs).loss.backward()
    _check_grads(model, ref)
    assert part.plans[-1].recomputed


def test_longest_sequence_matches_boundary():
    """Dynamic sequence length: the report's answer L satisfies peak(L) <= budget < peak(L + 1)."""
    model = tiny_model("llama")
    inputs = batch(seq=24)
    torch._dynamo.mark_dynamic(inputs["input_ids"], 1)
    torch._dynamo.mark_dynamic(inputs["labels"], 1)
    budget = 3 * 2**20
    compiled, part, _ = _compile(model, {"remat": "none", "memory_budget": budget})
    compiled(**inputs).loss.backward()
    plan = part.plans[-1]
    stats = part.report.stats["remat"]
    assert stats.longest_fitting_seq is not None
    n = stats.longest_fitting_seq
    sym_memory = simulate_step(plan.fw, plan.bw, plan.num_fwd_outputs, fused=False, symbolic=True)
    hints = shape_hints(plan.fw)
    seqs = [s for s in set().union(*(e.free_symbols for e in sym_memory.peak_exprs)) if hints[s] == 24]
    assert len(seqs) == 1, seqs
    at = lambda length: peak_at(sym_memory.peak_exprs, {**hints, seqs[0]: length})  # noqa: E731
    assert at(24) == plan.peak
    assert at(n) <= budget < at(n + 1)
    assert n > 24


def inductor_step_matches_eager(options: dict, layers: int = 2) -> dict:
    """One step of a tiny Llama through `backend="lowmem"` with Inductor: trainable gradients within
    1e-3 of eager's; returns the report's remat entry."""
    ref = tiny_model("llama", num_hidden_layers=layers)
    model = twin(ref)
    inputs = batch()
    ref(**inputs).loss.backward()
    compiled = torch.compile(model, backend="lowmem", options={**options, **PASSES_OFF})
    # a compile-cache hit would skip the partitioner (and its report): compile afresh
    with warnings.catch_warnings(), torch._inductor.config.patch(force_disable_caches=True):
        warnings.simplefilter("ignore")
        compiled(**inputs).loss.backward()
    ref_grads = trainable_grads(ref)
    for name, g in trainable_grads(model).items():
        assert rel_err(g, ref_grads[name]) < 1e-3, name
    return lowmem_compile.last_report().to_dict()["remat"]


@pytest.mark.slow
def test_inductor_gradients_equal_eager():
    assert inductor_step_matches_eager({"remat": "auto", "memory_budget": 1})["recomputed"] > 0


def testdevice_of_training_joint_inputs():
    """AOTAutograd hands a training graph's inputs as (primals, tangents): the CUDA device must be
    found inside the pair, or the time model silently uses the CPU's rates (200x slower matmuls)."""
    from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

    from lowmem_compile.passes.remat import device_of

    mode = FakeTensorMode()
    on_gpu = FakeTensor(mode, torch.empty(4, 4, device="meta"), torch.device("cuda", 0))
    cpu = torch.randn(3)
    assert device_of(([cpu, on_gpu], [cpu])) == torch.device("cuda", 0)
    assert device_of([cpu, 2, None]) == torch.device("cpu")


def test_candidates_skip_user_outputs(joint):
    """The logits are both saved and returned: recomputing them frees nothing (the caller holds
    them) and would add a second copy in the backward, so they are never a candidate."""
    planner = _Planner(joint["gm"], joint["joint_inputs"], dict(joint["kwargs"], compiler="inductor"), fused=True, rates=CPU)
    stock = planner.partition("none", {})
    out = stock.fw.graph.find_nodes(op="output")[0].args[0]
    user = {storage_root(o).name for o in out[: stock.num_fwd_outputs] if isinstance(o, torch.fx.Node)}
    saved_roots = {storage_root(n).name for n in stock.fw.graph.nodes if n.name in stock.saved_names}
    assert user & saved_roots, "the logits should be saved by the stock plan"
    names = {name for _, tags, _ in planner.candidates(stock) for name in tags}
    assert names and not names & user


def test_full_saves_only_what_flows_between_layers(monkeypatch):
    """`remat="full"` with the backend's own passes on: a layer's saved values are the ones a later
    layer or the tail reads (its output), never its insides. Two bugs kept more: nodes inserted by a
    pass without the replaced node's module path (an attention op looked as if outside its layer, so
    its output was saved) and backward nodes that read no tangent counted as the model's tail (a
    norm's fp32 input and the MLP's up projection were saved). On Llama-3-8B at 8192 tokens that was
    535 MiB a layer to park in host memory instead of the 64 MiB layer input."""
    from lowmem_compile.passes.remat import layer_of, saved_values

    plans = []
    original = RematPartitioner.__call__

    def keep_plan(self, gm, joint_inputs, **kwargs):
        result = original(self, gm, joint_inputs, **kwargs)
        plans.extend(self.plans)
        return result

    monkeypatch.setattr(RematPartitioner, "__call__", keep_plan)
    lowmem_compile.reset()
    model = tiny_model("llama", num_hidden_layers=3)
    # the whole step in one graph: what flows between layers is inside it
    compiled = torch.compile(model, backend="lowmem", options={"inner": "eager", "remat": "full", "layers": "off"})
    compiled(**batch(seq=24)).loss.backward()
    plan = plans[-1]
    assert plan.name == "full"
    layers = list(dict.fromkeys(layer for n in plan.fw.graph.nodes if (layer := layer_of(n))))
    assert len(layers) == 3
    assert lowmem_compile.last_report().to_dict()["attention"]["replaced"] == 3
    order = {n: i for i, n in enumerate(plan.fw.graph.nodes)}
    inside = [order[n] for n in plan.fw.graph.nodes if layer_of(n)]
    by_layer: dict[str, list[torch.fx.Node]] = {}
    for node in saved_values(plan.fw, plan.num_fwd_outputs):
        if node.op != "call_function":
            continue
        if layer_of(node) is None:  # before the layers (embedding) or after them (the tail), never amid
            assert not min(inside) < order[node] < max(inside), f"{node.name} ({node.target}) has no layer"
        elif layer_of(node) in layers[:-1]:
            by_layer.setdefault(layer_of(node), []).append(node)
    assert set(by_layer) == set(layers[:-1])  # each earlier layer hands its output on
    for layer, saved in by_layer.items():
        for node in saved:
            readers = {layer_of(u) for u in node.users if u.op != "output"}
            assert readers - {layer}, f"{node.name} ({node.target}) is saved but read only inside {layer}"


@pytest.mark.parametrize("use_cache", [True, False])
def test_report_names_a_returned_kv_cache(use_cache):
    """A model that returns its K/V cache while training holds bf16 K/V the 4-bit backward does not
    need: the remat notes say so, with what to set; without a cache (logits dropped) nothing is said."""
    lowmem_compile.reset()
    model = tiny_model("llama", num_hidden_layers=2)
    model.config.use_cache = use_cache
    compiled = torch.compile(model, backend="lowmem", options={"inner": "eager", "logits": "drop"})
    compiled(**batch()).loss.backward()
    notes = [n for n in lowmem_compile.last_report().to_dict()["remat"]["notes"] if "besides its loss" in n]
    if use_cache:
        assert len(notes) == 1 and "4 tensors" in notes[0] and "use_cache = False" in notes[0], notes
    else:
        assert notes == []
