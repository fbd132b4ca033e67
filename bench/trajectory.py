"""Which bf16 training run is right? Losses over a few AdamW steps of a LoRA model, each bf16
configuration against an fp32 run of the same weights.

The bf16 configurations train the model with its frozen linears in NF4 (`quantize_`); the reference
trains, in fp32 eager without autocast, the same model with those NF4 weights dequantized and every
other parameter upcast, so the quantization is in neither side of the difference and what is left
is where each configuration rounds. Also reported: the first step's LoRA gradients against the
reference's (‖g − g_ref‖ / ‖g_ref‖ over all of them). Same seed, same tokens, one process, one
configuration after another.

    python bench/trajectory.py --layers 4 --seq 8192 --steps 7 \
        --configs eager,inductor,lowmem,lowmem_full --lowmem 'lowmem_full={"remat":"full"}'

With `--weights bnb` the model is saved and loaded back through transformers' BitsAndBytesConfig
(bitsandbytes' own 4-bit layers, as QLoRA users load it; CUDA only), so `eager` is bitsandbytes' QLoRA
and `--lowmem 'lowmem_nf4off={"nf4":"off"}'` runs those layers through bitsandbytes' ops under our backend.

Configurations: `eager` (bf16, no compile), `inductor` (stock torch.compile), `lowmem` and any
`--lowmem NAME=JSON` variant (backend="lowmem" with those options; a name starting with
"lowmem_lean" also keeps the embeddings in host memory, as bench/e2e.py does).
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._common import default_out_dir, environment, markdown_table, write_jsonl  # noqa: E402
from bench.e2e import (  # noqa: E402
    LEAN_PREFIX, MODELS, Recipe, add_lora, build_model, llama_config, load_bnb, save_model_folder,
)


def _dequantized(module):
    """The 16-bit weight of a 4-bit linear layer (ours or bitsandbytes'), or None for any other module."""
    from lowmem_compile.quantize import NF4Linear

    if isinstance(module, NF4Linear):
        return module.dequantize()
    if type(module).__name__ == "Linear4bit" and type(module).__module__.startswith("bitsandbytes"):
        import bitsandbytes.functional as bnbf

        return bnbf.dequantize_4bit(module.weight.data, module.weight.quant_state)
    return None


def fp32_reference(quantized):
    """`quantized` with each 4-bit linear turned back into an fp32 nn.Linear of its dequantized weight."""
    import torch

    reference = copy.deepcopy(quantized)
    for name, module in list(reference.named_modules()):
        weight = _dequantized(module)
        if weight is None:
            continue
        parent, _, child = name.rpartition(".")
        # on the meta device: both parameters are replaced right below, so nothing is initialised twice
        linear = torch.nn.Linear(module.in_features, module.out_features, bias=module.bias is not None, device="meta")
        linear.weight = torch.nn.Parameter(weight.float(), requires_grad=False)
        if module.bias is not None:
            linear.bias = torch.nn.Parameter(module.bias.detach().float(), requires_grad=False)
        setattr(reference.get_submodule(parent), child, linear)
    return reference.float()


def quantized_model(args, config):
    """The LoRA model with 4-bit frozen linears: `quantize_` on the random bf16 model, or (--weights bnb)
    that model saved and loaded back through transformers' BitsAndBytesConfig, as QLoRA users load it."""
    import lowmem_compile

    if args.weights == "ours":
        model = add_lora(build_model(config, args.device, args.seed), False)
        lowmem_compile.quantize_(model)
        return model
    with tempfile.TemporaryDirectory() as folder:
        ns = argparse.Namespace(model=args.model, layers=args.layers, seq_list=[args.seq], device=args.device,
                                seed=args.seed, model_dir=folder)
        save_model_folder(ns, Path(folder))
        return load_bnb(ns, Recipe(loader="bnb"))


def prepare(name: str, quantized, lowmem_options: dict[str, dict]):
    import torch

    import lowmem_compile

    model = copy.deepcopy(quantized)
    torch._dynamo.reset()
    if name == "eager":
        return model, model
    if name == "inductor":
        return model, torch.compile(model)
    if name.startswith(LEAN_PREFIX):
        lowmem_compile.offload_embeddings_(model)
        model.config.use_cache = False
    return model, torch.compile(model, backend="lowmem", options=lowmem_options[name])


def train(model, step_fn, input_ids, steps: int, lr: float, bf16: bool, label: str):
    """Losses of `steps` AdamW steps, and the first step's LoRA gradients (by parameter name)."""
    import torch

    trainable = {n.removeprefix("_orig_mod."): p for n, p in model.named_parameters() if p.requires_grad}
    optimizer = torch.optim.AdamW(trainable.values(), lr=lr)
    losses, first_grads = [], None
    for i in range(steps):
        start = time.perf_counter()
        with torch.autocast(input_ids.device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = step_fn(input_ids=input_ids, labels=input_ids).loss
        loss.backward()
        if first_grads is None:
            first_grads = {n: p.grad.detach().double().clone() for n, p in trainable.items()}
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        print(f"[{label}] step {i + 1}/{steps}: {time.perf_counter() - start:.2f} s, loss {losses[-1]:.6f}",
              file=sys.stderr, flush=True)
    return losses, first_grads


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", default="eager,inductor,lowmem", help="comma-separated bf16 configurations")
    p.add_argument("--lowmem", action="append", default=[], metavar="NAME=JSON", help="a lowmem variant")
    p.add_argument("--model", default="llama3-8b", choices=sorted(MODELS))
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--seq", type=int, default=8192)
    p.add_argument("--steps", type=int, default=7)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--weights", default="ours", choices=["ours", "bnb"],
                   help="4-bit weights from quantize_ (ours) or loaded through bitsandbytes (bnb, CUDA only)")
    p.add_argument("--out", default=None, help="output folder (default $OUT, else bench/results)")
    args = p.parse_args(argv)
    if args.weights == "bnb" and args.device != "cuda":
        raise SystemExit("--weights bnb loads the model through bitsandbytes' CUDA 4-bit layers: it needs --device cuda")
    lowmem_options = {"lowmem": {}}
    for spec in args.lowmem:
        name, sep, options = spec.partition("=")
        if not sep or not name.startswith("lowmem"):
            raise SystemExit(f"--lowmem takes NAME=JSON with NAME starting with 'lowmem', got {spec!r}")
        lowmem_options[name] = json.loads(options)
    configs = args.configs.split(",")
    unknown = [c for c in configs if c not in ("eager", "inductor", *lowmem_options)]
    if unknown:
        raise SystemExit(f"unknown configuration(s) {unknown}: eager, inductor, lowmem or a --lowmem NAME=JSON")

    import torch

    import lowmem_compile

    config = llama_config(args.model, args.layers, args.seq)
    quantized = quantized_model(args, config)
    gen = torch.Generator().manual_seed(args.seed)
    input_ids = torch.randint(0, config.vocab_size, (1, args.seq), generator=gen).to(args.device)

    reference = fp32_reference(quantized)
    ref_losses, ref_grads = train(reference, reference, input_ids, args.steps, args.lr, False, "fp32")
    del reference
    ref_norm = sum(g.square().sum() for g in ref_grads.values()).sqrt()
    rows = [{"config": "fp32 eager (reference)", "losses": ref_losses}]
    for name in configs:
        model, step_fn = prepare(name, quantized, lowmem_options)
        losses, grads = train(model, step_fn, input_ids, args.steps, args.lr, True, name)
        error = sum((grads[k] - ref_grads[k]).square().sum() for k in ref_grads).sqrt() / ref_norm
        rows.append({"config": name, "options": lowmem_options.get(name), "losses": losses,
                     "grad_error_step1": error.item(), "delta": [a - b for a, b in zip(losses, ref_losses)]})
        del model, step_fn
        if args.device == "cuda":
            torch.cuda.empty_cache()

    out = Path(args.out) if args.out else default_out_dir() / "trajectory"
    out.mkdir(parents=True, exist_ok=True)
    env = environment()
    write_jsonl(out / "trajectory.jsonl", [{**row, **env, "args": vars(args)} for row in rows])
    header = ["config", "step-1 LoRA grads vs fp32", *[f"loss {i + 1} − fp32" for i in range(args.steps)]]
    table = [[rows[0]["config"], "", *[f"{x:.5f}" for x in ref_losses]]]
    table += [[r["config"], f"{r['grad_error_step1']:.2e}", *[f"{d:+.5f}" for d in r["delta"]]] for r in rows[1:]]
    text = (f"# Loss trajectories against fp32: {args.model} ({args.layers} layers), seq {args.seq}, "
            f"LoRA r=16, AdamW lr {args.lr}, 4-bit weights: {args.weights}\n\n{env['gpu'] or args.device}; {env['versions']}; {env['date']}\n\n"
            "The reference row gives its losses; the others their loss minus the reference's at each step.\n\n"
            + markdown_table(header, table))
    (out / "trajectory.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
