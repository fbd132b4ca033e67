"""Per-layer compilation (passes/layers.py): the repeated decoder layers compile once and the step
still computes what eager computes; layers that differ compile one body per kind; a graph with no
repeated layers compiles whole and the report says why; the step's predicted peak is composed from
the body's plan."""

from __future__ import annotations

import time
import warnings

import pytest
import torch

import lowmem_compile
from lowmem_compile.passes import remat
from tests.models import LORA_TARGETS, assert_step_matches_eager, batch, rel_err, tiny_model, trainable_grads, twin

#: fp32 eager against fp32 compiled (kv16 attention, exact): both sum the same terms in other orders.
TOL = 1e-4


def _step(model, options, inputs):
    lowmem_compile.reset()
    out = torch.compile(model, backend="lowmem", options=options)(**inputs)
    out.loss.backward()
    return out.loss.detach(), trainable_grads(model), lowmem_compile.last_report().to_dict()


def _assert_matches_eager(model, options, inputs):
    return assert_step_matches_eager(model, twin(model), inputs, options, TOL)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_six_layers_compile_one_body_and_match_eager(attn):
    model = tiny_model("llama", attn, num_hidden_layers=6)
    report = _assert_matches_eager(model, {"inner": "eager", "attention": "kv16"}, batch(padding=True))
    assert report["layers"] == {"bodies": 1, "calls": 6, "skipped": [], "apart": [], "run_as_fx": 0, "masks_unbuilt": 0}
    assert report["attention"]["replaced"] == 6 and report["loss"]["fused"] == 1


def test_a_step_input_as_the_first_layers_hidden_state_shares_the_body():
    """Called with `inputs_embeds` (a float step input that requires no grad), the first layer's
    hidden state comes from outside the graph rather than from a region of it: still one body for
    every layer (activations count as requiring grad in the signature), and the step matches eager.
    On CUDA the first layer compiled apart on such an input (2026-12-07T15, `layers.apart`)."""
    model = tiny_model("llama", num_hidden_layers=3)
    reference = twin(model)
    data = batch(padding=True)
    embeds = model.get_input_embeddings()(data["input_ids"]).detach()
    inputs = {"inputs_embeds": embeds, "attention_mask": data["attention_mask"], "labels": data["labels"]}
    report = _assert_matches_eager(model, {"inner": "eager", "attention": "kv16"}, inputs)
    assert report["layers"]["bodies"] == 1 and report["layers"]["calls"] == 3, report["layers"]["apart"]


def _region_graph(hidden_requires_grad: bool) -> torch.fx.GraphModule:
    """A layer region whose graph starts with a non-input node, as regions split on CUDA did."""
    graph = torch.fx.Graph()
    root = torch.nn.Module()
    root.register_buffer("scale", torch.ones(8))
    scale = graph.get_attr("scale")
    hidden = graph.placeholder("hidden")
    hidden.meta["val"] = torch.randn(2, 8, requires_grad=hidden_requires_grad)
    weight = graph.placeholder("weight")
    weight.meta["val"] = torch.nn.Parameter(torch.randn(8, 8), requires_grad=False)
    graph.output(graph.call_function(torch.matmul, (graph.call_function(torch.mul, (hidden, scale)), weight)))
    return torch.fx.GraphModule(root, graph)


def test_the_body_key_counts_activations_among_inputs_not_nodes():
    """The activation positions index the region's inputs; a node before the first input must not
    shift them (on CUDA layer 0 compiled apart this way, 2026-12-07T16: its hidden state kept
    `requires_grad=False` in the key). The frozen weight keeps its flag."""
    from lowmem_compile.passes.layers import _is_activation, body_key, placeholders_of

    first, other = _region_graph(False), _region_graph(True)
    activations = [i for i, p in enumerate(placeholders_of(first)) if _is_activation(p)]
    assert activations == [0]
    assert body_key(first, activations) == body_key(other, activations)
    assert body_key(first, []) != body_key(other, [])


def test_the_first_layers_unused_input_gradient_is_not_kept():
    """A body compiled for a hidden state that needs a gradient, called with one that needs none (the
    first layer's): the input it is given requires grad, the weights' gradients are right, and the
    input's gradient is dropped once computed instead of living on in a leaf's `.grad` to the end
    of the backward (on an H100 the shared body raised the step's peak by 0.24 GiB,
    bench/results/layers/2026-12-07T16/)."""
    from lowmem_compile.backend import _CompiledRegion

    seen = {}

    def body(hidden, weight):
        seen["hidden"] = hidden
        return ((hidden * weight).tanh(),)

    region = _CompiledRegion(body, single_output=True, requires_grad=[0], no_grad=[])
    hidden, weight = torch.randn(3, 5, dtype=torch.float64), torch.randn(5, dtype=torch.float64, requires_grad=True)
    region(hidden, weight).sum().backward()
    assert seen["hidden"].requires_grad and not hidden.requires_grad
    expected = ((1 - (hidden * weight.detach()).tanh() ** 2) * hidden).sum(0)
    assert torch.allclose(weight.grad, expected, rtol=1e-12)
    given = seen["hidden"]
    assert given.grad_fn is not None, "a leaf: its .grad keeps the unused gradient"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # reading a non-leaf's .grad warns
        assert given.grad is None


def test_full_recompute_and_offload_on_the_body(monkeypatch):
    """`remat="full"` inside the body and every call's saved values parked in host memory: exact,
    and the report counts what every call recomputes and parks."""
    monkeypatch.setattr(remat.offload, "MIN_BYTES", 1)  # the tiny model's values are all small
    model = tiny_model("qwen2", num_hidden_layers=4)
    options = {"inner": "eager", "attention": "kv16", "remat": "full", "offload": "layers", "mlp_chunks": 2}
    report = _assert_matches_eager(model, options, batch(padding=True))
    assert report["layers"]["bodies"] == 1 and report["layers"]["calls"] == 4
    assert report["mlp"]["chunked"] == 4
    assert report["remat"]["recomputed"] > 0 and report["remat"]["recomputed"] % 4 == 0
    assert report["remat"]["offloaded_bytes"] > 0 and report["remat"]["offloaded_bytes"] % 4 == 0


def test_parking_stays_within_the_hosts_share(monkeypatch):
    """With less host memory allowed than every call's saved values take, each call parks only what
    fits (largest first), the rest stays on the device, the report says so, and the step is still
    exact."""
    monkeypatch.setattr(remat.offload, "MIN_BYTES", 1)
    model = tiny_model("qwen2", num_hidden_layers=4)
    options = {"inner": "eager", "attention": "kv16", "remat": "none", "offload": "layers"}  # many saved values
    unlimited = _step(model, options, batch(padding=True))[2]["remat"]
    model.zero_grad(set_to_none=True)
    parked_all = unlimited["offloaded_bytes"]
    assert parked_all > 0 and not any("host memory: parking all" in n for n in unlimited["notes"])
    limit = parked_all // 2
    monkeypatch.setattr(remat.offload, "host_bytes_for_parking", lambda: limit)
    report = _assert_matches_eager(model, options, batch(padding=True))
    assert 0 < report["remat"]["offloaded_bytes"] <= limit
    assert any(n.startswith("layer body: host memory: parking all would take") for n in report["remat"]["notes"])


def test_layers_of_two_kinds_compile_two_bodies():
    """LoRA on every other layer: two layer graphs, each compiled once, the step exact."""
    import peft

    base = tiny_model("mistral", lora=False, num_hidden_layers=6)
    model = peft.get_peft_model(base, peft.LoraConfig(r=8, target_modules=LORA_TARGETS, layers_to_transform=[0, 2, 4]))
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.02)
    report = _assert_matches_eager(model, {"inner": "eager", "attention": "kv16"}, batch())
    assert report["layers"]["bodies"] == 2 and report["layers"]["calls"] == 6 and not report["layers"]["skipped"]
    (apart,) = report["layers"]["apart"]  # where the LoRA-less layers' graph leaves the LoRA layers'
    assert "layers.1 (3 calls) differs from" in apart and "layers.0" in apart, apart


def test_whole_graph_and_layers_agree():
    """`layers="off"` (one graph) and the per-layer compile give the same loss and gradients, and
    predict the step's peak alike (the per-layer figure is composed from one body: cost/layered.py)."""
    model = tiny_model("llama", num_hidden_layers=4)
    inputs = batch(padding=True)
    options = {"inner": "eager", "attention": "kv16", "remat": "full"}
    whole = _step(twin(model), {**options, "layers": "off"}, inputs)
    split = _step(model, options, inputs)
    assert "one graph" not in str(whole[2]["layers"]["skipped"]) and whole[2]["layers"]["bodies"] == 0
    assert split[2]["layers"]["bodies"] == 1
    assert abs(split[0].item() - whole[0].item()) <= TOL * abs(whole[0].item())
    for name, grad in whole[1].items():
        assert rel_err(split[1][name], grad) < TOL, name
    ratio = split[2]["remat"]["predicted_peak_bytes"] / whole[2]["remat"]["predicted_peak_bytes"]
    assert 0.8 < ratio < 1.25, ratio


class _TwoNamedLayers(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.up, self.down = torch.nn.Linear(16, 32), torch.nn.Linear(32, 16)

    def forward(self, x):
        return self.down(torch.nn.functional.gelu(self.up(x)))


@pytest.mark.parametrize("model, why", [
    (_TwoNamedLayers(), "no repeated layers"),
    (torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.Linear(32, 16)), "none of the 3 layers"),
])
def test_a_graph_without_repeated_layers_compiles_whole_and_says_why(model, why):
    lowmem_compile.reset()
    torch.compile(model, backend="lowmem", options={"inner": "eager"})(torch.randn(4, 16)).sum().backward()
    layers = lowmem_compile.last_report().to_dict()["layers"]
    assert layers["bodies"] == 0 and why in layers["skipped"][0]
    assert why in str(lowmem_compile.last_report())


def _backend_seconds(layers: int, inner: str) -> float:
    """Seconds the backend takes to compile a tiny Llama of `layers` layers (passes, split, AOTAutograd,
    partitions, code): Dynamo's own trace of the model, which still grows with depth, left out."""
    from lowmem_compile.backend import lowmem_backend

    seconds = []

    def timed(gm, example_inputs):
        start = time.perf_counter()
        compiled = lowmem_backend(gm, example_inputs, {"inner": inner, "remat": "full"})
        seconds.append(time.perf_counter() - start)
        return compiled

    from torch._inductor.utils import fresh_cache

    lowmem_compile.reset()
    with fresh_cache():  # a cold compile: the bodies of 2, 3 and 12 layers are one graph, which the caches keep
        torch.compile(tiny_model("llama", num_hidden_layers=layers), backend=timed)(**batch()).loss.backward()
    return sum(seconds)


def test_compile_time_does_not_grow_with_depth():
    """12 layers compile in under 1.5x the time of 3 (same process, Inductor on the CPU): one body is
    traced, planned and generated whatever the depth. (With `inner="eager"` there is no code
    generation, and what is left, the passes over the whole graph and its split, grows with depth.)"""
    _backend_seconds(2, "inductor")  # warm imports, op registration and Inductor's own start
    three, twelve = _backend_seconds(3, "inductor"), _backend_seconds(12, "inductor")
    assert twelve < 1.5 * three, (three, twelve)


@pytest.mark.gpu
def test_layers_on_cuda_match_the_whole_graph():
    """Inductor and our Triton kernels on CUDA (bf16, 4-bit weights, 4 layers, the lean options): the
    per-layer compile trains like the whole-graph compile of the same step. Same kernels, other
    fusion boundaries: bf16 rounding differs at the layer edges only."""
    torch.manual_seed(0)
    model = tiny_model("llama", dtype=torch.bfloat16, num_hidden_layers=4, hidden_size=256, intermediate_size=512,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=64).cuda()
    lowmem_compile.quantize_(model)
    inputs = {k: v.cuda() for k, v in batch(seq=512, padding=True).items()}
    options = {"remat": "full", "offload": "layers", "mlp_chunks": 2, "logits": "drop", "attention": "kv16"}
    whole = _step(twin(model), {**options, "layers": "off"}, inputs)
    split = _step(model, options, inputs)
    assert split[2]["layers"]["bodies"] == 1 and whole[2]["layers"]["bodies"] == 0, split[2]["layers"]["apart"]
    assert abs(split[0].item() - whole[0].item()) <= 1e-2 * abs(whole[0].item())
    for name, grad in whole[1].items():
        assert rel_err(split[1][name], grad) < 3e-2, name


def test_a_second_compile_of_the_bodies_comes_from_aotautograds_cache(tmp_path):
    """Compiled again (a new process would do the same), every region of the per-layer compile is an
    AOTAutograd cache hit: no trace, no partition; the report still has the plan (recorded by the
    first compile) and the step the same loss."""
    from torch._dynamo.utils import counters
    from torch._inductor.utils import fresh_cache

    def step():
        lowmem_compile.reset()
        torch.manual_seed(0)
        model = tiny_model("llama", num_hidden_layers=4)
        out = torch.compile(model, backend="lowmem", options={"remat": "full", "attention": "kv16"})(**batch())
        out.loss.backward()
        return out.loss.item(), lowmem_compile.last_report().to_dict()

    with fresh_cache(dir=str(tmp_path)), torch._functorch.config.patch(enable_autograd_cache=True):
        counters.clear()
        first_loss, first = step()
        saved = counters["aot_autograd"]["autograd_cache_saved"]
        assert saved >= 2 and counters["aot_autograd"].get("autograd_cache_hit", 0) == 0  # the tail and the body
        second_loss, second = step()
        assert counters["aot_autograd"]["autograd_cache_hit"] == saved
    assert first["layers"]["bodies"] == second["layers"]["bodies"] == 1
    assert second["remat"]["predicted_peak_bytes"] == first["remat"]["predicted_peak_bytes"] > 0
    assert second_loss == first_loss
