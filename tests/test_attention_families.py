"""Every family's attention form through the pass: Gemma (scaled embedding), Gemma 2 (sliding window
on alternate layers, logit softcap, query_pre_attn_scalar), Gemma 3 text (windows, q/k norms),
Mistral with a window shorter than the sequence, Phi-3 (fused qkv, window) and Qwen3 (q/k norms),
sdpa and eager, with rows of 2-5 packed documents (position ids restarting, no attention mask).

Each compiled at kv16 must equal eager (fp32: logits, loss and every LoRA gradient within 1e-4
relative), replace every site, and prove every mask: `general_masks` 0, `window_masks` the windowed
layers, `packed_masks` every layer when documents are packed. The default set runs each family once;
the rest of the grid is marked slow.
"""

import itertools

import pytest
import torch

import lowmem_compile

from .models import LORA_TARGETS, batch, compiled_and_eager, rel_err, trainable_grads, twin
from .test_attention_pass import _masked_sdpa_sites

_WINDOW, _SEQ = 8, 24


def _config(family: str, attn: str):
    import transformers

    kwargs = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16, max_position_embeddings=512, attn_implementation=attn,
                  use_cache=False)  # a training step: HF builds the packed-documents mask only without a cache
    if family == "gemma":
        return transformers.GemmaConfig(**kwargs)
    if family == "gemma2":  # a cap that bites on tiny random weights; Gemma 2's own scale
        return transformers.Gemma2Config(**kwargs, sliding_window=_WINDOW, attn_logit_softcapping=0.5, query_pre_attn_scalar=20)
    if family == "gemma3":
        return transformers.Gemma3TextConfig(**kwargs, sliding_window=_WINDOW, query_pre_attn_scalar=20)
    if family == "mistral":
        return transformers.MistralConfig(**kwargs, sliding_window=_WINDOW)
    if family == "phi3":
        kwargs.pop("head_dim")
        return transformers.Phi3Config(**kwargs, sliding_window=_WINDOW, pad_token_id=0)
    return transformers.Qwen3Config(**kwargs)


def _model(family: str, attn: str):
    import peft
    import transformers

    config = _config(family, attn)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    targets = ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"] if family == "phi3" else LORA_TARGETS
    model = peft.get_peft_model(model, peft.LoraConfig(r=8, lora_alpha=16, target_modules=targets, lora_dropout=0.0))
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.02)
    return model.eval(), config


def _windowed_layers(config) -> int:
    """Layers whose mask carries a window shorter than the sequence."""
    window = getattr(config, "sliding_window", None)
    if not window or window >= _SEQ:
        return 0
    types = getattr(config, "layer_types", None)
    return sum(t == "sliding_attention" for t in types) if types else config.num_hidden_layers


def _packed(size: int, seq: int, docs: int, seed: int) -> torch.Tensor:
    """Position ids of `docs` documents packed in each row (different cuts a row), restarting at 0."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(size):
        cuts = torch.randperm(seq - 1, generator=g)[: docs - 1].sort().values + 1
        starts = torch.zeros(seq, dtype=torch.long)
        starts[cuts] = cuts
        rows.append(torch.arange(seq) - starts.cummax(0).values)
    return torch.stack(rows)


_FAMILIES = ("gemma", "gemma2", "gemma3", "mistral", "phi3", "qwen3")
_FAST = {
    ("gemma", "sdpa", 0), ("gemma2", "eager", 3), ("gemma3", "sdpa", 2), ("mistral", "eager", 0),
    ("mistral", "sdpa", 4), ("phi3", "sdpa", 5), ("qwen3", "eager", 2),
}  # fmt: skip


@pytest.mark.parametrize(
    "family, attn, docs",
    [pytest.param(*c, marks=() if c in _FAST else pytest.mark.slow) for c in itertools.product(_FAMILIES, ["sdpa", "eager"], [0, 2, 3, 4, 5])
     if (c in _FAST or c[2] in (0, 3)) and c[:2] != ("gemma2", "sdpa")],  # transformers: Gemma 2 has no sdpa (its softcap)
)
def test_family_parity(family, attn, docs):
    _assert_parity(family, attn, docs)


@pytest.mark.parametrize("family, docs", [("mistral", 4), ("gemma3", 0)] + [
    pytest.param(f, d, marks=pytest.mark.slow) for f, d in [("mistral", 0), ("gemma", 3), ("gemma3", 2), ("phi3", 2), ("qwen3", 3)]])
def test_family_parity_with_a_frame_per_layer(family, docs):
    """The same with each decoder layer a Dynamo frame of its own (layer_frames.py): the mask, built
    before the layers, reaches them as its parts (or, plain causal, not at all) and each layer's
    frame rebuilds it where the pass proves it: the same counts, no general-mask site, exact."""
    _assert_parity(family, "sdpa", docs, framed=True)


def _assert_parity(family: str, attn: str, docs: int, framed: bool = False) -> None:
    ref, config = _model(family, attn)
    model = twin(ref)
    if framed:
        assert lowmem_compile.layer_frames_(model) == config.num_hidden_layers
    inputs = batch(seq=_SEQ)
    if docs:
        inputs["position_ids"] = _packed(*inputs["input_ids"].shape, docs, seed=docs)
    got, expected, report = compiled_and_eager(model, ref, inputs, {"inner": "eager", "attention": "kv16"})
    report = report["attention"]
    layers = config.num_hidden_layers
    assert report["replaced"] == layers and report["skipped"] == [] and report["general_masks"] == 0
    assert report["window_masks"] == _windowed_layers(config)
    assert report["packed_masks"] == (layers if docs else 0)
    if attn == "eager" or docs or framed:  # sdpa without documents may pass is_causal instead of a mask
        assert report["causal_masks"] == layers
    else:
        assert report["causal_masks"] == _masked_sdpa_sites(ref, inputs)
    assert rel_err(got.logits, expected.logits) < 1e-4 and rel_err(got.loss, expected.loss) < 1e-4
    ref_grads, grads = trainable_grads(ref), trainable_grads(model)
    assert grads
    for name, g in grads.items():
        assert rel_err(g, ref_grads[name]) < 1e-4, name


def test_gemma2_softcap_is_in_the_op():
    """Gemma 2's eager capped scores become the op's softcap (and its scale the query_pre_attn_scalar's)."""
    ref, config = _model("gemma2", "eager")
    seen = []

    def backend(gm, example_inputs):
        from lowmem_compile.options import Options
        from lowmem_compile.passes import CompileContext
        from lowmem_compile.passes.attention import AttentionPass
        from lowmem_compile.report import GraphReport

        ctx = CompileContext(options=Options(attention="kv16"), example_inputs=example_inputs, report=GraphReport(0, 0))
        AttentionPass()(gm, ctx)
        seen.extend(n for n in gm.graph.nodes if n.target is torch.ops.lowmem.attention.default)
        assert not any(n.target is torch.nn.functional.softmax for n in gm.graph.nodes)
        return gm

    torch.compile(ref, backend=backend)(**batch(seq=_SEQ))
    assert len(seen) == 2 and all(n.kwargs["softcap"] == 0.5 for n in seen)
    assert all(n.kwargs["scale"] == pytest.approx(20**-0.5) for n in seen)
    assert sorted(n.kwargs["window"] for n in seen) == [0, _WINDOW]


def test_eager_window_with_padding_stays_general():
    """Eager with a padding mask keeps HF's full mask (a fully padded row averages every key there):
    counted as general, and still equal to eager."""
    ref, _ = _model("mistral", "eager")
    model = twin(ref)
    inputs = batch(seq=_SEQ, padding=True)
    expected = ref(**inputs)
    got = torch.compile(model, backend="lowmem", options={"inner": "eager", "attention": "kv16"})(**inputs)
    report = lowmem_compile.last_report().to_dict()["attention"]
    assert report["replaced"] == 2 and report["general_masks"] == 2 and report["window_masks"] == 0
    assert rel_err(got.logits, expected.logits) < 1e-4
