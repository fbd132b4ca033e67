"""A short LoRA fine-tune of a small Llama, compiled with `backend="lowmem"`, on real text.

The text is the Python reference manual's topic pages that ship with Python (`pydoc_data`), read as
bytes (vocabulary 256, no tokenizer download). The base model is built from a config with random
weights, frozen and quantized to NF4 by `lowmem_compile.quantize_`; LoRA adapters on every
projection learn. It prints a progress bar with the loss,
the lowmem report, and on CUDA the peak memory of the same steps run eagerly.

    python examples/finetune.py                       # CPU: a couple of minutes
    python examples/finetune.py --steps 200 --seq 512 --options '{"memory_budget": "2GB"}'
"""

from __future__ import annotations

import argparse
import json
import math
import time

import torch

import lowmem_compile

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def corpus_bytes() -> torch.Tensor:
    import pydoc_data.topics

    text = "\n\n".join(pydoc_data.topics.topics[k] for k in sorted(pydoc_data.topics.topics))
    return torch.frombuffer(bytearray(text.encode("utf-8")), dtype=torch.uint8).long()


def build_model(args: argparse.Namespace, device: torch.device) -> torch.nn.Module:
    import peft
    import transformers

    config = transformers.LlamaConfig(
        vocab_size=256,
        hidden_size=args.hidden,
        intermediate_size=args.hidden * 3,
        num_hidden_layers=args.layers,
        num_attention_heads=args.hidden // args.head_dim,
        num_key_value_heads=max(1, args.hidden // (4 * args.head_dim)),  # GQA, 4 query heads a KV head
        max_position_embeddings=max(args.seq, 256),
        attn_implementation="sdpa",
    )
    torch.manual_seed(args.seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=args.dtype).to(device)
    lora = peft.LoraConfig(r=16, lora_alpha=32, target_modules=LORA_TARGETS, lora_dropout=0.0)
    return peft.get_peft_model(model, lora)


def batches(data: torch.Tensor, args: argparse.Namespace, device: torch.device):
    """Random windows of the corpus, the same sequence for every run with the same seed."""
    g = torch.Generator().manual_seed(args.seed)
    while True:
        starts = torch.randint(0, data.numel() - args.seq - 1, (args.batch,), generator=g)
        ids = torch.stack([data[s : s + args.seq] for s in starts.tolist()]).to(device)
        yield {"input_ids": ids, "labels": ids}


def train(model, data, args, device, desc: str) -> list[float]:
    from tqdm.auto import tqdm

    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr)
    losses = []
    stream = batches(data, args, device)
    bar = tqdm(range(args.steps), desc=desc, unit="step")
    for _ in bar:
        loss = model(**next(stream)).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        bar.set_postfix(loss=f"{sum(losses[-10:]) / len(losses[-10:]):.3f}")
    return losses


def peak_gib(device: torch.device) -> float:
    return torch.cuda.max_memory_allocated(device) / 2**30


def add_run_args(p: argparse.ArgumentParser, steps: int, seq: int) -> None:
    """The model and training flags (shared with bench/kv_bits_loss.py)."""
    p.add_argument("--steps", type=int, default=steps)
    p.add_argument("--seq", type=int, default=seq)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_args(p, steps=50, seq=128)
    p.add_argument("--options", type=json.loads, default={}, help='lowmem options as JSON, e.g. \'{"attention": "kv4"}\'')
    p.add_argument("--no-eager", action="store_true", help="on CUDA, skip the eager run used for comparison")
    p.add_argument("--bf16-base", action="store_true", help="keep the frozen base weights in 16 bits (no quantize_)")
    args = p.parse_args()
    device = torch.device(args.device)
    args.dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    data = corpus_bytes()
    print(f"corpus: {data.numel():,} bytes of Python's reference manual; {args.steps} steps of {args.batch}x{args.seq} tokens")

    model = build_model(args, device)
    if not args.bf16_base:
        lowmem_compile.quantize_(model)  # frozen linear weights to NF4; LoRA adapters stay 16-bit
    model.print_trainable_parameters()
    options = {"report": False, **args.options}
    compiled = torch.compile(model, backend="lowmem", options=options)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    losses = train(compiled, data, args, device, "lowmem")
    elapsed = time.perf_counter() - start
    window = max(1, min(5, len(losses) // 2))  # the first and last steps, never overlapping
    first, last = sum(losses[:window]) / window, sum(losses[-window:]) / window
    print(
        f"loss {first:.3f} -> {last:.3f} (mean of the first / last {window} steps; uniform bytes would be "
        f"{math.log(256):.3f}); {elapsed:.1f} s incl. compile"
    )
    print(lowmem_compile.last_report())

    if device.type == "cuda" and not args.no_eager:
        lowmem_peak = peak_gib(device)
        del compiled, model
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        eager = build_model(args, device)
        train(eager, data, args, device, "eager")
        print(f"peak GPU memory: lowmem {lowmem_peak:.3f} GiB, eager {peak_gib(device):.3f} GiB")


if __name__ == "__main__":
    main()
