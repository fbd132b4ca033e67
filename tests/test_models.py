"""The backend on real model code: tiny configs of each family, LoRA via peft, both attention
implementations, with and without a padding mask. Outputs, loss and every trainable gradient must
equal eager. Tolerance: fp32 models, so 1e-4 relative (reassociation only)."""

import pytest
import torch

import lowmem_compile

from .models import FAMILIES, batch, rel_err, tiny_model, trainable_grads, twin

TOL = 1e-4


def _step(model, inputs):
    out = model(**inputs)
    out.loss.backward()
    return out


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("padding", [False, True])
def test_lora_parity_with_eager(family, attn, padding):
    ref = tiny_model(family, attn)
    model = twin(ref)
    inputs = batch(padding=padding)
    expected = _step(ref, inputs)
    compiled = torch.compile(model, backend="lowmem", options={"inner": "eager", "attention": "kv16"})
    got = _step(compiled, inputs)
    assert rel_err(got.logits, expected.logits) < TOL
    assert rel_err(got.loss, expected.loss) < TOL
    ref_grads, grads = trainable_grads(ref), trainable_grads(model)
    assert ref_grads.keys() == grads.keys() and len(grads) > 0
    for name, g in grads.items():
        assert g is not None, name
        assert rel_err(g, ref_grads[name]) < TOL, name
    report = lowmem_compile.last_report().to_dict()
    assert report["graphs"] >= 1
    assert report["remat"]["saved_bytes"] > 0


def test_two_sequence_lengths_compile_boundedly():
    model = tiny_model("llama")
    compiled = torch.compile(model, backend="lowmem", options={"inner": "eager"})
    for seq in (16, 24, 40):
        out = compiled(**batch(seq=seq))
        out.loss.backward()
    # the first length specializes, the second makes the sequence dimension dynamic, the third reuses it
    assert lowmem_compile.last_report().to_dict()["graphs"] <= 2


def test_inference_under_no_grad():
    ref = tiny_model("qwen2", lora=False)
    compiled = torch.compile(twin(ref), backend="lowmem", options={"inner": "eager", "attention": "kv16"})
    inputs = batch()
    with torch.no_grad():
        expected = ref(input_ids=inputs["input_ids"]).logits
        got = compiled(input_ids=inputs["input_ids"]).logits
    assert rel_err(got, expected) < TOL


@pytest.mark.slow
def test_inductor_llama_parity():
    """The default inner compiler (Inductor, C++ on the CPU) on one family."""
    ref = tiny_model("llama")
    model = twin(ref)
    inputs = batch(padding=True)
    expected = _step(ref, inputs)
    got = _step(torch.compile(model, backend="lowmem", options={"attention": "kv16"}), inputs)
    assert rel_err(got.loss, expected.loss) < TOL
    ref_grads = trainable_grads(ref)
    for name, g in trainable_grads(model).items():
        assert rel_err(g, ref_grads[name]) < 1e-3, name
