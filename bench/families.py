"""Every model family end to end (issue 20): the published shapes of Llama-3-8B, Mistral-7B-v0.1
(sliding window 4096), Qwen2.5-7B (q/k/v bias, 7 query heads a KV head), Gemma-7B (head dim 256)
and Gemma-2-9B (head dim 256, window 4096 on alternate layers, attention and final logit softcaps,
query_pre_attn_scalar), a few decoder layers each, random weights built from the config.

For each family, the same LoRA model (r=16 on every projection, frozen linears in NF4 by
`lowmem_compile.quantize_`), the same seed and tokens, under three configurations, one after the other:

    fp32     the reference: eager fp32 without autocast, every 4-bit linear turned back into an fp32
             nn.Linear of its dequantized weight (bench/trajectory.py's `fp32_reference`), so the
             quantization is in neither side of a difference; each layer recomputed in the backward
             (Hugging Face's non-reentrant checkpointing: the same fp32 numbers, and an fp32 eager
             Gemma 2 at 8192 tokens would otherwise save ~8 GiB of scores a layer: its tanh and softmax outputs)
    eager    bf16 autocast, no compile (bench/trajectory.py's `eager`: the NF4 model as it runs eagerly)
    lowmem   torch.compile(backend="lowmem") with the defaults (or --lowmem-options)

each `--warmup` (1) + `--steps` (3) AdamW steps on one repeated batch. Figures per family: the
attention report (sites replaced, causal / window / packed / general masks, skipped), the losses of
the first and last step of each configuration, the first step's LoRA gradients of eager and lowmem
against the reference's (‖g − g_ref‖ / ‖g_ref‖ over all of them), peak GPU memory
(max_memory_allocated over the timed steps) and tokens/s (median timed step) of eager and lowmem,
the first step's seconds (lowmem: the compile). Every model is rebuilt from the seed for its
configuration and freed after it, so a peak holds that configuration's own model alone. The models
return no K/V cache (`use_cache=False`, as a training loop sets it).

Each family runs in its own process (one family at a time), so an OOM, a crash or the allocator's
state of one never reaches another; a configuration that fails is a row with its error, the others
still run; a family past `--time-limit` is killed and what it had not reported becomes error rows.

    python bench/families.py                                   # 5 families, 4 layers, 8192 tokens (GPU)
    python bench/families.py --families gemma2-9b,mistral-7b --steps 5
    python bench/families.py --device cpu --scale small --seq 64 --layers 2   # CPU smoke (3.6 min on 2 busy cores)

`--scale small` keeps each family's head dim, GQA ratio, biases, window (shrunk to seq/2 where it is
not shorter than the sequence) and softcaps, and divides the rest: hidden / 16, intermediate / 32,
vocabulary / 128, KV heads / 8 (at least 1).

Output in `--out` (default $OUT, else bench/results/families): families.jsonl (a record per family
and configuration), families.md (the table, with GPU, versions, date and command), families.log
(the end of each worker's stderr). Rewritten after each family, so a run cut short keeps what it measured.
"""

from __future__ import annotations

import argparse
import gc
import json
import shlex
import sys
import time
import traceback
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from anywhere: the package, bench and tests.models import
    sys.path.insert(0, str(ROOT))

from bench._common import default_out_dir, environment, markdown_table, run_process_group, write_jsonl  # noqa: E402
from bench.e2e import GIB, MODELS, Recipe, _train, load_for_training, worker_env  # noqa: E402
from bench.trajectory import fp32_reference, quantized_model  # noqa: E402

ROW_MARKER = "FAMILIES_ROW "
CONFIGS = ("fp32", "eager", "lowmem")

#: The published configs (config class, shape, attention implementation). Field names are the config
#: classes' own (tests/test_bench_families.py checks them against transformers' signatures);
#: `rope_theta` goes into `rope_parameters`.
FAMILIES: dict[str, tuple[str, dict[str, Any], str]] = {
    "llama3-8b": ("LlamaConfig", dict(MODELS["llama3-8b"], tie_word_embeddings=False), "sdpa"),
    "mistral-7b": ("MistralConfig", dict(  # v0.1: the one with a sliding window
        hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
        vocab_size=32000, rope_theta=10000.0, max_position_embeddings=32768, rms_norm_eps=1e-5, sliding_window=4096,
        tie_word_embeddings=False), "sdpa"),
    "qwen2.5-7b": ("Qwen2Config", dict(  # q/k/v carry a bias (Qwen2's attention always has one)
        hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
        vocab_size=152064, rope_theta=1000000.0, max_position_embeddings=131072, rms_norm_eps=1e-6,
        use_sliding_window=False, tie_word_embeddings=False), "sdpa"),
    "gemma-7b": ("GemmaConfig", dict(  # embedding scaled by sqrt(hidden), tied LM head
        hidden_size=3072, intermediate_size=24576, num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=16,
        head_dim=256, vocab_size=256000, rope_theta=10000.0, max_position_embeddings=8192, rms_norm_eps=1e-6,
        tie_word_embeddings=True), "sdpa"),
    "gemma2-9b": ("Gemma2Config", dict(  # window on alternate layers (layer_types' default); no sdpa (its softcap)
        hidden_size=3584, intermediate_size=14336, num_hidden_layers=42, num_attention_heads=16, num_key_value_heads=8,
        head_dim=256, vocab_size=256000, rope_theta=10000.0, max_position_embeddings=8192, rms_norm_eps=1e-6,
        sliding_window=4096, attn_logit_softcapping=50.0, final_logit_softcapping=30.0, query_pre_attn_scalar=256,
        tie_word_embeddings=True), "eager"),
}  # fmt: skip


def _round(x: int, multiple: int) -> int:
    return max(multiple, round(x / multiple) * multiple)


def family_shape(family: str, layers: int, seq: int, scale: str = "full") -> tuple[str, dict[str, Any], str]:
    """(config class name, config kwargs, attention implementation) of `family` at `layers` and `seq`."""
    cls_name, published, attn = FAMILIES[family]
    shape = dict(published, num_hidden_layers=layers, use_cache=False)
    shape["max_position_embeddings"] = max(shape["max_position_embeddings"], seq)
    if scale == "small":  # the same features, a CPU's size: head dim, GQA ratio, window < seq, softcaps kept
        heads, kv = shape["num_attention_heads"], shape["num_key_value_heads"]
        shape["head_dim"] = shape.get("head_dim") or shape["hidden_size"] // heads
        shape["num_key_value_heads"] = max(1, kv // 8)
        shape["num_attention_heads"] = shape["num_key_value_heads"] * (heads // kv)
        shape["hidden_size"] = _round(shape["hidden_size"] // 16, 64)
        shape["intermediate_size"] = _round(shape["intermediate_size"] // 32, 64)
        shape["vocab_size"] = shape["vocab_size"] // 128
        if shape.get("sliding_window") and shape["sliding_window"] >= seq:
            shape["sliding_window"] = max(1, seq // 2)  # the published 4096 of 8192
    elif scale != "full":
        raise ValueError(f"scale {scale!r}: full or small")
    return cls_name, shape, attn


def family_config(family: str, layers: int, seq: int, scale: str = "full"):
    import transformers

    cls_name, shape, attn = family_shape(family, layers, seq, scale)
    return getattr(transformers, cls_name)(**shape, attn_implementation=attn)


def _config_summary(config) -> dict[str, Any]:
    keys = ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads", "head_dim", "vocab_size",
            "sliding_window", "attn_logit_softcapping", "final_logit_softcapping", "query_pre_attn_scalar")
    out = {k: getattr(config, k, None) for k in keys}
    out["head_dim"] = out["head_dim"] or config.hidden_size // config.num_attention_heads
    types = getattr(config, "layer_types", None)
    out["window_layers"] = (
        0 if not out["sliding_window"] or getattr(config, "use_sliding_window", True) is False
        else sum(t == "sliding_attention" for t in types) if types else config.num_hidden_layers
    )
    out["attn_implementation"] = config._attn_implementation
    return out


# --------------------------------------------------------------------------------------------- worker


def _grad_error(grads: dict[str, Any], ref: dict[str, Any]) -> float:
    """‖g − g_ref‖ / ‖g_ref‖ over every LoRA gradient (as bench/trajectory.py judges its rows)."""
    diff = sum((grads[k] - ref[k]).square().sum() for k in ref)
    return (diff / sum(g.square().sum() for g in ref.values())).sqrt().item()


def _capture_first_grads(model, optimizer) -> dict[str, Any]:
    """Filled, at the first optimizer step, with each trainable parameter's gradient (fp64, on the CPU)."""
    names = {id(p): n for n, p in model.named_parameters() if p.requires_grad}
    grads: dict[str, Any] = {}

    def hook(opt, args, kwargs):
        if grads:
            return
        for group in opt.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    grads[names[id(p)]] = p.grad.detach().double().cpu()

    optimizer.register_step_pre_hook(hook)
    return grads


def _fp32_step(model, device: str):
    """The model called with autocast off: e2e's step opens a bf16 autocast around it."""
    import torch

    def step(**kwargs):
        with torch.autocast(device, enabled=False):
            return model(**kwargs)

    return step


def _build(args: argparse.Namespace, config, name: str):
    """(model, the function a step calls) of one configuration, from the seed."""
    import torch

    import lowmem_compile

    ns = argparse.Namespace(weights="ours", device=args.device, seed=args.seed)
    model = quantized_model(ns, config)  # random weights (seeded), LoRA, frozen linears in NF4
    if name == "fp32":
        reference = fp32_reference(model)
        del model
        reference.get_base_model().gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        reference.train()
        return reference, _fp32_step(reference, args.device)
    model.train()
    if name == "eager":
        return model, model
    lowmem_compile.reset()
    return model, torch.compile(model, backend="lowmem", options=json.loads(args.lowmem_options))


def run_config(args: argparse.Namespace, config, name: str, input_ids, ref_grads) -> tuple[dict[str, Any], Any]:
    """One configuration's row and its first LoRA gradients (None where it failed); never raises."""
    import torch

    cuda = args.device == "cuda"
    row: dict[str, Any] = {"family": args.family, "config": name, "seq": args.seq, "layers": args.layers,
                           "scale": args.scale, "device": args.device}
    if name == "lowmem":
        row["lowmem_options"] = json.loads(args.lowmem_options)
    grads = None
    try:
        if cuda:
            row["gpu"] = torch.cuda.get_device_name()
            torch.cuda.reset_peak_memory_stats()
        model, step_fn, optimizer = load_for_training(lambda: _build(args, config, name), args.lr, row)
        grads = _capture_first_grads(model, optimizer)
        if cuda:
            row["resident_bytes"] = torch.cuda.memory_allocated()
        step_args = argparse.Namespace(**vars(args), config=f"{args.family} {name}", gpu_lock=None, profile=False,
                                       no_head=False)
        _train(step_args, Recipe(), step_fn, optimizer, input_ids, row)  # bench/e2e.py's timed loop
        if name == "lowmem":
            import lowmem_compile

            row["lowmem_report"] = lowmem_compile.last_report().to_dict()
            row["attention"] = row["lowmem_report"]["attention"]
        if ref_grads is not None and name != "fp32":
            row["grad_error_step1"] = _grad_error(grads, ref_grads)
    except BaseException as exc:  # an error row, whatever happened (OOM included)
        first_line = (str(exc).strip().splitlines() or [""])[0]
        row["error"] = f"{type(exc).__name__}: {first_line}"[:400]
        row["oom"] = "OutOfMemoryError" in type(exc).__name__ or "out of memory" in str(exc)
        grads = None
        traceback.print_exc()
    model = step_fn = optimizer = None  # noqa: F841  (free the model before the next configuration)
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return row, grads


def run_family(args: argparse.Namespace) -> None:
    """Each configuration of one family in turn, a ROW_MARKER line on stdout as each finishes."""
    import logging

    logging.basicConfig(stream=sys.stderr, format="[%(asctime)s] %(name)s: %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("lowmem_compile").setLevel(logging.INFO)

    def emit(row: dict[str, Any]) -> None:
        print(ROW_MARKER + json.dumps(row), flush=True)

    try:
        import torch

        if args.device == "cuda" and not torch.cuda.is_available():
            raise RuntimeError("--device cuda but torch sees no CUDA device")
        config = family_config(args.family, args.layers, args.seq, args.scale)
        shape = _config_summary(config)
        gen = torch.Generator().manual_seed(args.seed)
        input_ids = torch.randint(0, config.vocab_size, (1, args.seq), generator=gen).to(args.device)
    except BaseException as exc:
        traceback.print_exc()
        for name in CONFIGS:
            emit({"family": args.family, "config": name, "error": f"{type(exc).__name__}: {exc}"[:400]})
        return
    ref_grads = None
    for name in CONFIGS:
        row, grads = run_config(args, config, name, input_ids, ref_grads)
        if name == "fp32":
            ref_grads = grads
        emit({**row, "shape": shape})


# --------------------------------------------------------------------------------------------- parent


def worker_command(args: argparse.Namespace, family: str) -> list[str]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", "--families", family]
    for flag in ("layers", "seq", "steps", "warmup", "lr", "seed", "device", "scale", "lowmem_options"):
        cmd += ["--" + flag.replace("_", "-"), str(getattr(args, flag))]
    return cmd


def collect(family: str, rc: int | None, out: str, err: str, timeout: float) -> list[dict[str, Any]]:
    """The worker's rows, and an error row for each configuration it did not report."""
    rows = [json.loads(line[len(ROW_MARKER):]) for line in out.splitlines() if line.startswith(ROW_MARKER)]
    seen = {r["config"] for r in rows}
    tail = " | ".join(err.strip().splitlines()[-3:])[-400:]
    reason = f"timed out after {timeout:.0f} s" if rc is None else f"worker exited with code {rc}"
    rows += [{"family": family, "config": c, "error": f"{reason} before this configuration reported: {tail}"}
             for c in CONFIGS if c not in seen]
    return rows


def _gib(value: int | None) -> str | None:
    return None if value is None else f"{value / GIB:.2f}"


def _against(eager: float | None, low: float | None, fmt) -> str | None:
    """`eager → lowmem (lowmem / eager)`, a failed or missing side as `–`."""
    if eager is None and low is None:
        return None
    ratio = f" ({low / eager:.2f}x)" if eager and low is not None else ""
    return f"{'–' if eager is None else fmt(eager)} → {'–' if low is None else fmt(low)}{ratio}"


def render(rows: list[dict[str, Any]], env: dict[str, Any], args: argparse.Namespace, command: str) -> str:
    by = {(r["family"], r["config"]): r for r in rows}
    families = list(dict.fromkeys(r["family"] for r in rows))
    summary = []
    for fam in families:
        ref, eager, low = (by.get((fam, c), {}) for c in CONFIGS)
        att = low.get("attention") or {}
        shape = next((r["shape"] for r in (ref, eager, low) if r.get("shape")), {})
        ref_losses = ref.get("losses") or []

        def delta(row: dict[str, Any]) -> str | None:
            losses = row.get("losses")
            if not losses or len(losses) != len(ref_losses):
                return None
            return f"{losses[0] - ref_losses[0]:+.5f}, {losses[-1] - ref_losses[-1]:+.5f}"

        grad = (lambda r: None if r.get("grad_error_step1") is None else f"{r['grad_error_step1']:.2e}")
        errors = "; ".join(f"{c}: {r['error']}" for c, r in zip(CONFIGS, (ref, eager, low)) if r.get("error"))
        summary.append([
            fam,
            f"{shape.get('head_dim')} / {shape.get('num_attention_heads')}:{shape.get('num_key_value_heads')}"
            f" / {shape.get('sliding_window') or '–'} ({shape.get('window_layers', 0)})" if shape else None,
            None if not att else f"{att['replaced']}/{low.get('layers')}",
            None if not att else " / ".join(str(att[k]) for k in ("causal_masks", "window_masks", "packed_masks",
                                                                  "general_masks")),
            None if not att else "; ".join(att["skipped"]) or "–",
            None if not ref_losses else f"{ref_losses[0]:.5f} → {ref_losses[-1]:.5f}",
            delta(eager), delta(low), grad(eager), grad(low),
            _against(eager.get("peak_steps_bytes"), low.get("peak_steps_bytes"), _gib),
            _against(eager.get("tokens_per_s"), low.get("tokens_per_s"), lambda x: f"{x:.0f}"),
            low.get("first_step_s"),
            errors or None,
        ])
    header = ["family", "head dim / heads:KV / window (layers)", "sites replaced",
              "masks causal / window / packed / general",
              "skipped", "fp32 loss, step 1 → last", "eager − fp32 (1, last)", "lowmem − fp32 (1, last)",
              "LoRA grads vs fp32: eager", "lowmem", "peak GiB eager → lowmem", "tokens/s eager → lowmem",
              "lowmem first step s", "errors"]
    detail = [[r["family"], r["config"], " ".join(f"{x:.5f}" for x in r.get("losses", [])) or None,
               r.get("grad_error_step1") and f"{r['grad_error_step1']:.2e}", _gib(r.get("peak_steps_bytes")),
               _gib(r.get("resident_bytes")), r.get("tokens_per_s"), r.get("first_step_s"), r.get("load_s"), r.get("error")]
              for r in rows]
    versions = ", ".join(f"{k} {v}" for k, v in env["versions"].items() if v)
    total = args.warmup + args.steps
    intro = (
        f"# Families end to end: {args.layers} layers, {args.seq} tokens, scale {args.scale}, LoRA r=16 on every "
        f"projection, frozen linears NF4, {args.warmup} warm-up + {args.steps} timed AdamW steps (lr {args.lr})\n\n"
        f"Device: {env['gpu'] or args.device}. {versions}. Python {env['python']}. {env['date']}.\n\n"
        f"Command: `{command}`\n\n"
        "fp32: the reference, eager fp32 on the same (dequantized) weights; eager: bf16 autocast, no compile; "
        f"lowmem: torch.compile(backend=\"lowmem\", options={args.lowmem_options}). Losses of step 1 and step {total} "
        "(the same seed and tokens); LoRA grads: the first step's, ‖g − g_ref‖ / ‖g_ref‖. Peak: max allocated over "
        "the timed steps; tokens/s: the median timed step; first step: compile included. Shape column: the window "
        "and how many layers have it.\n\n"
    )
    return (intro + markdown_table(header, summary) + "\n## Every configuration\n\n"
            + markdown_table(["family", "config", "losses", "LoRA grads vs fp32", "peak steps GiB", "resident GiB",
                              "tokens/s", "first step s", "load s", "error"], detail))


def run_parent(args: argparse.Namespace, command: str) -> int:
    out_dir = Path(args.out) if args.out else default_out_dir() / "families"
    out_dir.mkdir(parents=True, exist_ok=True)
    env = environment()
    deadline = None if args.total_time_limit is None else time.monotonic() + args.total_time_limit
    rows: list[dict[str, Any]] = []
    log: list[str] = []
    text = ""
    for family in args.family_list:
        timeout = args.time_limit if deadline is None else min(args.time_limit, deadline - time.monotonic())
        if timeout < 1:
            rows += [{"family": family, "config": c, "error": "not run: --total-time-limit reached"} for c in CONFIGS]
        else:
            cmd = worker_command(args, family)
            start = time.perf_counter()
            rc, out, err = run_process_group(cmd, worker_env(args, 0, None), ROOT, timeout)
            found = collect(family, rc, out, err, timeout)
            for row in found:
                row["wall_s_family"] = round(time.perf_counter() - start, 1)
            rows += found
            log.append(f"### {family} (rc={rc})\n$ {shlex.join(cmd)}\n" + "\n".join(err.splitlines()[-80:]))
            for row in found:
                status = row.get("error") or f"losses {row.get('first_loss', 0):.4f} → {row.get('last_loss', 0):.4f}"
                print(f"[{family} {row['config']}] {status}", file=sys.stderr, flush=True)
        write_jsonl(out_dir / "families.jsonl", [{**r, **env, "gpu": r.get("gpu") or env["gpu"], "command": command,
                                                   "args": {k: v for k, v in vars(args).items() if k != "family"}}
                                                  for r in rows])
        text = render(rows, env, args, command)
        (out_dir / "families.md").write_text(text)
        (out_dir / "families.log").write_text("\n\n".join(log) + "\n")
    print(text, flush=True)
    return 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--families", default=",".join(FAMILIES), help=f"comma-separated, of {', '.join(FAMILIES)}")
    p.add_argument("--layers", type=int, default=4, help="decoder layers")
    p.add_argument("--seq", type=int, default=8192)
    p.add_argument("--steps", type=int, default=3, help="timed steps, after the warm-up")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps first (the first compiles)")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--scale", default="full", choices=["full", "small"],
                   help="full: the published shapes; small: the same features at a CPU's size")
    p.add_argument("--lowmem-options", default="{}", help="JSON options of the lowmem configuration (default: none)")
    p.add_argument("--time-limit", type=float, default=900, help="seconds a family's process may run, then killed")
    p.add_argument("--total-time-limit", type=float, default=None,
                   help="seconds for the whole run: families not started by then become error rows")
    p.add_argument("--out", default=None, help="output folder (default $OUT, else bench/results/families)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.family_list = [f.strip() for f in args.families.split(",") if f.strip()]
    unknown = [f for f in args.family_list if f not in FAMILIES]
    if unknown or not args.family_list:
        p.error(f"--families {args.families!r}: choose from {', '.join(FAMILIES)}")
    for flag in ("layers", "seq", "steps", "warmup"):
        value = getattr(args, flag)
        if value < 1:
            p.error(f"--{flag} must be at least 1, got {value}")
    try:
        options = json.loads(args.lowmem_options)
        from lowmem_compile import Options

        Options.from_user(options)
    except (json.JSONDecodeError, ValueError) as exc:
        p.error(f"--lowmem-options: {exc}")
    if args.worker and len(args.family_list) != 1:
        p.error("a worker runs one family")
    args.family = args.family_list[0]
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.worker:
        run_family(args)
        return 0
    return run_parent(args, shlex.join(["python3", "bench/families.py", *argv]))


if __name__ == "__main__":
    sys.exit(main())
