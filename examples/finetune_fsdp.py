"""A LoRA / QLoRA fine-tune on several processes: PyTorch's FSDP2 (`fully_shard`) or DDP, each rank
compiling its model with `backend="lowmem"`. Start it with torchrun:

    torchrun --nproc-per-node 2 examples/finetune_fsdp.py                         # CPU (gloo): a tiny Llama, ~1 min
    torchrun --nproc-per-node 2 examples/finetune_fsdp.py --mode ddp              # DDP: LoRA gradients all-reduced
    torchrun --nproc-per-node 2 examples/finetune_fsdp.py --shape llama3-70b \\
        --seq 8192 --batch 1 --steps 10 --cap-gib 24 --options '{"remat": "full"}'  # 2 GPUs (nccl), 24 GiB each

The text is the one examples/finetune.py trains on (Python's reference manual as bytes); each rank
reads its own windows of it. The base model is built on the meta device with random weights and
brought to each rank a decoder layer at a time, under FSDP2: the layer gets storage on the rank's
device, is initialized (the same values on every rank: seeded by its index), its frozen linears go to
NF4 (`lowmem_compile.quantize_`), and `fully_shard` keeps this rank's share of it before the next layer
comes, so no rank ever holds more than one whole layer beyond its shards (a 70B model reaches two
24 GiB cards that way). Then the root (embeddings, norm, LM head) is sharded, and the model compiled.
With `--mode ddp` every rank holds the whole model (`prepare_`), and DDP all-reduces the LoRA
gradients only (the frozen NF4 weights are no parameters that need a gradient).

Prints the loss (mean over ranks) every `--log-every` steps, then tokens/s over the steps after the
first (compiling) one, each rank's peak memory on CUDA, what is sharded and the lowmem report.
`--save DIR` writes the adapters (peft `save_pretrained`, rank 0, gathered whole from the shards):
`PeftModel.from_pretrained(base, DIR)` loads them into one process.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
import torch.distributed as dist
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import lowmem_compile  # noqa: E402
from lowmem_compile import distributed as ld  # noqa: E402

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

#: name -> (hidden, layers, heads, kv heads, intermediate, vocab)
SHAPES = {
    "tiny": (128, 2, 4, 1, 384, 256),
    "llama3-8b": (4096, 32, 32, 8, 14336, 128256),
    "llama3-70b": (8192, 80, 64, 8, 28672, 128256),
}


def corpus_bytes() -> torch.Tensor:
    import pydoc_data.topics

    text = "\n\n".join(pydoc_data.topics.topics[k] for k in sorted(pydoc_data.topics.topics))
    return torch.frombuffer(bytearray(text.encode("utf-8")), dtype=torch.uint8).long()


def meta_model(args: argparse.Namespace) -> nn.Module:
    import peft
    import transformers

    hidden, layers, heads, kv, inter, vocab = SHAPES[args.shape]
    config = transformers.LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=inter,
        num_hidden_layers=args.layers or layers, num_attention_heads=heads, num_key_value_heads=kv,
        max_position_embeddings=max(args.seq, 256), attn_implementation="sdpa", use_cache=False,
    )
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=args.dtype)
        lora = peft.LoraConfig(r=args.rank, lora_alpha=2 * args.rank, target_modules=LORA_TARGETS, lora_dropout=0.0)
        return peft.get_peft_model(model, lora)


def materialize_(module: nn.Module, device: torch.device, owner: nn.Module, seed: int) -> None:
    """Give `module`'s meta tensors storage on `device` and initialize them as the model's own init
    does (`owner._init_weights`, module by module), LoRA as peft does (A random, B zero); the same
    values on every rank (seeded)."""
    torch.manual_seed(seed)
    for name, sub in module.named_modules():
        tensors = [*sub._parameters.items(), *sub._buffers.items()]
        if not any(t is not None and t.is_meta for _, t in tensors):
            continue
        for n, t in sub._parameters.items():
            if t is not None and t.is_meta:
                sub._parameters[n] = nn.Parameter(torch.empty_like(t, device=device), requires_grad=t.requires_grad)
        for n, t in sub._buffers.items():
            if t is not None and t.is_meta:
                sub._buffers[n] = torch.empty_like(t, device=device)
        with torch.no_grad():
            if "lora_A" in name.split("."):
                nn.init.kaiming_uniform_(sub.weight, a=5**0.5)
            elif "lora_B" in name.split("."):
                nn.init.zeros_(sub.weight)
            else:
                owner._init_weights(sub)


def build_fsdp(args: argparse.Namespace, device: torch.device) -> nn.Module:
    from torch.distributed.fsdp import fully_shard

    model = meta_model(args)
    owner = model.base_model.model  # the Hugging Face PreTrainedModel: its _init_weights
    for i, layer in enumerate(ld.decoder_layers(model)):
        materialize_(layer, device, owner, args.seed + 1 + i)
        if not args.bf16_base:
            lowmem_compile.quantize_(layer)  # frozen linears -> NF4 here, the 16-bit layer freed
        fully_shard(layer)  # this rank keeps its share; the whole layer goes
    materialize_(model, device, owner, args.seed)  # what is left: embeddings, norm, LM head, rotary tables
    # The embedding table as a unit of its own: gathered for its lookup only (frozen: no backward), not
    # kept whole through the step with the root's norm and LM head (2.1 GB in bf16 at Llama-3's vocab).
    fully_shard(model.get_input_embeddings())
    fully_shard(model)
    ld.sharding_stats(model)  # into the report
    return model


def build_ddp(args: argparse.Namespace, device: torch.device) -> nn.Module:
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch.manual_seed(args.seed)
    model = meta_model(args)
    lowmem_compile.prepare_(model, device=device, offload_embeddings=False, quantize=not args.bf16_base)
    return DDP(model, device_ids=[device.index] if device.type == "cuda" else None)


def batches(data: torch.Tensor, args, rank: int, device: torch.device):
    g = torch.Generator().manual_seed(args.seed * 1000 + rank)
    while True:
        starts = torch.randint(0, data.numel() - args.seq - 1, (args.batch,), generator=g)
        ids = torch.stack([data[s:s + args.seq] for s in starts.tolist()]).to(device)
        yield {"input_ids": ids, "labels": ids}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mode", choices=("fsdp", "ddp"), default="fsdp")
    p.add_argument("--shape", choices=sorted(SHAPES), default="tiny")
    p.add_argument("--layers", type=int, default=0, help="decoder layers (0: the shape's)")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--batch", type=int, default=2, help="sequences a rank, a step")
    p.add_argument("--rank", type=int, default=16, help="LoRA rank")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default=None, help="bfloat16 (CUDA default) or float32 (CPU default)")
    p.add_argument("--options", type=json.loads, default=None,
                   help='lowmem options as JSON (default: {} on CUDA, {"inner": "eager"} on the CPU)')
    p.add_argument("--cap-gib", type=float, default=None, help="cap each rank's CUDA memory (e.g. 24: an RTX 4090)")
    p.add_argument("--log-every", type=int, default=1)
    p.add_argument("--bf16-base", action="store_true", help="keep the frozen base weights in 16 bits")
    p.add_argument("--save", default=None, help="directory for the adapters (peft save_pretrained)")
    args = p.parse_args()

    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    if cuda:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
        if args.cap_gib:
            total = torch.cuda.get_device_properties(device).total_memory
            torch.cuda.set_per_process_memory_fraction(min(1.0, args.cap_gib * 2**30 / total), device)
    else:
        device = torch.device("cpu")
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    args.dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if cuda else torch.float32)
    options = args.options if args.options is not None else ({} if cuda else {"inner": "eager"})

    model = build_fsdp(args, device) if args.mode == "fsdp" else build_ddp(args, device)
    shard = lowmem_compile.last_report().sharding
    if rank == 0 and shard is not None:
        print(f"{world} ranks: NF4 {shard.nf4_local_bytes / 2**20:.1f} of {shard.nf4_bytes / 2**20:.1f} MiB on rank 0, "
              f"LoRA {shard.trainable_local_bytes / 2**20:.2f} of {shard.trainable_bytes / 2**20:.2f} MiB", flush=True)
    params = [q for q in model.parameters() if q.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr)
    compiled = torch.compile(model, backend="lowmem", options=options)
    data = batches(corpus_bytes(), args, rank, device)
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    losses, start = [], None
    for step in range(1, args.steps + 1):
        if step == 2:
            if cuda:
                torch.cuda.synchronize(device)
            start = time.perf_counter()
        loss = compiled(**next(data)).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        mean = loss.detach().float().reshape(1)
        dist.all_reduce(mean)
        losses.append(mean.item() / world)
        if rank == 0 and (step % args.log_every == 0 or step == args.steps):
            print(f"step {step:4d}: loss {losses[-1]:.4f}", flush=True)
    if cuda:
        torch.cuda.synchronize(device)
    elapsed = time.perf_counter() - start if start is not None else None
    peak = torch.tensor([torch.cuda.max_memory_allocated(device) if cuda else 0], dtype=torch.float64, device=device)
    peaks = [torch.zeros_like(peak) for _ in range(world)]
    dist.all_gather(peaks, peak)
    if rank == 0:
        if elapsed:
            tokens = (args.steps - 1) * args.batch * args.seq * world
            print(f"{tokens / elapsed:.0f} tokens/s over steps 2-{args.steps} ({world} ranks)")
        if cuda:
            print("peak allocated per rank: " + ", ".join(f"{t.item() / 2**30:.2f} GiB" for t in peaks))
        print(f"loss {losses[0]:.4f} -> {losses[-1]:.4f}")
        print(lowmem_compile.last_report())
    if args.save:
        target = model.module if args.mode == "ddp" else model
        ld.save_adapters(target, args.save)
        if rank == 0:
            print(f"adapters saved to {args.save}")
    # Drop the model (DDP's reducer holds work whose callbacks need the interpreter) before the group:
    # destroying a gloo group with them alive hung rank 0 in ~ProcessGroupGloo (joining its run loop).
    dist.barrier()
    del compiled, model, opt, params
    import gc

    gc.collect()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
