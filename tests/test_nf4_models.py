"""NF4 on real model code: `quantize_` on tiny HF models with LoRA, and models whose linears are
bitsandbytes `Linear4bit` (built by swapping, and loaded with `BitsAndBytesConfig`), compiled with
`backend="lowmem"`. Compiled must equal eager on the same quantized weights (fp32 models: 1e-4
relative), every 4-bit linear must become `lowmem::nf4_linear` with no graph break, and no saved
tensor may be a dequantized weight."""

import bitsandbytes.nn as bnn
import pytest
import torch

import lowmem_compile

from .models import LORA_TARGETS, batch, rel_err, tiny_config, tiny_model, trainable_grads, twin

TOL = 1e-4
#: Other passes off, so the comparison isolates the NF4 lowering.
OPTS = {"inner": "eager", "attention": "off", "fused_loss": "off"}
N_LINEARS = 2 * len(LORA_TARGETS)  # 2 layers, 7 projections each


def _step(model, inputs, saved=None):
    hooks = (lambda t: saved.append(t) or t, lambda t: t) if saved is not None else None
    if hooks:
        with torch.autograd.graph.saved_tensors_hooks(*hooks):
            out = model(**inputs)
    else:
        out = model(**inputs)
    out.loss.backward()
    return out


def _weight_shapes(model):
    """[N, K] and [K, N] of every 4-bit layer: a saved float tensor of that shape is a dequantized weight."""
    return {s for m in model.modules() if type(m).__name__ in ("NF4Linear", "Linear4bit")
            for s in ((m.out_features, m.in_features), (m.in_features, m.out_features))}


def _check_parity(ref, model, inputs, options):
    expected = _step(ref, inputs)
    saved = []
    got = _step(torch.compile(model, backend="lowmem", options=options), inputs, saved)
    assert rel_err(got.loss, expected.loss) < TOL
    assert rel_err(got.logits, expected.logits) < TOL
    ref_grads, grads = trainable_grads(ref), trainable_grads(model)
    assert ref_grads.keys() == grads.keys() and grads
    for name, g in grads.items():
        assert rel_err(g, ref_grads[name]) < TOL, name
    big = [tuple(t.shape) for t in saved if t.is_floating_point() and tuple(t.shape) in _weight_shapes(model)]
    assert not big, f"dequantized weights saved for backward: {big}"
    return lowmem_compile.last_report().to_dict()


def test_quantize_selects_frozen_linears_only():
    model = tiny_model("llama")
    stats = lowmem_compile.quantize_(model)
    kinds = {n: type(m).__name__ for n, m in model.named_modules()}
    assert stats["layers"] == N_LINEARS == sum(k == "NF4Linear" for k in kinds.values())
    assert kinds["base_model.model.lm_head"] == "Linear" and "Embedding" in kinds.values()
    assert all(kinds[n] == "Linear" for n in kinds if "lora_" in n and n.endswith(("lora_A.default", "lora_B.default")))
    assert stats["bytes_after"] * 3 < stats["bytes_before"]
    assert lowmem_compile.quantize_(model) == {"layers": 0, "bytes_before": 0, "bytes_after": 0}


@pytest.mark.parametrize("family", ["llama"])
def test_quantized_model_compiles_like_eager(family):
    ref = tiny_model(family)
    lowmem_compile.quantize_(ref)
    model = twin(ref)
    report = _check_parity(ref, model, batch(padding=True), OPTS)
    assert report["graphs"] == 1
    assert report["nf4"]["lowered"] == N_LINEARS and report["nf4"]["skipped"] == []
    assert 0 < report["nf4"]["bytes_after"] * 2 < report["nf4"]["bytes_before"]  # tiny layers: code2 weighs


def test_quantized_state_dict_round_trip():
    model = tiny_model("llama", lora=False)
    lowmem_compile.quantize_(model, double_quant=False)
    other = tiny_model("llama", lora=False)
    lowmem_compile.quantize_(other, double_quant=False)
    other.load_state_dict(model.state_dict())
    inputs = batch()
    assert torch.equal(other(input_ids=inputs["input_ids"]).logits, model(input_ids=inputs["input_ids"]).logits)


def test_quantized_mlp_under_inductor():
    mlp = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.GELU(), torch.nn.Linear(128, 64)).requires_grad_(False)
    lowmem_compile.quantize_(mlp, include=["*"])
    x = torch.randn(2, 9, 64, requires_grad=True)
    expected = mlp(x)
    got = torch.compile(mlp, backend="inductor")(x)
    assert rel_err(got, expected) < TOL


def test_nf4_quantize_option_raises():
    model = tiny_model("llama")
    with pytest.raises(Exception, match="quantize_"):
        torch.compile(model, backend="lowmem", options={**OPTS, "nf4": "quantize"})(**batch())


def _to_bnb(model, quant_type="nf4"):
    """Swap every frozen projection for a bitsandbytes Linear4bit holding the same weights."""
    for name, module in list(model.named_modules()):
        if type(module) is torch.nn.Linear and name.rsplit(".", 1)[-1] in LORA_TARGETS:
            layer = bnn.Linear4bit(module.in_features, module.out_features, bias=module.bias is not None,
                                   compute_dtype=torch.float32, quant_type=quant_type, compress_statistics=True)
            layer.load_state_dict(module.state_dict())
            layer = layer.cpu()
            layer.support_avx512bf16_for_cpu = False  # keep bitsandbytes' own format on every CPU
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, layer)
    return model


def _lora(model):
    import peft

    model = peft.get_peft_model(model, peft.LoraConfig(r=8, lora_alpha=16, target_modules=LORA_TARGETS, lora_dropout=0.0))
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.02)
    return model.eval()


def test_bnb_linear4bit_with_lora_is_lowered():
    ref = _lora(_to_bnb(tiny_model("mistral", lora=False)))
    model = twin(ref)
    report = _check_parity(ref, model, batch(), OPTS)
    assert report["graphs"] == 1
    assert report["nf4"]["lowered"] == N_LINEARS and report["nf4"]["skipped"] == []


def test_bnb_fp4_is_skipped_with_reason():
    ref = _to_bnb(tiny_model("llama", lora=False), quant_type="fp4")
    inputs = batch()
    expected = ref(input_ids=inputs["input_ids"]).logits
    got = torch.compile(twin(ref), backend="lowmem", options=OPTS)(input_ids=inputs["input_ids"]).logits
    assert rel_err(got, expected) < TOL
    nf4 = lowmem_compile.last_report().to_dict()["nf4"]
    assert nf4["lowered"] == 0 and len(nf4["skipped"]) == N_LINEARS and "fp4" in nf4["skipped"][0]


def test_bnb_model_loaded_with_config(tmp_path):
    import transformers

    transformers.AutoModelForCausalLM.from_config(tiny_config("llama")).save_pretrained(tmp_path)
    config = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                             bnb_4bit_compute_dtype=torch.float32)
    ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=config, device_map="cpu",
                                                            dtype=torch.float32)
    for m in ref.modules():
        if hasattr(m, "support_avx512bf16_for_cpu"):
            m.support_avx512bf16_for_cpu = False
    ref = _lora(ref)
    report = _check_parity(ref, twin(ref), batch(), OPTS)
    assert report["graphs"] == 1 and report["nf4"]["lowered"] == N_LINEARS


@pytest.mark.gpu
def test_cudagraphs_train_like_without():
    """`cudagraphs=True` (Inductor's CUDA graph trees) on an NF4 model with LoRA: three SGD steps give
    the losses and LoRA gradients of the same compile without graphs (fp32, 1e-4), and Inductor
    captured every graph it compiled (no skip)."""
    from torch._dynamo.utils import counters

    from lowmem_compile.codegen import nf4_matmul

    base = tiny_model("llama").cuda()
    lowmem_compile.quantize_(base)
    inputs = {k: v.cuda() for k, v in batch().items()}
    runs = {}
    for cudagraphs in (False, True):
        model = twin(base)
        torch._dynamo.reset()
        nf4_matmul.code_table.cache_clear()  # made lazily by the first call: inside the graph tree's warm-up
        skips = counters["inductor"]["cudagraph_skips"]
        step = torch.compile(model, backend="lowmem", options={"cudagraphs": cudagraphs})
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.SGD(params, lr=0.1)
        losses = []
        for _ in range(3):
            optimizer.zero_grad(set_to_none=True)
            loss = step(**inputs).loss
            loss.backward()
            losses.append(loss.item())
            optimizer.step()
        runs[cudagraphs] = losses, {n: g.clone() for n, g in trainable_grads(model).items()}
        if cudagraphs:
            assert counters["inductor"]["cudagraph_skips"] == skips
    (ref_losses, ref_grads), (losses, grads) = runs[False], runs[True]
    assert ref_losses[0] != ref_losses[-1]  # the steps moved the adapters
    for a, b in zip(losses, ref_losses):
        assert abs(a - b) <= 1e-4 * abs(b)
    for name, g in grads.items():
        assert rel_err(g, ref_grads[name]) < 1e-4, name


@pytest.mark.parametrize("source", ["quantize_", "bitsandbytes"])
def test_nf4_off_leaves_4bit_layers_to_the_model(monkeypatch, source):
    """`nf4="off"`: no linear is lowered (with `nf4_matmul="graph"` at 48 tokens the pass would put
    a dequantize node in the graph), the model's own 4-bit layers run as they are (`quantize_`'s
    NF4Linear calls `nf4_linear` itself; bitsandbytes' Linear4bit its own code, no op of ours),
    and the step is eager's (fp32: 1e-4)."""
    from torch._dynamo.backends import debugging

    if source == "quantize_":
        ref = tiny_model("llama")
        lowmem_compile.quantize_(ref)
    else:
        ref = _lora(_to_bnb(tiny_model("llama", lora=False)))
    targets, nop = [], debugging.boxed_nop

    def record(gm, example_inputs):
        targets.extend(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return nop(gm, example_inputs)

    monkeypatch.setattr(debugging, "boxed_nop", record)
    report = _check_parity(ref, twin(ref), batch(), {**OPTS, "nf4": "off", "nf4_matmul": "graph"})
    assert report["nf4"]["lowered"] == 0 and report["nf4"]["bytes_before"] == report["nf4"]["bytes_after"] == 0
    assert targets and not any("nf4_dequantize" in t for t in targets)
    ours = [t for t in targets if t.startswith("lowmem.nf4_linear")]
    assert (len(ours) >= N_LINEARS) if source == "quantize_" else not ours
