"""The token-chunked MLP pass on tiny LoRA models: loss and every trainable gradient equal eager
(fp32, so 1e-5 relative: reassociation only), at piece counts that do not divide the sequence,
with NF4 layers and under every remat policy; sites it must not split are reported, not split;
and under `remat="full"` the cost model predicts a lower peak with pieces than without. NF4 MLP
weights are dequantized once a block in the forward and once in the backward, never per piece, and
never saved (or parked) for the backward in 16 bits."""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.backends import debugging

import lowmem_compile
from lowmem_compile.cost.timing import node_flops
from lowmem_compile.options import Options
from lowmem_compile.passes import offload, remat
from lowmem_compile.passes.chunk_mlp import AUTO_MAX_PIECES, ChunkMLPPass

from .models import batch, rel_err, tiny_model, trainable_grads, twin
from .test_nf4_models import _step, _weight_shapes

TOL = 1e-5
#: The MLP pass alone, on one graph of the whole step (these tests count nodes per graph; the per-layer
#: compile of the same pass is tests/test_layers.py's).
OTHER_PASSES_OFF = {"attention": "off", "fused_loss": "off", "layers": "off"}


def _run(model, inputs, **options):
    lowmem_compile.reset()
    compiled = torch.compile(model, backend="lowmem", options={"inner": "eager", **OTHER_PASSES_OFF, **options})
    out = compiled(**inputs)
    out.loss.backward()
    return out, lowmem_compile.last_report().to_dict()


def _check(model, ref, out, ref_out):
    assert rel_err(out.loss, ref_out.loss) < TOL
    grads, ref_grads = trainable_grads(model), trainable_grads(ref)
    assert grads.keys() == ref_grads.keys() and grads
    for name, g in grads.items():
        assert rel_err(g, ref_grads[name]) < TOL, name


@pytest.mark.parametrize(
    "family,pieces,remat,seq",
    [("llama", 3, "none", 25), ("gemma", 4, "full", 23), ("qwen2", 2, "auto", 24), ("mistral", 5, "full", 7)],
)
def test_gradients_equal_eager(family, pieces, remat, seq):
    torch.manual_seed(0)
    model = tiny_model(family)
    ref = twin(model)
    inputs = batch(seq=seq, padding=True)
    ref_out = ref(**inputs)
    ref_out.loss.backward()
    out, report = _run(model, inputs, mlp_chunks=pieces, remat=remat)
    assert report["mlp"] == {"chunked": 2, "chunks": pieces, "skipped": []}
    _check(model, ref, out, ref_out)


def test_nf4_layers_and_auto_pieces():
    """Linears already in NF4 (`quantize_`) are split like any other; "auto" takes ~2048 tokens a
    piece, so 2 x 2100 tokens become 3 pieces."""
    torch.manual_seed(0)
    model = tiny_model("llama", max_position_embeddings=4096)
    lowmem_compile.quantize_(model)
    ref = twin(model)
    inputs = batch(size=2, seq=2100)
    ref_out = ref(**inputs)
    ref_out.loss.backward()
    out, report = _run(model, inputs, mlp_chunks="auto", nf4="auto")
    assert report["nf4"]["lowered"] > 0
    assert report["mlp"]["chunked"] == 2 and report["mlp"]["chunks"] == 3
    _check(model, ref, out, ref_out)


class _InnerGraphs:
    """The graphs AOTAutograd hands the eager inner compiler (forward, then backward) and the plans
    the partitioner chose, for one compiled step."""

    def __init__(self, monkeypatch) -> None:
        self.graphs: list[torch.fx.GraphModule] = []
        self.plans: list[remat.Plan] = []
        nop, partition = debugging.boxed_nop, remat.RematPartitioner.__call__

        def record(gm, example_inputs):
            self.graphs.append(gm)
            return nop(gm, example_inputs)

        def keep_plan(partitioner, *args, **kwargs):
            result = partition(partitioner, *args, **kwargs)
            self.plans.append(partitioner.plans[-1])
            return result

        monkeypatch.setattr(debugging, "boxed_nop", record)
        monkeypatch.setattr(remat.RematPartitioner, "__call__", keep_plan)

    def dequantized(self, backward: bool) -> list[torch.fx.Node]:
        (gm,) = [g for g in self.graphs if backward == any(p.name.startswith("tangents") for p in g.graph.nodes)]
        return [n for n in gm.graph.nodes if n.target is torch.ops.lowmem.nf4_dequantize.default]


NF4_MLP_WEIGHTS = 2 * 3  # 2 layers: gate, up, down


@pytest.mark.parametrize(
    "options,config",
    [
        ({"remat": "full"}, {"mlp_bias": True}),
        ({"remat": "auto"}, {}),
        ({"remat": "none"}, {}),
        ({"remat": "full", "offload": "parked"}, {}),
    ],
    ids=["full-bias", "auto", "none", "parked"],
)
def test_nf4_weights_dequantized_once_a_block_and_never_saved(monkeypatch, options, config):
    """Each NF4 MLP weight is dequantized once in the forward and once in the backward (not once a
    piece: before, 2 pieces ran nf4_linear 12 times in the forward and dequantized 20 times in the
    backward), the dequantized weight is never a value saved for the backward (MUST_RECOMPUTE; under
    `auto` without the tag the min-cut saves it), nor parked in host memory by `full+parked`, and
    loss and LoRA gradients are those of eager on the same NF4 weights (fp32: reassociation only),
    with biases on the projections too."""
    if options.get("offload") == "parked":
        monkeypatch.setattr(offload, "MIN_BYTES", 1)
        monkeypatch.setattr(remat._Planner, "layer_plan", lambda self, k: self.parked_plan())
    model = tiny_model("llama", **config)
    lowmem_compile.quantize_(model)
    for name, p in model.named_parameters():
        if name.endswith("base_layer.bias"):  # HF starts them at zero
            torch.nn.init.normal_(p, std=0.1)
    ref = twin(model)
    inputs = batch(padding=True)
    ref_out = _step(ref, inputs)
    inner = _InnerGraphs(monkeypatch)
    saved: list[torch.Tensor] = []
    options = {"inner": "eager", **OTHER_PASSES_OFF, "mlp_chunks": 2, **options}
    out = _step(torch.compile(model, backend="lowmem", options=options), inputs, saved)
    report = lowmem_compile.last_report().to_dict()
    assert report["mlp"]["chunked"] == 2 and report["mlp"]["chunks"] == 2
    _check(model, ref, out, ref_out)
    for backward in (False, True):
        nodes = inner.dequantized(backward)
        assert len(nodes) == len({n.args[0] for n in nodes}) == NF4_MLP_WEIGHTS, (backward, nodes)
    big = [tuple(t.shape) for t in saved if t.is_floating_point() and tuple(t.shape) in _weight_shapes(model)]
    assert not big, f"dequantized weights saved for backward: {big}"
    if "offload" in options:
        assert inner.plans[-1].name == "full+parked" and inner.plans[-1].offloaded_bytes > 0


@pytest.mark.parametrize("remat_policy,pieces", [("full", "off"), ("auto", "off"), ("full", 2)])
def test_graph_matmuls_dequantize_once_and_never_save(monkeypatch, remat_policy, pieces):
    """`nf4_matmul="graph"`: every NF4 linear of more than 16 tokens becomes a dequantize node and
    the graph's own linear: one dequantization a weight in the forward and one in the backward
    (shared by the recomputation and the gradient), no `nf4_linear` left, nothing weight-shaped
    saved, loss and gradients those of eager on the same weights; the MLP still splits into pieces
    (its weights are then computed inside the block's span and move ahead of the pieces)."""
    model = tiny_model("llama")
    lowmem_compile.quantize_(model)
    ref = twin(model)
    inputs = batch(padding=True)  # 2 x 24 tokens: above the GEMV's 16
    ref_out = _step(ref, inputs)
    inner, saved = _InnerGraphs(monkeypatch), []
    options = {"inner": "eager", **OTHER_PASSES_OFF, "nf4_matmul": "graph", "remat": remat_policy, "mlp_chunks": pieces}
    out = _step(torch.compile(model, backend="lowmem", options=options), inputs, saved)
    assert lowmem_compile.last_report().to_dict()["mlp"]["chunked"] == (0 if pieces == "off" else 2)
    _check(model, ref, out, ref_out)
    weights = sum(type(m).__name__ == "NF4Linear" for m in model.modules())
    forward, backward = inner.dequantized(False), inner.dequantized(True)
    assert len(forward) == len({n.args[0] for n in forward}) == weights
    # "full" recomputes every projection; otherwise the first layer's q/k/v need W for nothing (no
    # gradient flows into the frozen embeddings): at most once each either way
    assert len(backward) == len({n.args[0] for n in backward}) == (weights if remat_policy == "full" else weights - 3)
    assert not any(n.target is torch.ops.lowmem.nf4_linear.default for gm in inner.graphs for n in gm.graph.nodes)
    big = [tuple(t.shape) for t in saved if t.is_floating_point() and tuple(t.shape) in _weight_shapes(model)]
    assert not big, f"dequantized weights saved for backward: {big}"


def test_graph_matmuls_leave_few_tokens_to_the_op(monkeypatch):
    """16 tokens or fewer keep `nf4_linear` (its GEMV reads the 4-bit weight once)."""
    model = tiny_model("llama")
    lowmem_compile.quantize_(model)
    inner = _InnerGraphs(monkeypatch)
    options = {"inner": "eager", **OTHER_PASSES_OFF, "nf4_matmul": "graph"}
    _step(torch.compile(model, backend="lowmem", options=options), batch(size=2, seq=8))
    assert not inner.dequantized(False)
    assert any(n.target is torch.ops.lowmem.nf4_linear.default for n in inner.graphs[0].graph.nodes)


def test_nf4_chunked_equals_unchunked_and_its_weights_count_in_the_peak(monkeypatch):
    """Under `remat="full"`, the MLP in 2 pieces gives the loss and LoRA gradients of the MLP whole
    (fp32: reassociation only). With the weights dominating (intermediate 1024, 8 tokens), the cost
    model's peak holds a layer's three dequantized weights at once, as the backward does: the
    predicted peak is not under what the pieces really hold. The time model charges the dequantize
    its bytes, not the FLOPs of a matmul."""
    model = tiny_model("llama", num_hidden_layers=1, intermediate_size=1024)
    lowmem_compile.quantize_(model)
    inputs = batch(size=1, seq=8)
    runs, inner = {}, _InnerGraphs(monkeypatch)
    for pieces in ("off", 2):
        twin_model = twin(model)
        out, _ = _run(twin_model, inputs, mlp_chunks=pieces, remat="full")
        runs[pieces] = (twin_model, out, inner.plans[-1])
    (whole, whole_out, _), (chunked, chunked_out, plan) = runs["off"], runs[2]
    _check(chunked, whole, chunked_out, whole_out)
    weight_bytes = 1024 * 64 * 4
    dequantized = {n.name for gm in (plan.fw, plan.bw) for n in gm.graph.nodes
                   if n.target is torch.ops.lowmem.nf4_dequantize.default}
    live = dict(plan.memory.peak_values[1:])
    assert [live[name] for name in dequantized & live.keys()] == [weight_bytes] * 3, plan.memory.peak_values
    assert not any(node_flops(n) for n in plan.bw.graph.nodes if n.name in dequantized)  # it moves bytes
    assert plan.peak >= plan.memory.resident + 3 * weight_bytes


@pytest.mark.parametrize("tokens, pieces", [(4200, 3), (16384, 8), (32768, AUTO_MAX_PIECES), (131072, AUTO_MAX_PIECES)])
def test_auto_pieces_are_capped(tokens, pieces):
    """"auto" takes ~2048 tokens a piece up to AUTO_MAX_PIECES: each piece copies the block's nodes,
    and 64 copies of every MLP (131072 tokens) made a step too large to compile in minutes."""
    x = torch.fx.Graph().placeholder("x")
    x.meta["example_value"] = torch.empty(2, tokens // 2, 8, device="meta")
    assert AUTO_MAX_PIECES == 8 and ChunkMLPPass._pieces(x, "auto") == pieces
    assert ChunkMLPPass._pieces(x, 40) == 40  # an explicit count is the user's


def test_dropout_while_training_is_reported_not_split():
    """Pieces would draw other dropout masks than the whole block: the site stays whole."""
    import peft

    model = tiny_model("llama", lora=False)
    model = peft.get_peft_model(
        model, peft.LoraConfig(r=8, target_modules=["gate_proj", "up_proj", "down_proj"], lora_dropout=0.1)
    )
    model.train()
    _, report = _run(model, batch(), mlp_chunks=2)
    assert report["mlp"]["chunked"] == 0
    assert len(report["mlp"]["skipped"]) == 2 and all("dropout" in s for s in report["mlp"]["skipped"])


def test_pieces_lower_the_predicted_peak_under_full_recomputation():
    """The MLP's [tokens, intermediate] values dominate this model's backward; in 4 pieces they
    exist a quarter at a time."""
    model = tiny_model("llama", intermediate_size=1024)
    inputs = batch(size=1, seq=256)
    peaks = {}
    for pieces in ("off", 4):
        _, report = _run(twin(model), inputs, mlp_chunks=pieces, remat="full")
        peaks[pieces] = report["remat"]["predicted_peak_bytes"]
    assert peaks[4] < peaks["off"], peaks


@pytest.mark.parametrize("bad", [1, 0, True, "many", 2.5])
def test_bad_option_names_the_option(bad):
    with pytest.raises(ValueError, match="mlp_chunks"):
        Options.from_user({"mlp_chunks": bad})


@pytest.mark.gpu
def test_pieces_lower_the_measured_peak_on_cuda():
    """The MLP in pieces under `remat="full"` lowers the step's measured peak (CUDA allocator), not
    only the cost model's prediction: by at least half of what the cost model predicts it saves.
    A wide MLP at 4096 tokens, so its [tokens, intermediate] values dominate a layer's backward."""
    def peak(pieces):
        torch.manual_seed(0)
        model = tiny_model("llama", dtype=torch.bfloat16, num_hidden_layers=2, hidden_size=512,
                           intermediate_size=8192, num_attention_heads=8, num_key_value_heads=2, head_dim=64).cuda()
        lowmem_compile.quantize_(model)
        inputs = {k: v.cuda() for k, v in batch(size=1, seq=4096).items()}
        lowmem_compile.reset()
        compiled = torch.compile(model, backend="lowmem", options={"remat": "full", "mlp_chunks": pieces, "logits": "drop"})
        compiled(**inputs).loss.backward()  # compiles; the next step is measured
        model.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        compiled(**inputs).loss.backward()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated(), lowmem_compile.last_report().to_dict()["remat"]["predicted_peak_bytes"]

    (whole, whole_predicted), (pieces, pieces_predicted) = peak("off"), peak(4)
    predicted_gain = whole_predicted - pieces_predicted
    assert predicted_gain > 0
    assert whole - pieces >= 0.5 * predicted_gain, (whole, pieces, predicted_gain)
