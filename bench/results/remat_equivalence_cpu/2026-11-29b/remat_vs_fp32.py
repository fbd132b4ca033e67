"""Is `remat="full"` less accurate than the defaults, or only rounded elsewhere? One step of a
small 3-layer Llama (bench/e2e.py's "small" shape, LoRA r=16 with B drawn nonzero) in bf16 with
the frozen linears in NF4, through several compilers and remat plans; each row's loss and LoRA
gradients are compared with an fp32 eager run of the *same* weights (the NF4 weights dequantized,
every other bf16 parameter upcast), so the quantization itself is not in the error.

    python bench/results/remat_equivalence_cpu/2026-11-29b/remat_vs_fp32.py [seq] [kv16|kv4|off]

Columns: loss minus the fp32 loss; the relative difference of all LoRA gradients together
(‖g − g_ref‖ / ‖g_ref‖); the largest relative difference of any single one.
"""
import copy
import sys
import warnings

import torch

warnings.simplefilter("ignore")
import lowmem_compile  # noqa: E402
from lowmem_compile.quantize import NF4Linear  # noqa: E402
from bench.e2e import add_lora, build_model, llama_config  # noqa: E402

seq = int(sys.argv[1]) if len(sys.argv) > 1 else 256
attention = sys.argv[2] if len(sys.argv) > 2 else "kv16"
torch.manual_seed(0)
cfg = llama_config("small", 3, seq)
base = add_lora(build_model(cfg, "cpu", 0).float(), False)
for name, p in base.named_parameters():
    if "lora_B" in name:
        p.data.normal_(0, 0.02)
ids = torch.randint(0, cfg.vocab_size, (1, seq))

quantized = base.to(torch.bfloat16)
lowmem_compile.quantize_(quantized)
reference = copy.deepcopy(quantized)
for name, module in list(reference.named_modules()):
    if isinstance(module, NF4Linear):
        parent, _, child = name.rpartition(".")
        linear = torch.nn.Linear(module.in_features, module.out_features, bias=module.bias is not None)
        linear.weight = torch.nn.Parameter(module.dequantize().float(), requires_grad=False)
        if module.bias is not None:
            linear.bias = torch.nn.Parameter(module.bias.detach().float(), requires_grad=False)
        setattr(reference.get_submodule(parent), child, linear)
reference.float()


def step(model):
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.item(), {n.removeprefix("_orig_mod."): p.grad.detach().double()
                         for n, p in model.named_parameters() if p.requires_grad}


ref_loss, ref_grads = step(reference)
ref_norm = sum(g.square().sum() for g in ref_grads.values()).sqrt()
print(f"fp32 eager reference: loss {ref_loss:.6f}  (seq {seq}, attention {attention})")
rows = [("bf16 eager (no compile)", None, {}), ("stock inductor", "inductor", {})]
for inner in ("eager", "inductor"):
    for plan, opts in (("defaults", {}), ("full", {"remat": "full"})):
        rows.append((f"lowmem {plan}, inner {inner}", "lowmem", {"inner": inner, "attention": attention, **opts}))
for label, backend, options in rows:
    model = copy.deepcopy(quantized)
    torch._dynamo.reset()
    if backend is not None:
        model = torch.compile(model, backend=backend, **({"options": options} if backend == "lowmem" else {}))
    loss, grads = step(model)
    total = sum((grads[k] - ref_grads[k]).square().sum() for k in grads).sqrt() / ref_norm
    worst = max(((grads[k] - ref_grads[k]).norm() / ref_grads[k].norm()).item() for k in grads)
    print(f"{label:32s} loss-ref {loss - ref_loss:+.2e}  grads all {total.item():.3e}  worst {worst:.3e}", flush=True)
