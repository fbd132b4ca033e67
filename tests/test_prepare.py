"""`prepare_`: the same NF4 model as `quantize_`, materialized from the meta device (init or weights),
module by module (never two 16-bit linears at once), tied weights kept tied, bitsandbytes layers
left alone; `release_compile_memory` without CUDA, and the backend's own release on CUDA."""

from __future__ import annotations

import copy

import pytest
import torch

import lowmem_compile
from lowmem_compile import prepare as prepare_mod
from lowmem_compile.formats.nf4 import NF4Weight
from lowmem_compile.quantize import NF4Linear
from tests.models import LORA_TARGETS, batch, tiny_config


def _build(meta: bool = False, lora: bool = True, **overrides):
    import peft
    import transformers

    config = tiny_config("llama", **overrides)
    if meta:
        with torch.device("meta"):
            model = transformers.AutoModelForCausalLM.from_config(config)
    else:
        model = transformers.AutoModelForCausalLM.from_config(config)
    if lora:
        model = peft.get_peft_model(model, peft.LoraConfig(r=8, lora_alpha=16, target_modules=LORA_TARGETS))
    return model


def _nf4_tensors(model) -> dict[str, torch.Tensor]:
    return {n: b for n, b in model.state_dict().items() if ".weight_" in n}  # frozen parameters and buffers


@pytest.mark.parametrize("numel, chunk", [(64 * 1000, 64 * 7), (64 * 1000 + 33, 64 * 10), (4096, 1 << 20)])
@pytest.mark.parametrize("double_quant", [True, False])
def test_chunked_quantize_is_bit_identical(numel, chunk, double_quant):
    w = torch.randn(numel, dtype=torch.bfloat16) * torch.rand(numel, dtype=torch.bfloat16)
    ref = NF4Weight.from_float(w, 64, double_quant)
    got = prepare_mod.quantize_weight(w, 64, double_quant, chunk_numel=chunk)
    assert ref.tensors().keys() == got.tensors().keys()
    for name, t in ref.tensors().items():
        assert torch.equal(t, got.tensors()[name]), name


def test_prepare_matches_quantize_on_a_cpu_model():
    model = _build()
    reference = copy.deepcopy(model)
    stats = lowmem_compile.quantize_(reference)
    summary = lowmem_compile.prepare_(model)
    assert len(summary.quantized) == stats["layers"] == 14
    assert all(isinstance(model.get_submodule(n), NF4Linear) for n in summary.quantized)
    ref, got = _nf4_tensors(reference), _nf4_tensors(model)
    assert ref.keys() == got.keys() and all(torch.equal(ref[k], got[k]) for k in ref)
    b = batch()
    torch.testing.assert_close(model(**b).loss, reference(**b).loss, rtol=0, atol=0)
    assert summary.use_cache_off and model.config.use_cache is False
    assert "lm_head" in next(k for k in summary.left if k.endswith("lm_head"))
    assert "stays on the CPU" in summary.left["base_model.model.model.embed_tokens"]
    assert summary.bytes_after < summary.bytes_before
    assert "14 linear layers -> NF4" in str(summary)
    # the LoRA adapters stay trainable and in 16 bits; nothing else trains
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)


def test_prepare_without_lora_says_nothing_is_frozen():
    summary = lowmem_compile.prepare_(_build(lora=False))
    assert summary.quantized == [] and "peft" in summary.left["(model)"]


def test_meta_model_is_materialized_by_its_init():
    reference = _build()  # a real model of the same config, for the buffers the init must recompute
    model = _build(meta=True)
    summary = lowmem_compile.prepare_(model)
    assert not any(t.is_meta for t in [*model.parameters(), *model.buffers()])
    assert summary.materialized > 0 and summary.loaded == 0 and summary.initialized == summary.materialized
    assert len(summary.quantized) == 14
    for name, buf in reference.named_buffers():
        if "inv_freq" in name:
            torch.testing.assert_close(model.get_buffer(name), buf)
    params = dict(model.named_parameters())
    norm = params["base_model.model.model.norm.weight"]
    assert torch.equal(norm, torch.ones_like(norm))
    embed = params["base_model.model.model.embed_tokens.weight"]
    assert 0.015 < embed.std().item() < 0.025  # Llama's initializer_range 0.02
    for name, p in params.items():  # peft's init: A random, B zero
        if "lora_A" in name:
            assert p.abs().sum() > 0, name
        if "lora_B" in name:
            assert torch.equal(p, torch.zeros_like(p)), name
    # the NF4 weights were quantized from an initialized weight, not garbage: std of a dequantized q_proj
    q = model.get_submodule("base_model.model.model.layers.0.self_attn.q_proj.base_layer").dequantize()
    assert 0.015 < q.float().std().item() < 0.025
    loss = model(**batch()).loss
    assert torch.isfinite(loss) and abs(loss.item() - 5.55) < 0.1  # ~log(256) from a random model


def test_meta_model_loads_weights_and_matches_the_cpu_path(tmp_path):
    from safetensors.torch import save_file

    source = _build(lora=False)
    state = {k: v.clone() for k, v in source.state_dict().items()}
    import peft

    cpu_model = copy.deepcopy(source)
    cpu_model = peft.get_peft_model(cpu_model, peft.LoraConfig(r=8, lora_alpha=16, target_modules=LORA_TARGETS))
    lowmem_compile.prepare_(cpu_model)

    for weights in (state, tmp_path / "model.safetensors", tmp_path):
        if weights is not state and not (tmp_path / "model.safetensors").exists():
            save_file(state, tmp_path / "model.safetensors")
        model = _build(meta=True)
        summary = lowmem_compile.prepare_(model, weights=weights)
        assert summary.loaded == len(state), weights
        ref, got = _nf4_tensors(cpu_model), _nf4_tensors(model)
        assert ref.keys() == got.keys() and all(torch.equal(ref[k], got[k]) for k in ref)
        for name, p in cpu_model.named_parameters():
            if "lora_" not in name:
                assert torch.equal(p, model.get_parameter(name)), name


def test_missing_or_misshapen_weights_raise():
    state = _build(lora=False).state_dict()
    missing = {k: v for k, v in state.items() if "layers.1.mlp.up_proj" not in k}
    with pytest.raises(KeyError, match="layers.1.mlp.up_proj"):
        lowmem_compile.prepare_(_build(meta=True), weights=missing)
    summary = lowmem_compile.prepare_(_build(meta=True), weights=missing, strict=False)
    assert summary.loaded == len(missing)
    bad = dict(state, **{"model.norm.weight": torch.ones(3)})
    with pytest.raises(ValueError, match="model.norm.weight"):
        lowmem_compile.prepare_(_build(meta=True), weights=bad)


def test_meta_model_keeps_tied_weights_tied():
    model = _build(meta=True, tie_word_embeddings=True)
    summary = lowmem_compile.prepare_(model, include=("*_proj", "*lm_head"))
    base = model.get_base_model()
    assert base.lm_head.weight is base.model.embed_tokens.weight
    assert not base.lm_head.weight.is_meta
    assert 0.015 < base.lm_head.weight.std().item() < 0.025  # initialized once, not left empty
    assert "tied" in summary.left["base_model.model.lm_head"]
    assert torch.isfinite(model(**batch()).loss)


def test_one_16bit_linear_at_a_time(monkeypatch):
    """When a linear is quantized, no other frozen linear of the model holds a real 16-bit weight, and
    the 16-bit weights quantized before are gone (nothing of prepare_'s keeps them alive)."""
    import weakref

    model = _build(meta=True)
    live_in_model, live_before, done = [], [], []
    real = prepare_mod.quantize_weight

    def spy(weight, *args, **kwargs):
        # no gc.collect(): the 16-bit weights must go by reference counting, as they do on the device
        live_in_model.append(sum(1 for m in model.modules() if type(m) is torch.nn.Linear and m.weight is not None
                                 and not m.weight.requires_grad and not m.weight.is_meta))
        live_before.append(sum(r() is not None for r in done))
        done.append(weakref.ref(weight))
        return real(weight, *args, **kwargs)

    monkeypatch.setattr(prepare_mod, "quantize_weight", spy)
    lowmem_compile.prepare_(model, device="cpu")
    assert len(live_in_model) == 14 and max(live_in_model) == 1
    assert max(live_before) == 0


def test_prepare_leaves_bitsandbytes_layers_alone():
    bnb = pytest.importorskip("bitsandbytes")
    model = torch.nn.Sequential(bnb.nn.Linear4bit(64, 64, quant_type="nf4"), torch.nn.Linear(64, 64))
    for p in model.parameters():
        p.requires_grad_(False)
    summary = lowmem_compile.prepare_(model)
    assert summary.quantized == ["1"]
    assert isinstance(model[0], bnb.nn.Linear4bit) and "already 4-bit" in summary.left["0"]


def test_release_compile_memory_without_cuda_is_a_no_op():
    out = lowmem_compile.release_compile_memory()
    assert set(out) == {"reserved_before", "reserved_after", "allocated", "released"}
    if not torch.cuda.is_available():
        assert out["released"] == 0


@pytest.mark.gpu
def test_prepare_on_cuda_peaks_under_nf4_plus_one_layer():
    """A bf16 model on the CPU (and one on the meta device) reaches the GPU as NF4: the device's peak
    while preparing stays under the NF4 model plus one decoder layer in 16 bits; the embedding table
    stays in host memory."""
    import peft
    import transformers

    config = tiny_config("llama", hidden_size=1024, intermediate_size=3584, num_hidden_layers=4,
                         num_attention_heads=16, num_key_value_heads=4, head_dim=64, vocab_size=32000)
    for meta in (False, True):
        torch.cuda.empty_cache()
        if meta:
            with torch.device("meta"):
                model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
        else:
            model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
        layer_bytes = sum(p.numel() * 2 for p in model.model.layers[0].parameters())
        model = peft.get_peft_model(model, peft.LoraConfig(r=16, target_modules=LORA_TARGETS))
        base = torch.cuda.memory_allocated()
        summary = lowmem_compile.prepare_(model, device="cuda")
        prepared = torch.cuda.memory_allocated() - base
        assert summary.offloaded == ["base_model.model.model.embed_tokens"]
        assert summary.device_peak_bytes - base <= prepared + layer_bytes, str(summary)
        b = {k: v.cuda() for k, v in batch(vocab=32000).items()}
        assert torch.isfinite(model(**b).loss)
        del model


def test_release_after_first_backward_fires_once_after_the_backward():
    from lowmem_compile.memory import release_after_first_backward

    events = []
    w = torch.randn(4, 4, requires_grad=True)

    def graph(x):
        events.append("forward")
        return (x @ w).tanh(), (x * 2)

    fn = release_after_first_backward(graph, release=lambda: events.append(("release", w.grad is not None)))
    x = torch.randn(3, 4)
    y, _ = fn(x)
    assert events == ["forward"]  # not before the backward has run
    y.sum().backward()
    assert events == ["forward", ("release", True)]  # after it, the gradients in place
    fn(x)[0].sum().backward()
    assert events == ["forward", ("release", True), "forward"]  # once only
    events.clear()
    no_grad = release_after_first_backward(lambda x: x * 2, release=lambda: events.append("release"))
    no_grad(x)
    assert events == ["release"]  # nothing to differentiate: right after the call


def test_prepare_twice_changes_nothing_more():
    model = _build()
    first = lowmem_compile.prepare_(model)
    before = {n: t.clone() for n, t in model.state_dict().items()}
    second = lowmem_compile.prepare_(model)
    assert len(first.quantized) == 14 and second.quantized == [] and second.bytes_after == first.bytes_after
    assert "(model)" not in second.left  # already NF4: no advice to wrap with peft
    assert all(torch.equal(before[n], t) for n, t in model.state_dict().items())


def test_quantize_takes_a_device_and_a_meta_model():
    model = _build()
    reference = copy.deepcopy(model)
    ref_stats = lowmem_compile.quantize_(reference)
    stats = lowmem_compile.quantize_(model, device="cpu")
    assert stats == ref_stats
    ref, got = _nf4_tensors(reference), _nf4_tensors(model)
    assert all(torch.equal(ref[k], got[k]) for k in ref)
    assert model.config.use_cache is not False  # only prepare_ changes the config
    meta = _build(meta=True)
    assert lowmem_compile.quantize_(meta)["layers"] == 14
    assert not any(t.is_meta for t in [*meta.parameters(), *meta.buffers()])


def test_a_model_prepared_from_meta_trains_compiled():
    model = _build(meta=True)
    lowmem_compile.prepare_(model)
    compiled = torch.compile(model, backend="lowmem", options={"inner": "eager"})
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    b = batch()
    losses = []
    for _ in range(3):
        loss = compiled(**b).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert lowmem_compile.last_report().total("nf4").lowered == 14
    assert losses[-1] < losses[0]  # the adapters learn the batch


@pytest.mark.parametrize("family", ["llama", "gemma"])
def test_embeddings_go_to_host_memory_exactly(monkeypatch, family):
    """The offload branch on the CPU (the device check patched: on a machine without a GPU the host is
    the device): the table becomes a HostEmbedding, Gemma's scaled embedding with its scale, and the
    model computes the same loss as before; a tied table stays."""
    import peft
    import transformers

    from lowmem_compile.host_embedding import HostEmbedding

    monkeypatch.setattr(prepare_mod, "_offload_pays", lambda device: True)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(tiny_config(family, tie_word_embeddings=False))
    model = peft.get_peft_model(model, peft.LoraConfig(r=8, target_modules=LORA_TARGETS))
    reference = copy.deepcopy(model)
    lowmem_compile.quantize_(reference)
    summary = lowmem_compile.prepare_(model, "cpu")
    name = "base_model.model.model.embed_tokens"
    assert summary.offloaded == [name] and isinstance(model.get_submodule(name), HostEmbedding)
    b = batch()
    torch.testing.assert_close(model(**b).loss, reference(**b).loss, rtol=0, atol=0)
    tied = _build(tie_word_embeddings=True)
    assert "tied" in lowmem_compile.prepare_(tied, "cpu").left[name]


def test_an_embedding_that_is_not_a_scaled_lookup_stays(monkeypatch):
    monkeypatch.setattr(prepare_mod, "_offload_pays", lambda device: True)

    class Shifted(torch.nn.Embedding):
        def forward(self, ids):
            return super().forward(ids) + 1

    model = torch.nn.Sequential(Shifted(16, 8), torch.nn.Linear(8, 8))
    for p in model.parameters():
        p.requires_grad_(False)
    summary = lowmem_compile.prepare_(model, "cpu")
    assert summary.offloaded == [] and "Shifted" in summary.left["0"] and isinstance(model[0], Shifted)


@pytest.mark.gpu
def test_backend_gives_back_the_compiles_cache_after_the_first_backward():
    """After the first compiled step's backward, nothing is left in the allocator's cache for a manual
    `release_compile_memory` to free: the backend already gave it back (the compile's scratch and the
    step's freed activations), so reserved memory follows the steps, not the compile."""
    from tests.models import tiny_model

    model = tiny_model("llama", hidden_size=512, intermediate_size=1024, num_attention_heads=8, head_dim=64).cuda()
    compiled = torch.compile(model, backend="lowmem")
    inputs = {k: v.cuda() for k, v in batch(seq=256).items()}
    loss = compiled(**inputs).loss
    loss.backward()
    cached = torch.cuda.memory_reserved() - torch.cuda.memory_allocated()
    released = lowmem_compile.release_compile_memory()["released"]
    assert released == 0, f"{released} bytes were left cached after the first backward ({cached} reserved over allocated)"


def test_a_long_prepare_says_how_far_it_got(monkeypatch, caplog):
    """Preparing a large model takes minutes: progress lines every PROGRESS_SECONDS, and a last one
    with what was done (here every module visit counts as past the interval)."""
    import logging

    from tests.models import tiny_model

    monkeypatch.setattr(prepare_mod, "PROGRESS_SECONDS", 0.0)
    model = tiny_model("llama", lora=True, num_hidden_layers=2)
    with caplog.at_level(logging.INFO, logger="lowmem_compile.prepare"):
        summary = lowmem_compile.prepare_(model)
    lines = [r.getMessage() for r in caplog.records if r.name == "lowmem_compile.prepare"]
    progress = [line for line in lines if " linears in NF4 after " in line]
    assert len(progress) > len(summary.quantized) > 0
    counts = [int(line.split()[1]) for line in progress]
    assert counts == sorted(counts) and counts[-1] <= len(summary.quantized)
    assert lines[-1].startswith(f"prepare_: {len(summary.quantized)} linears in NF4, ")
