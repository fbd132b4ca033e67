"""Tiny Hugging Face causal LMs of the families we must support, with peft LoRA, for parity tests."""

from __future__ import annotations

import copy

import torch

FAMILIES = ("llama", "mistral", "qwen2", "gemma")
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def tiny_config(family: str, attn_implementation: str = "sdpa", **overrides):
    """A 2-layer config: GQA (4 query / 2 KV heads), head dim 16, vocab 256."""
    import transformers

    classes = {
        "llama": transformers.LlamaConfig,
        "mistral": transformers.MistralConfig,
        "qwen2": transformers.Qwen2Config,
        "gemma": transformers.GemmaConfig,
    }
    kwargs = dict(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=512,
        attn_implementation=attn_implementation,
    )
    kwargs.update(overrides)
    return classes[family](**kwargs)


def tiny_model(family: str, attn_implementation: str = "sdpa", lora: bool = True, dtype=torch.float32, **overrides):
    """A randomly initialised tiny causal LM; with `lora`, peft LoRA r=8 on every projection."""
    import transformers

    config = tiny_config(family, attn_implementation, **overrides)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)
    if lora:
        import peft

        model = peft.get_peft_model(
            model, peft.LoraConfig(r=8, lora_alpha=16, target_modules=LORA_TARGETS, lora_dropout=0.0)
        )
        # peft starts B at zero; make the adapters non-trivial so their gradients are tested.
        for name, p in model.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.02)
    model.eval()  # no dropout, so compiled and eager runs see the same function
    return model


def batch(vocab: int = 256, size: int = 2, seq: int = 24, padding: bool = False, seed: int = 0):
    """input_ids, labels and (with `padding`) a left-padded attention mask."""
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, vocab, (size, seq), generator=g)
    out = {"input_ids": input_ids, "labels": input_ids.clone()}
    if padding:
        mask = torch.ones(size, seq, dtype=torch.long)
        mask[0, : seq // 3] = 0
        out["attention_mask"] = mask
        out["labels"][mask == 0] = -100
    return out


def twin(model):
    """An independent copy (same weights) so eager and compiled runs do not share gradients."""
    return copy.deepcopy(model)


def compiled_and_eager(model, reference, inputs: dict, options: dict):
    """One step of `model` compiled with the lowmem backend and of `reference` eagerly (both run
    backward): (compiled output, eager output, the compile's report as a dict)."""
    import lowmem_compile

    expected = reference(**inputs)
    expected.loss.backward()
    lowmem_compile.reset()
    got = torch.compile(model, backend="lowmem", options=options)(**inputs)
    got.loss.backward()
    return got, expected, lowmem_compile.last_report().to_dict()


def assert_step_matches_eager(model, reference, inputs: dict, options: dict, tol: float) -> dict:
    """One step of `model` compiled with the lowmem backend against one eager step of `reference`
    (the same weights): the loss and every trainable gradient within `tol` (relative); returns the
    compile's report as a dict."""
    got, expected, report = compiled_and_eager(model, reference, inputs, options)
    assert abs(got.loss.item() - expected.loss.item()) <= tol * abs(expected.loss.item())
    grads, want = trainable_grads(model), trainable_grads(reference)
    assert grads.keys() == want.keys() and grads
    for name, grad in grads.items():
        assert grad is not None, name
        assert rel_err(grad, want[name]) < tol, name
    return report


def trainable_grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """‖a − b‖ / ‖b‖ in float64."""
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp(min=1e-30)).item()
