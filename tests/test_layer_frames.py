"""A Dynamo frame per decoder layer (layer_frames.py): Dynamo traces the layer's code once, the
backend compiles one body for every layer like it, and the step computes what eager computes; the
mask the model builds before its layers is handed over only where it is proven plain causal."""

from __future__ import annotations

import copy
import gc
import time

import pytest
import torch

import lowmem_compile
from lowmem_compile import layer_frames
from lowmem_compile.layer_frames import layer_frames_
from lowmem_compile.passes.attention_masks import mask_forms
from tests.models import LORA_TARGETS, assert_step_matches_eager, batch, rel_err, tiny_model, trainable_grads, twin

#: fp32 eager against fp32 compiled (kv16 attention, exact): both sum the same terms in other orders.
TOL = 1e-4


def _framed_pair(model):
    """`model` framed, and an unframed copy of it as the eager reference (both without a K/V cache)."""
    reference = twin(model)
    for m in (model, reference):
        m.config.use_cache = False
    assert layer_frames_(model) == model.config.num_hidden_layers
    return model, reference


def _assert_matches_eager(model, reference, inputs, options=None):
    return assert_step_matches_eager(model, reference, inputs, options or {"inner": "eager", "attention": "kv16"}, TOL)


def test_six_framed_layers_compile_one_body_and_match_eager():
    """One layer graph serves all six calls (the first layer's input, which needs no gradient, goes
    through the sink), and the mask, proven plain causal before the layers, is not read by them."""
    model, reference = _framed_pair(tiny_model("llama", num_hidden_layers=6))
    report = _assert_matches_eager(model, reference, batch())
    assert report["layers"]["bodies"] == 1 and report["layers"]["calls"] == 6, report["layers"]
    assert any(note.startswith("layer frame: the step peak above counts the graphs after the layers by estimate")
               for note in report["remat"]["notes"])
    assert report["attention"]["replaced"] == 6 and report["attention"]["general_masks"] == 0
    assert report["loss"]["fused"] == 1


@pytest.mark.parametrize("case", ["padding", "packed", "eager_attention"])
def test_a_mask_not_plain_causal_reaches_the_layers_exactly(case):
    """Key padding or packed documents (position ids that restart): the mask reaches SDPA layers as
    its parts and each layer's frame builds it where the attention pass proves it (the causal
    kernel, no general-mask site). An attention form that takes float masks keeps the mask as built.
    Every case exact."""
    attn = "eager" if case == "eager_attention" else "sdpa"
    model, reference = _framed_pair(tiny_model("llama", attn, num_hidden_layers=3))
    inputs = batch(padding=case == "padding")
    if case == "packed":
        seq = inputs["input_ids"].shape[1]
        inputs["position_ids"] = torch.cat([torch.arange(10), torch.arange(seq - 10)]).expand(2, -1)
    report = _assert_matches_eager(model, reference, inputs)
    assert report["layers"]["bodies"] == 1
    if case == "eager_attention":
        assert report["attention"]["general_masks"] == 3 or report["attention"]["replaced"] == 0, report["attention"]
    else:
        attention = report["attention"]
        assert attention["replaced"] == 3 and attention["general_masks"] == 0, attention
        assert attention["packed_masks"] == (3 if case == "packed" else 0), attention


def _marked_mask_shapes(monkeypatch) -> list[tuple[int, ...]]:
    """The shapes of the masks the graph before the layers marks causal, as the step runs."""
    shapes = []
    mark = layer_frames.mark_mask
    monkeypatch.setattr(layer_frames, "mark_mask", lambda mask, form=None: (shapes.append(tuple(mask.shape)), mark(mask, form)))
    return shapes


@pytest.mark.parametrize("packed", [False, True])
def test_a_causal_mask_no_layer_reads_is_not_built(monkeypatch, packed):
    """The graph before the layers runs uncompiled, and the causal mask every sdpa layer drops is
    left unbuilt ([B, 1, S, 0]); with packed documents the run-time check of the position ids fails
    and the mask goes to the layers as its parts ([2, B, S]), built in each layer's frame. Both exact."""
    model, reference = _framed_pair(tiny_model("llama", num_hidden_layers=3))
    shapes = _marked_mask_shapes(monkeypatch)
    inputs = batch()
    b, seq = inputs["input_ids"].shape
    if packed:
        inputs["position_ids"] = torch.cat([torch.arange(10), torch.arange(seq - 10)]).expand(b, -1)
    report = _assert_matches_eager(model, reference, inputs)
    assert report["layers"]["run_as_fx"] >= 1 and report["layers"]["masks_unbuilt"] == 1, report["layers"]
    if packed:  # the positions restart: the mask goes as its parts, positions and keys kept
        assert set(shapes) == {(2, b, seq)} and report["attention"]["general_masks"] == 0
    else:
        assert set(shapes) == {(b, 1, seq, 0)} and report["attention"]["general_masks"] == 0


@pytest.mark.parametrize("padding", [False, True])
def test_a_layer_that_needs_an_unbuilt_mask_gets_it_built(monkeypatch, padding):
    """Should a layer turn out to read its mask after all, the mask left unbuilt (plain causal: an
    empty stand-in; padded: its parts) is built for it, exact: nothing reads a stand-in or parts."""
    model, reference = _framed_pair(tiny_model("llama", num_hidden_layers=3))
    shapes = _marked_mask_shapes(monkeypatch)
    assert layer_frames.masks_rewritable()  # sdpa layers: the compile leaves the mask unbuilt
    monkeypatch.setattr(layer_frames, "masks_rewritable", lambda: True)
    monkeypatch.setattr(layer_frames, "_reads_none_as_causal", lambda layer: False)  # then the layers say otherwise
    monkeypatch.setattr(layer_frames, "_takes_bool_masks", lambda layer: False)
    inputs = batch(padding=padding)
    report = _assert_matches_eager(model, reference, inputs)
    b, seq = inputs["input_ids"].shape
    assert report["layers"]["masks_unbuilt"] == 1 and set(shapes) == {(2, b, seq) if padding else (b, 1, seq, 0)}
    assert report["attention"]["general_masks"] == 3  # the layers read the built mask


@pytest.mark.parametrize("family, padding, docs", [("mistral", True, 3), ("mistral", False, 0), ("llama", True, 2)])
def test_a_mask_from_its_parts_is_the_mask_the_model_built(monkeypatch, family, padding, docs):
    """The graph before the layers, run as built and run with its masks as parts: each mask rebuilt
    from its parts (`mask_from_parts`) equals, element for element, the one transformers built
    (Mistral's window of 8 over 24 tokens, key padding, packed documents)."""
    from lowmem_compile import backend
    from lowmem_compile.passes.attention_masks import mask_from_parts, with_mask_parts
    from tests.test_attention_families import _packed

    seen = []
    run = backend._run_before_layers

    def capturing(gm, graph_report, forms):
        compiled = run(gm, graph_report, forms)
        return lambda *args: (seen.append((gm, args)), compiled(*args))[1]

    monkeypatch.setattr(backend, "_run_before_layers", capturing)
    overrides = {"sliding_window": 8} if family == "mistral" else {}
    model, reference = _framed_pair(tiny_model(family, num_hidden_layers=2, **overrides))
    inputs = batch(padding=padding)
    if docs:
        inputs["position_ids"] = _packed(*inputs["input_ids"].shape, docs, seed=docs)
    _assert_matches_eager(model, reference, inputs)
    checked = 0
    for gm, args in seen:
        forms = mask_forms(gm)
        if not forms:
            continue
        built, parts = gm(*args), with_mask_parts(gm, forms, set())(*args)
        for f in forms:
            rebuilt = mask_from_parts(parts[f.output], f.window, f.positions is not None, f.padding is not None)
            assert rebuilt.shape == built[f.output].shape and torch.equal(rebuilt, built[f.output]), f
            assert (f.window > 0) == (family == "mistral") and (f.padding is not None) == padding
            checked += 1
    assert checked >= 1


@pytest.mark.parametrize("packed", [False, True])
def test_an_evaluation_without_grad_keeps_the_masks_unbuilt(packed):
    """Under `no_grad` (an evaluation) the graph that builds the masks still runs uncompiled and the
    layers get them unbuilt or as parts: no general-mask site, the logits and loss as eager's."""
    model, reference = _framed_pair(tiny_model("llama", num_hidden_layers=3))
    inputs = batch()
    b, seq = inputs["input_ids"].shape
    if packed:
        inputs["position_ids"] = torch.cat([torch.arange(10), torch.arange(seq - 10)]).expand(b, -1)
    lowmem_compile.reset()
    compiled = torch.compile(model, backend="lowmem", options={"inner": "eager", "attention": "kv16"})
    with torch.no_grad():
        got, expected = compiled(**inputs), reference(**inputs)
    report = lowmem_compile.last_report().to_dict()
    assert report["layers"]["masks_unbuilt"] == 1 and report["attention"]["general_masks"] == 0, report
    assert report["attention"]["packed_masks"] == (3 if packed else 0)
    assert rel_err(got.logits, expected.logits) < TOL and rel_err(got.loss, expected.loss) < TOL


def test_framed_and_whole_steps_agree_under_the_default_options():
    """The default options (8-bit K/V kept for the backward, NF4 weights): one step framed and one
    captured whole give the same loss and LoRA gradients to float32 rounding (1e-5 relative)."""
    torch.manual_seed(0)
    base = tiny_model("llama", num_hidden_layers=2)
    lowmem_compile.quantize_(base)
    base.config.use_cache = False
    runs = []
    for frames in (False, True):
        model = twin(base)
        if frames:
            layer_frames_(model)
        lowmem_compile.reset()
        torch._dynamo.reset()
        loss = torch.compile(model, backend="lowmem", options={"inner": "eager"})(**batch()).loss
        loss.backward()
        runs.append((loss.detach(), trainable_grads(model)))
    (whole, whole_grads), (framed, grads) = runs
    assert rel_err(framed, whole) < 1e-5
    assert grads.keys() == whole_grads.keys() and all(rel_err(grads[k], whole_grads[k]) < 1e-5 for k in grads)


def test_a_mask_built_outside_transformers_keeps_its_values():
    """With a framed model alive, another compiled function that returns a causal mask (one the
    pass proves) gets it as built: only the masks transformers builds for the layers are rewritten."""
    from lowmem_compile.passes.attention_masks import mask_from_parts

    model, _ = _framed_pair(tiny_model("llama", num_hidden_layers=2))  # alive while the function compiles
    positions = torch.arange(24).expand(2, -1)

    def causal(p):
        return mask_from_parts(torch.stack([p, torch.ones_like(p)]), 0, False, False)

    torch._dynamo.reset()
    got = torch.compile(causal, backend="lowmem", options={"inner": "eager"})(positions)
    assert model is not None and layer_frames.framed() and got.shape == (2, 1, 24, 24) and torch.equal(got, causal(positions))


def test_layers_of_two_kinds_compile_two_framed_bodies():
    """LoRA on every other layer: two layer graphs, each compiled once, the step exact."""
    import peft

    base = tiny_model("mistral", lora=False, num_hidden_layers=6, sliding_window=None)
    model = peft.get_peft_model(base, peft.LoraConfig(r=8, target_modules=LORA_TARGETS, layers_to_transform=[0, 2, 4]))
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.02)
    model, reference = _framed_pair(model)
    report = _assert_matches_eager(model, reference, batch())
    assert report["layers"]["bodies"] == 2 and report["layers"]["calls"] == 6, report["layers"]


def test_full_recompute_and_offload_on_a_framed_body(monkeypatch):
    """`remat="full"` with every call's saved values parked: exact, planned as a body of 4 calls."""
    from lowmem_compile.passes import remat

    monkeypatch.setattr(remat.offload, "MIN_BYTES", 1)  # the tiny model's values are all small
    model, reference = _framed_pair(tiny_model("qwen2", num_hidden_layers=4))
    options = {"inner": "eager", "attention": "kv16", "remat": "full", "offload": "layers", "mlp_chunks": 2}
    report = _assert_matches_eager(model, reference, batch(padding=True), options)
    assert report["mlp"]["chunked"] == 4 and report["remat"]["offloaded_bytes"] > 0
    assert any("layer body planned once for 4 calls" in note for note in report["remat"]["notes"])


def _first_call_seconds(layers: int) -> float:
    lowmem_compile.reset()
    model = tiny_model("llama", num_hidden_layers=layers)
    model.config.use_cache = False
    layer_frames_(model)
    start = time.perf_counter()
    torch.compile(model, backend="lowmem", options={"inner": "eager", "attention": "kv16"})(**batch()).loss.backward()
    return time.perf_counter() - start


@pytest.mark.slow
def test_the_first_call_does_not_grow_with_depth():
    """Dynamo's trace, its guards and the backend together: 12 framed layers reach their first
    backward in under 1.5x the time of 3 (same process). Traced whole, Dynamo's part grows with depth."""
    _first_call_seconds(2)  # imports and first registrations
    three, twelve = _first_call_seconds(3), _first_call_seconds(12)
    assert twelve < 1.5 * three, (three, twelve)


def test_copies_are_unframed_and_framing_undoes():
    model = tiny_model("llama", num_hidden_layers=2)
    layers = model.get_decoder().layers
    original = type(layers[0])
    layer_frames_(model)
    assert type(layers[0]) is not original and isinstance(layers[0], original)
    copied = copy.deepcopy(model)
    assert type(copied.get_decoder().layers[0]) is original  # a copy calls its own layers, unframed
    assert layer_frames_(model, False) == 0 and type(layers[0]) is original


def _mask_graph(positions_from_input: bool) -> torch.fx.GraphModule:
    """The graph Dynamo captures for HF's mask function before framed layers."""
    from transformers import masking_utils

    config = tiny_model("llama", lora=False).config
    captured = {}

    def backend(gm, example_inputs):
        captured["gm"] = gm
        return gm.forward

    embeds = torch.zeros(2, 16, config.hidden_size)
    position_ids = torch.arange(16).unsqueeze(0)

    def make(position_ids):
        kwargs = {"position_ids": position_ids} if positions_from_input else {}
        return masking_utils.create_causal_mask(config=config, inputs_embeds=embeds, attention_mask=None,
                                                past_key_values=None, **kwargs)

    torch._dynamo.reset()
    torch.compile(make, backend=backend, fullgraph=True)(position_ids)
    return captured["gm"]


def test_the_mask_graph_tells_plain_causal_from_documents():
    """Over the caller's position ids the mask is causal within documents: plain causal only when the
    positions step by one, which the input named is checked for at run time."""
    gm = _mask_graph(positions_from_input=True)
    (form,) = mask_forms(gm)
    assert form.output == 0 and form.plain and form.positions is not None
    assert "position_ids" in gm.graph.find_nodes(op="placeholder")[form.positions].name


def test_a_graph_after_the_layers_counts_what_they_keep():
    """The tail's plan is scored with what the framed layers keep and the weights it does not see."""
    model = tiny_model("llama", num_hidden_layers=2)
    layer_frames_(model)
    frame = layer_frames.LayerFrame(layer_frames.weakref.ref(model), 2, torch.zeros(1))
    layer_frames.note_kept(frame, 1000)
    head = model.get_output_embeddings().weight
    weights = {id(t): t for t in [*model.parameters(), *model.buffers()]}
    total = sum(t.numel() * t.element_size() for t in weights.values())
    assert layer_frames.owner([head]) is model and layer_frames.owner([torch.zeros(1)]) is None
    assert layer_frames.held_outside(model, [head], torch.device("cpu")) == 1000 + total - head.numel() * head.element_size()


@pytest.mark.gpu
@pytest.mark.parametrize("packed", [False, True])
def test_framed_layers_on_cuda_match_the_whole_graph(packed):
    """Inductor and our Triton kernels on CUDA (bf16, 4-bit weights, 4 layers, the lean options): the
    framed step trains like the whole-graph compile of the same weights, and every layer's mask is
    handed over as causal, or, with 3 packed documents a row, as its parts (no general-mask site
    either way). Same kernels, other fusion boundaries: bf16 rounding differs at the layer edges only."""
    from tests.test_attention_families import _packed

    torch.manual_seed(0)
    model = tiny_model("llama", dtype=torch.bfloat16, num_hidden_layers=4, hidden_size=256, intermediate_size=512,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=64).cuda()
    lowmem_compile.quantize_(model)
    model.config.use_cache = False
    whole_model = twin(model)
    inputs = batch(seq=512)
    if packed:
        inputs["position_ids"] = _packed(*inputs["input_ids"].shape, 3, seed=0)
    inputs = {k: v.cuda() for k, v in inputs.items()}
    options = {"remat": "full", "offload": "layers", "mlp_chunks": 2, "logits": "drop", "attention": "kv16"}
    runs = []
    for m in (whole_model, model):
        if m is model:
            layer_frames_(model)  # after the whole graph's compile: a framed model's other graphs are not split
        lowmem_compile.reset()
        loss = torch.compile(m, backend="lowmem", options=options)(**inputs).loss
        loss.backward()
        runs.append((loss.detach(), trainable_grads(m), lowmem_compile.last_report().to_dict()))
    (whole_loss, whole_grads, _), (loss, grads, report) = runs
    assert report["layers"]["bodies"] == 1 and report["layers"]["calls"] == 4, report["layers"]
    assert report["attention"]["replaced"] == 4 and report["attention"]["general_masks"] == 0
    assert report["attention"]["packed_masks"] == (4 if packed else 0)
    assert abs(loss.item() - whole_loss.item()) <= 1e-2 * abs(whole_loss.item())
    for name, grad in whole_grads.items():
        assert rel_err(grads[name], grad) < 3e-2, name


def test_plan_captures_a_framed_model_whole_and_leaves_it_framed():
    """`plan()` stops at the first graph: a framed model is planned as one step (the per-layer split),
    and its frames are back afterwards."""
    model = tiny_model("llama", num_hidden_layers=3)
    model.config.use_cache = False
    layer_frames_(model)
    report = lowmem_compile.plan(model, **batch(), options={"remat": "full"}).to_dict()
    assert report["layers"]["bodies"] == 1 and report["layers"]["calls"] == 3
    assert report["remat"]["predicted_peak_bytes"] > 0
    assert hasattr(type(model.get_decoder().layers[0]), "_lowmem_unframed") and layer_frames.framed()


def test_prepare_frames_the_layers_and_fully_shard_gives_them_back(monkeypatch):
    """`prepare_` frames every decoder layer (a windowed model's too: its mask reaches the layers as
    parts); `layer_frames=False` leaves them; FSDP2's per-layer sharding restores their class first
    (it already compiles each layer's call apart)."""
    from lowmem_compile import distributed

    windowed = tiny_model("mistral", num_hidden_layers=2, sliding_window=8)
    summary = lowmem_compile.prepare_(windowed)
    assert summary.layer_frames == 2 and "2 decoder layers traced as one frame each" in str(summary)
    assert hasattr(type(windowed.get_decoder().layers[0]), "_lowmem_unframed")
    assert lowmem_compile.prepare_(tiny_model("llama", num_hidden_layers=2), layer_frames=False).layer_frames == 0
    sharded = []
    monkeypatch.setattr("torch.distributed.fsdp.fully_shard", lambda module, **kw: sharded.append(type(module)))
    monkeypatch.setattr(distributed, "sharding_stats", lambda model: None)
    distributed.fully_shard_layers_(windowed)
    assert len(sharded) == 3 and not any(hasattr(cls, "_lowmem_unframed") for cls in sharded)


def test_the_knob_sets_aside_the_whole_models_optimizer_state_for_a_framed_graph():
    """A framed layer's graph holds one layer's LoRA weights and the tail's none: the budget each
    plans for leaves out the optimizer's state of every trainable weight of the model."""
    from lowmem_compile import knob
    from lowmem_compile.options import Options

    model = tiny_model("llama", num_hidden_layers=3)
    layer_frames_(model)
    head = model.get_output_embeddings().weight
    opts = Options.from_user({"memory_budget": 1 << 30})
    _, _, (note,) = knob._for_the_step(opts, opts.without_knob(), [head])
    state = knob.OPTIMIZER_VALUES * sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    assert f"{lowmem_compile.report.gib(state)} set aside for the optimizer's state" in note


def test_a_framed_steps_knob_choices_add_up_across_its_graphs():
    """The layer graph decides parking and pieces, the graphs after it the logits: the report holds
    both, where the last graph's choice used to replace the layers'."""
    from lowmem_compile import knob
    from lowmem_compile.report import GraphReport, RematStats, Report

    model = tiny_model("llama", num_hidden_layers=2)
    layer_frames_(model)
    head = model.get_output_embeddings().weight
    assert knob._decided_here([head]) == {"logits"} and knob._decided_here([torch.zeros(1)]) == {"offload", "mlp_chunks", "logits"}
    body, tail = GraphReport(index=0, nodes=1), GraphReport(index=1, nodes=1)
    body.add("remat", RematStats(knob={"offload": "parked", "mlp_chunks": "auto"}))
    tail.add("remat", RematStats(knob={"logits": "drop"}))
    assert Report(graphs=[body, tail]).to_dict()["remat"]["knob"] == {"offload": "parked", "mlp_chunks": "auto", "logits": "drop"}


def test_a_framed_steps_predicted_peak_is_the_split_steps():
    """The framed step's peak, composed from its pieces (the body for the step, the graphs after the
    layers with what the layers, the shared tables and the final norm keep), is the per-layer split's
    within 1% (`full`, logits dropped, 4 layers; 0.06% by bench/frames_cpu.py)."""
    torch.manual_seed(0)
    model = tiny_model("llama", num_hidden_layers=4, vocab_size=2048)
    lowmem_compile.quantize_(model)
    model.config.use_cache = False
    framed = twin(model)
    layer_frames_(framed)
    peaks = []
    for m in (model, framed):
        lowmem_compile.reset()
        options = {"inner": "eager", "attention": "kv16", "remat": "full", "logits": "drop"}
        torch.compile(m, backend="lowmem", options=options)(**batch(vocab=2048, seq=256)).loss.backward()
        peaks.append(lowmem_compile.last_report().to_dict()["remat"]["predicted_peak_bytes"])
    split, frames = peaks
    assert abs(frames - split) <= 0.01 * split, (split, frames)


def _unframed_step_breaking_before_its_layers(model, reference):
    """`model` (unframed) compiled with its layers left to eager, as FSDP2's per-layer breaks leave
    them: HF's mask is then built in a weightless graph of its own, before the layers. The loss
    against `reference`'s eager one."""
    for m in (model, reference):
        m.config.use_cache = False
    for layer in model.get_decoder().layers:
        layer.forward = torch.compiler.disable(layer.forward)
    inputs = batch()
    lowmem_compile.reset()
    torch._dynamo.reset()
    gc.collect()  # earlier tests' framed models, gone: only the framing here counts
    got = torch.compile(model, backend="lowmem", options={"inner": "eager", "attention": "kv16"})(**inputs)
    return rel_err(got.loss, reference(**inputs).loss)


def test_unframing_through_another_handle_builds_the_mask_again():
    """`fully_shard_layers_(model.base_model.model)` after `prepare_(model)` (a peft model): the layers
    get their class back through the inner model, and their mask must be built again for them."""
    model = tiny_model("llama", num_hidden_layers=2)
    layer_frames_(model)
    layer_frames_(model.base_model.model, False)
    assert _unframed_step_breaking_before_its_layers(model, twin(model)) < TOL


def test_an_unframed_model_beside_a_framed_one_reads_its_mask():
    """A framed model alive (a policy) and another, unframed, whose step breaks before its layers (a
    reference model sharded with FSDP2): the second's layers read the mask HF built, exact."""
    framed = tiny_model("llama", num_hidden_layers=2)
    layer_frames_(framed)
    model = tiny_model("llama", num_hidden_layers=2)
    assert framed is not None and _unframed_step_breaking_before_its_layers(model, twin(model)) < TOL
