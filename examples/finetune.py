"""A short LoRA fine-tune of a small Llama, compiled with `backend="lowmem"`, on real text.

The text is the Python reference manual's topic pages that ship with Python (`pydoc_data`), read as
bytes (vocabulary 256, no tokenizer download); the last tenth of it (`--held-out`) is never trained
on. The base model is built from a config with random weights on the CPU; `lowmem_compile.prepare_`
moves it to the device layer by layer, its frozen linear weights quantized to NF4 on the way; LoRA
adapters on every projection learn. Every `--eval-every` steps it prints the loss on the held-out
text, and it stops when that loss has not improved for `--patience` evaluations, keeping the adapters
of the best one. At the end: the lowmem report, and on CUDA the peak memory of the same steps run
eagerly.

    python examples/finetune.py                       # CPU: about a minute
    python examples/finetune.py --steps 200 --seq 512 --budget 2GB
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


def split(data: torch.Tensor, held_out: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(training text, held-out text): the last `held_out` of the corpus (whole topics, never trained on)."""
    cut = int(data.numel() * (1 - held_out))
    return data[:cut], data[cut:]


def eval_batches(held: torch.Tensor, args: argparse.Namespace, device: torch.device) -> list[dict]:
    """`--eval-batches` fixed batches of windows spread evenly over the held-out text."""
    count = args.eval_batches * args.batch
    starts = torch.linspace(0, held.numel() - args.seq - 1, count).long().tolist()
    out = []
    for i in range(0, count, args.batch):
        ids = torch.stack([held[s : s + args.seq] for s in starts[i : i + args.batch]]).to(device)
        out.append({"input_ids": ids, "labels": ids})
    return out


def evaluate(model, batches: list[dict]) -> float:
    """The mean loss over `batches`. It runs the training graph's forward (autograd on, what it saves for
    the backward freed with the loss, never more than a training step holds) rather than a no-grad one,
    which would be a second graph to compile; the model has no dropout, so the loss is the same."""
    return sum(model(**b).loss.item() for b in batches) / len(batches)


def batches(data: torch.Tensor, args: argparse.Namespace, device: torch.device):
    """Random windows of the corpus, the same sequence for every run with the same seed."""
    g = torch.Generator().manual_seed(args.seed)
    while True:
        starts = torch.randint(0, data.numel() - args.seq - 1, (args.batch,), generator=g)
        ids = torch.stack([data[s : s + args.seq] for s in starts.tolist()]).to(device)
        yield {"input_ids": ids, "labels": ids}


def train(model, data, args, device, desc: str, held: list[dict] | None = None, history: list | None = None) -> list[float]:
    """`args.steps` steps on random windows of `data`; the training losses. With `held` (batches), every
    `args.eval_every` steps the held-out loss is printed and appended to `history` as (step, loss); after
    `args.patience` evaluations without a new best (0: never), training stops and the adapters of the
    best evaluation are put back."""
    from tqdm.auto import tqdm

    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    opt = torch.optim.AdamW(list(trainable.values()), lr=args.lr)
    losses = []
    history = [] if history is None else history
    best, best_state, waited = math.inf, None, 0
    stream = batches(data, args, device)
    bar = tqdm(range(args.steps), desc=desc, unit="step")
    for step in bar:
        loss = model(**next(stream)).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if step == 0 and device.type == "cuda":
            lowmem_compile.release_compile_memory(device, reset_peak=False)  # the compile's scratch, back to the driver
        bar.set_postfix(loss=f"{sum(losses[-10:]) / len(losses[-10:]):.3f}")
        if held is None or args.eval_every <= 0 or ((step + 1) % args.eval_every and step + 1 != args.steps):
            continue
        held_loss = evaluate(model, held)
        history.append((step + 1, held_loss))
        train_loss = sum(losses[-args.eval_every :]) / len(losses[-args.eval_every :])
        if held_loss < best - args.min_delta:
            best, waited = held_loss, 0
            best_state = {n: p.detach().clone() for n, p in trainable.items()}
            mark = "best"
        else:
            waited += 1
            mark = f"no better than {best:.3f} for {waited}"
        bar.write(f"step {step + 1:4d}: train {train_loss:.3f}, held-out {held_loss:.3f} ({mark})")
        if args.patience and waited >= args.patience:
            bar.write(f"stopping early: the held-out loss has not improved for {waited} evaluations")
            break
    bar.close()
    if best_state is not None and history and history[-1][1] > best:
        with torch.no_grad():
            for n, p in trainable.items():
                p.copy_(best_state[n])
        step, loss = min(history, key=lambda e: e[1])
        print(f"adapters restored from step {step} (held-out {loss:.3f})")
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
    p.add_argument("--budget", help='the memory budget (the `memory_budget` option), e.g. "7GiB"')
    p.add_argument("--held-out", type=float, default=0.1, help="fraction of the text kept for evaluation (the end)")
    p.add_argument("--eval-every", type=int, default=10, help="steps between held-out evaluations (0: none)")
    p.add_argument("--eval-batches", type=int, default=4, help="batches of the held-out text an evaluation reads")
    p.add_argument("--patience", type=int, default=3, help="evaluations without a better held-out loss before stopping (0: never)")
    p.add_argument("--min-delta", type=float, default=0.0, help="how much lower a held-out loss must be to count as better")
    p.add_argument("--no-eager", action="store_true", help="on CUDA, skip the eager run used for comparison")
    p.add_argument("--bf16-base", action="store_true", help="keep the frozen base weights in 16 bits (no quantize_)")
    args = p.parse_args()
    device = torch.device(args.device)
    args.dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    data, held = split(corpus_bytes(), args.held_out)
    print(f"corpus: {data.numel():,} bytes of Python's reference manual to train on, {held.numel():,} held out; "
          f"{args.steps} steps of {args.batch}x{args.seq} tokens")

    model = build_model(args, torch.device("cpu"))
    # to the device layer by layer: frozen linear weights to NF4 on the way (LoRA adapters stay 16-bit),
    # the embedding table in host memory on CUDA, no K/V cache
    summary = lowmem_compile.prepare_(model, device, quantize=not args.bf16_base)
    print(summary)
    model.print_trainable_parameters()
    options = {"report": False, **args.options}
    if args.budget:
        options["memory_budget"] = args.budget
    compiled = torch.compile(model, backend="lowmem", options=options)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    history: list = []
    losses = train(compiled, data, args, device, "lowmem", held=eval_batches(held, args, device), history=history)
    elapsed = time.perf_counter() - start
    window = max(1, min(5, len(losses) // 2))  # the first and last steps, never overlapping
    first, last = sum(losses[:window]) / window, sum(losses[-window:]) / window
    print(
        f"loss {first:.3f} -> {last:.3f} (mean of the first / last {window} steps; uniform bytes would be "
        f"{math.log(256):.3f}); {elapsed:.1f} s incl. compile"
    )
    if history:
        step, best = min(history, key=lambda e: e[1])
        print(f"held-out loss {history[0][1]:.3f} at step {history[0][0]} -> best {best:.3f} at step {step} "
              f"({len(losses)} of {args.steps} steps run)")
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
