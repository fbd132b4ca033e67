"""The journey's memory on one GPU: `prepare_` a Llama-shape model onto the device layer by layer (from
a bf16 model on the CPU, or from the meta device), then optionally compile and train, releasing the
compile's cached memory after the first step.

Prints, and writes as JSON with `--out`:
- prepare: the device's peak allocated memory while preparing, against the prepared model's size
  plus one decoder layer in 16 bits (the bound issue 21 sets), and the time it took;
- train (`--steps N`): after the first (compiling) step, reserved and allocated memory before and after
  `lowmem_compile.release_compile_memory()`; over the N-1 timed steps, the peaks of reserved and
  allocated memory (issue 21: reserved <= allocated + 10%) and tokens/s.

    python bench/prepare_memory.py --model llama3-8b --source cpu                   # prepare only
    python bench/prepare_memory.py --model llama3-8b --source meta --steps 6 --seq 8192 \\
        --options '{"offload": "parked", "logits": "drop", "mlp_chunks": "auto", "memory_budget": "6.3GiB"}'
    python bench/prepare_memory.py --model llama3-8b --source cpu --cap-gib 10 --steps 6 --seq 8192   # the capped journey
    python bench/prepare_memory.py --model llama3-70b --source meta                  # 70B shape on one GPU (issue 19)

`--cap-gib` sets `torch.cuda.set_per_process_memory_fraction` before anything touches the GPU.
`--expandable` sets `PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True` (must be set before CUDA starts).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.e2e import GIB, MODELS, llama_config  # noqa: E402
from tests.models import LORA_TARGETS  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="llama3-8b", choices=sorted(MODELS))
    p.add_argument("--layers", type=int, default=None, help="fewer decoder layers than the model has")
    p.add_argument("--source", default="meta", choices=["cpu", "meta"], help="bf16 weights on the CPU, or the meta device")
    p.add_argument("--cap-gib", type=float, default=None, help="cap the process's GPU memory before loading")
    p.add_argument("--expandable", action="store_true", help="PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True")
    p.add_argument("--steps", type=int, default=0, help="training steps after preparing (0: prepare only)")
    p.add_argument("--seq", type=int, default=8192)
    p.add_argument("--options", type=json.loads, default={}, help="lowmem options as JSON")
    p.add_argument("--no-release", action="store_true", help="do not call release_compile_memory (the A/B)")
    p.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = p.parse_args()
    if args.expandable:
        os.environ["PYTORCH_CUDA_ALLOC_CONF"] = "expandable_segments:True"

    import peft
    import torch
    import transformers

    import lowmem_compile

    device = torch.device("cuda")
    total = torch.cuda.get_device_properties(device).total_memory
    if args.cap_gib:
        torch.cuda.set_per_process_memory_fraction(min(1.0, args.cap_gib * GIB / total), device)
    config = llama_config(args.model, args.layers, args.seq)
    result: dict = {"model": args.model, "layers": config.num_hidden_layers, "source": args.source,
                    "cap_gib": args.cap_gib, "expandable": args.expandable, "gpu": torch.cuda.get_device_name(device)}

    start = time.perf_counter()
    torch.manual_seed(0)
    if args.source == "meta":
        with torch.device("meta"):
            model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    else:
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    layer_bytes = sum(t.numel() * t.element_size() for t in model.model.layers[0].parameters())
    model = peft.get_peft_model(model, peft.LoraConfig(r=16, lora_alpha=32, target_modules=LORA_TARGETS, lora_dropout=0.0))
    built = time.perf_counter() - start
    base = torch.cuda.memory_allocated(device)
    start = time.perf_counter()
    summary = lowmem_compile.prepare_(model, device)
    torch.cuda.synchronize(device)
    prepared_s = time.perf_counter() - start
    resident = torch.cuda.memory_allocated(device) - base
    peak = summary.device_peak_bytes - base
    print(summary)
    result["prepare"] = {
        "build_s": round(built, 1), "prepare_s": round(prepared_s, 1), "device_peak_gib": peak / GIB,
        "prepared_gib": resident / GIB, "one_layer_16bit_gib": layer_bytes / GIB,
        "bound_gib": (resident + layer_bytes) / GIB, "within_bound": peak <= resident + layer_bytes,
        "host_gib": summary.host_bytes / GIB, "quantized": len(summary.quantized), "offloaded": summary.offloaded,
        "left": summary.left,
    }
    print(f"prepare: device peak {peak / GIB:.3f} GiB, prepared model {resident / GIB:.3f} GiB, + one 16-bit layer "
          f"{layer_bytes / GIB:.3f} GiB = bound {(resident + layer_bytes) / GIB:.3f} GiB "
          f"({'within' if peak <= resident + layer_bytes else 'OVER'}); {prepared_s:.1f} s (build {built:.1f} s)")

    if args.steps:
        compiled = torch.compile(model, backend="lowmem", options={"report": False, **args.options})
        opt = torch.optim.AdamW([q for q in model.parameters() if q.requires_grad], lr=1e-4)
        g = torch.Generator().manual_seed(0)

        def step() -> float:
            ids = torch.randint(0, shape["vocab_size"], (1, args.seq), generator=g).to(device)
            loss = compiled(input_ids=ids, labels=ids).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            return loss.item()

        torch.cuda.reset_peak_memory_stats(device)
        start = time.perf_counter()
        step()
        first = {"seconds": round(time.perf_counter() - start, 1),
                 "allocated_peak_gib": torch.cuda.max_memory_allocated(device) / GIB,
                 "reserved_gib": torch.cuda.memory_reserved(device) / GIB}
        if not args.no_release:
            released = lowmem_compile.release_compile_memory(device)
            first["reserved_after_release_gib"] = released["reserved_after"] / GIB
        torch.cuda.reset_peak_memory_stats(device)
        torch.cuda.synchronize(device)
        start = time.perf_counter()
        losses = [step() for _ in range(args.steps - 1)]
        torch.cuda.synchronize(device)
        elapsed = time.perf_counter() - start
        timed = {"steps": len(losses), "tokens_per_s": round(len(losses) * args.seq / elapsed) if losses else None,
                 "allocated_peak_gib": torch.cuda.max_memory_allocated(device) / GIB,
                 "reserved_peak_gib": torch.cuda.max_memory_reserved(device) / GIB, "losses": losses}
        if losses:
            timed["reserved_over_allocated"] = timed["reserved_peak_gib"] / timed["allocated_peak_gib"]
        result["train"] = {"seq": args.seq, "options": args.options, "first_step": first, "timed": timed}
        print(f"first step: {first}")
        print(f"timed steps: allocated peak {timed['allocated_peak_gib']:.3f} GiB, reserved peak "
              f"{timed['reserved_peak_gib']:.3f} GiB, {timed['tokens_per_s']} tokens/s")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
