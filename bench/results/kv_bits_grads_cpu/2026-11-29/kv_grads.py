"""kv4/kv8/kv16: how far are one step's LoRA gradients from fp32? A small Llama (bench/e2e.py's
"small" shape, LoRA B drawn nonzero, frozen linears in NF4, bf16 autocast, inner eager so only the
attention kernel's K/V bits differ between rows), against an fp32 run of the same dequantized
weights (bench/trajectory.py's reference); once at random-init scale and once with the q and k
projections scaled by 4 (attention logits x16: sharper attention, as trained models have).

    PYTHONPATH=. python bench/results/kv_bits_grads_cpu/2026-11-29/kv_grads.py 3 256   # layers, tokens
"""
import copy
import sys
import warnings

import torch

warnings.simplefilter("ignore")
import lowmem_compile
from bench.e2e import add_lora, build_model, llama_config
from bench.trajectory import fp32_reference
layers, seq = int(sys.argv[1]), int(sys.argv[2])
for qk_scale in (1.0, 4.0):
    torch.manual_seed(0)
    cfg = llama_config("small", layers, seq)
    model = build_model(cfg, "cpu", 0)
    with torch.no_grad():
        for l in model.model.layers:
            l.self_attn.q_proj.weight.mul_(qk_scale); l.self_attn.k_proj.weight.mul_(qk_scale)
    model = add_lora(model, False)
    for n, p in model.named_parameters():
        if "lora_B" in n: p.data.normal_(0, 0.02)
    lowmem_compile.quantize_(model)
    ids = torch.randint(0, cfg.vocab_size, (1, seq))
    ref = fp32_reference(model)
    ref(input_ids=ids, labels=ids).loss.backward()
    g_ref = {n: p.grad.double() for n, p in ref.named_parameters() if p.requires_grad}
    norm = sum(g.square().sum() for g in g_ref.values()).sqrt()
    for att in ("kv16", "kv8", "kv4"):
        m = copy.deepcopy(model); torch._dynamo.reset()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = torch.compile(m, backend="lowmem", options={"inner": "eager", "attention": att})(input_ids=ids, labels=ids).loss
        loss.backward()
        g = {n.removeprefix("_orig_mod."): p.grad.double() for n, p in m.named_parameters() if p.requires_grad}
        err = sum((g[k] - g_ref[k]).square().sum() for k in g_ref).sqrt() / norm
        print(f"qk x{qk_scale}: {att} grads vs fp32 {err:.3e}", flush=True)
