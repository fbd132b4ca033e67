"""Do the remat plans change the gradients? One step of a small 3-layer Llama (bench/e2e.py's
"small" shape, LoRA r=16 with B drawn nonzero so A gets gradients too) through backend="lowmem"
under several remat/offload settings; for each: the loss, the largest relative difference of any
LoRA gradient from the defaults' plan, and from an fp32 eager reference.

    python bench/results/remat_equivalence_cpu/2026-11-29/remat_grads.py eager kv4 bf16
    (inner: eager | inductor; attention: kv4 | kv16 | off; weights: bf16 (NF4 via quantize_) | fp32 (autocast))
"""
import copy
import sys
import warnings

import torch

warnings.simplefilter("ignore")
import lowmem_compile  # noqa: E402
from lowmem_compile.passes import offload  # noqa: E402
from bench.e2e import add_lora, build_model, llama_config  # noqa: E402

inner, attention, weights = sys.argv[1:4]
offload.MIN_BYTES = 1
torch.manual_seed(0)
cfg = llama_config("small", 3, 256)
base = add_lora(build_model(cfg, "cpu", 0).float(), False)
for name, p in base.named_parameters():
    if "lora_B" in name:
        p.data.normal_(0, 0.02)
ids = torch.randint(0, cfg.vocab_size, (1, 256))


def grads(model):
    return {n: p.grad.detach().float().clone() for n, p in model.named_parameters() if p.requires_grad}


def rel(a, b):
    return max(((a[k] - b[k]).norm() / b[k].norm()).item() for k in a)


ref = copy.deepcopy(base)
ref(input_ids=ids, labels=ids).loss.backward()
reference = grads(ref)
first = None
for label, opts in [("defaults", {}), ("full", {"remat": "full"}), ("full+offload", {"remat": "full", "offload": "layers"}),
                    ("auto, 1-byte budget, parked", {"offload": "parked", "memory_budget": 1})]:
    model = copy.deepcopy(base)
    if weights == "bf16":
        model = model.to(torch.bfloat16)
        lowmem_compile.quantize_(model)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="lowmem", options={"inner": inner, "attention": attention, **opts})
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=weights == "fp32"):
        loss = compiled(input_ids=ids, labels=ids).loss
    loss.backward()
    g = grads(model)
    first = first or g
    plan = [n for n in lowmem_compile.last_report().to_dict()["remat"]["notes"] if " evaluated" in n][-1].split(";")[0]
    print(f"{label:30s} loss {loss.item():.6f}  vs defaults {rel(g, first):.2e}  vs fp32 eager {rel(g, reference):.4f}  ({plan})", flush=True)
